"""Memory a vhost-user front-end can shrink, mapped for the native calls under
the SIGBUS guard (native/fastpath/guard.c) and reached by Python through its fd.

The guard's handler must catch exactly the faults of guarded calls in their own
regions and pass every other SIGBUS on: to the handler installed before it
(faulthandler, which prints the traceback and dies) or to the default action.
Those cases run in child processes, which are expected to die of SIGBUS.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fastpath_support import require_native, walker
from test_memory import survives
from test_vhost_frontend import DriverRing, GuestMemory

from appliance import memory_guarded
from appliance.memory import ClientMemory, GuestMemoryError
from appliance.net.virtqueue import SplitQueue

SIZE = 0x4000
ROOT = Path(__file__).resolve().parents[2]


def memfd(sealable: bool) -> int:
    fd = os.memfd_create("guarded", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0))
    os.ftruncate(fd, SIZE)
    return fd


def test_unsealable_memory_is_guarded_and_python_uses_the_fd(caplog: pytest.LogCaptureFixture) -> None:
    fd = memfd(sealable=False)
    cm = ClientMemory(guard_unsealed=True)
    region = cm.map(0x1000_0000, SIZE, fd=os.dup(fd))
    try:
        assert region.access == "fd" and region.view is None and region.guarded is not None
        assert cm.buffers(0x1000_0000, 16, write=False) is None  # Python never gets the mapping
        assert cm.mapped_regions() is None  # nor the NVMe path's native calls
        regions = memory_guarded.native_regions(cm, guarded=True)
        assert regions is not None and regions[0][1] is region.guarded
        assert memory_guarded.native_regions(cm, guarded=False) is None
        view = memory_guarded.native_view(cm, 0x1000_0000 + 0x100, 0x40)
        assert view is not None and len(view) == 0x40
        view.release()
        assert memory_guarded.native_fault(cm, certain=False) is False  # the file is whole: nothing to do
        os.ftruncate(fd, 0x1000)
        with caplog.at_level(logging.WARNING, logger="appliance.memory"):
            assert memory_guarded.native_fault(cm, certain=False) is True
            assert memory_guarded.native_fault(cm, certain=False) is True
            with pytest.raises(GuestMemoryError):
                cm.read(0x1000_0000 + 0x2000, 8)  # through the fd: short, not a SIGBUS
        assert [r.getMessage() for r in caplog.records] == [  # one warning per region
            ("client memory region 0x10000000+0x4000: its file shrank to 4096 bytes under a "
             "native call; this memory runs in Python from now on")]
        assert memory_guarded.native_regions(cm, guarded=True) is None
    finally:
        cm.unmap_all()
        os.close(fd)


def test_sealable_or_trusted_memory_is_not_guarded() -> None:
    for sealable, map_unsealed in ((True, False), (False, True)):
        fd = memfd(sealable)
        cm = ClientMemory(guard_unsealed=True, map_unsealed=map_unsealed)
        region = cm.map(0, SIZE, fd=fd)
        assert region.access == "mmap" and region.guarded is None
        cm.unmap_all()
    cm = ClientMemory()  # the default (vfio-user): no guarded mapping
    assert cm.map(0, SIZE, fd=memfd(sealable=False)).guarded is None
    cm.unmap_all()


def test_a_guarded_call_survives_a_shrink() -> None:
    native = require_native()
    assert native.guard_sigbus()
    fd = memfd(sealable=False)
    mm = mmap.mmap(fd, SIZE)
    view = memoryview(mm)
    avail, used = view[0:0x100], view[0x1000:0x1100]
    try:
        assert native.publish(avail, used, 4, 0, 1, False) is True
        os.ftruncate(fd, 0)
        with pytest.raises(OSError) as info:
            native.publish(avail, used, 4, 1, 2, False)
        assert info.value.errno == errno.EFAULT
        assert "vanished" in str(info.value)
    finally:
        avail.release()
        used.release()
        view.release()
        mm.close()
        os.close(fd)


def test_python_after_a_guarded_fault_keeps_the_file_shrunk() -> None:
    """A chain taken natively from guarded memory, then a shrink: the native
    publish faults and Python publishes through the fd, which must not grow the
    file back (the ring would read zeroes: an avail index gone back to 0, a
    driver 65535 chains ahead); the ring breaks as unreachable memory."""
    require_native()
    survives(publish_after_guarded_fault)


def publish_after_guarded_fault() -> None:
    mem = GuestMemory(1 << 16, sealable=False)
    cm = ClientMemory(guard_unsealed=True)
    cm.map(mem.gpa, mem.size, fd=os.dup(mem.fd), user_address=mem.uva)
    drv = DriverRing(mem, 1, 8)
    q = SplitQueue(1)
    q.native = walker("native")
    q.set_num(8)
    q.set_base(0)
    q.attach(cm)
    q.set_addr(mem.uva_of(drv.desc), mem.uva_of(drv.used), mem.uva_of(drv.avail), 0, 0)
    q.start()
    try:
        assert q.uses_native
        drv.add_buffer(0, b"frame")
        assert q.drain(8) == [b"frame"]  # natively, through the guarded mapping
        os.ftruncate(mem.fd, 0)  # from here on the test does not touch its own mapping
        q.publish()  # the native publish faults: Python's, through the fd
        assert not q.uses_native and os.fstat(mem.fd).st_size == 0
        assert "ring memory unreachable" in q.broken
        assert q.pop() is None and q.arm_kick() is False and os.fstat(mem.fd).st_size == 0
    finally:
        q.reset()
        cm.unmap_all()
        drv.close()
        mem.close()


CHILD = textwrap.dedent("""
    import errno, faulthandler, mmap, os, sys
    before, after = sys.argv[1] == "before", sys.argv[1] == "after"
    if before:
        faulthandler.enable()
    import appliance._fastpath as native
    if after:
        faulthandler.enable()  # on top of the guard: guard_sigbus puts the guard back on top
        assert native.guard_sigbus()
    fd = os.memfd_create("child", 0)
    os.ftruncate(fd, 0x2000)
    mm = mmap.mmap(fd, 0x2000)
    view = memoryview(mm)
    os.ftruncate(fd, 0)
    try:
        native.publish(view[0:0x100], view[0x1000:0x1100], 4, 0, 1, False)
    except OSError as exc:
        assert exc.errno == errno.EFAULT
        print("guarded fault caught", flush=True)
    print(mm[0x1000], flush=True)  # not guarded: the process must die of SIGBUS
""")


@pytest.mark.parametrize("faulthandler", ["none", "before", "after"])
def test_other_sigbus_still_kills(faulthandler: str) -> None:
    """A guarded fault is caught; any other SIGBUS kills the process as before,
    through faulthandler (its traceback) when that was installed."""
    require_native()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONFAULTHANDLER", None)
    deaths = {-signal.SIGBUS}
    if "libasan" in env.get("LD_PRELOAD", ""):  # scripts/fastpath-asan: the first handler
        deaths.add(-signal.SIGABRT)  # is AddressSanitizer's, which reports and aborts;
        env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":log_path=stderr"  # an expected report
    proc = subprocess.run([sys.executable, "-c", CHILD, faulthandler], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode in deaths, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == "guarded fault caught\n", proc.stderr
    assert ("Fatal Python error: Bus error" in proc.stderr) == (faulthandler != "none"), proc.stderr
    assert proc.stderr.count("Fatal Python error: Bus error") <= 1, proc.stderr  # no loop

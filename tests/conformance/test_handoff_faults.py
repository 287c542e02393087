"""Bad input and faults in a live handoff, with real processes.

A corrupted record (one bit of each record type, in its head or its payload),
a truncated stream (in a frame head, in a record, at a record boundary),
records swapped, dropped or repeated, the fds withheld, a stream re-signed for
another device configuration, a destination with another configuration, the
destination killed mid-stream (before and after it got the fds) and the source
killed mid-stream (during pre-copy, and once the destination holds its fds).
Each runs ``appliance handoff --from A --to PROXY``, where the proxy
(:mod:`handoff_mitm`, a thread here) stands between the source A and the real
destination B and does the damage.  Then, every time:

* the CLI exits 2 with one clear line;
* A serves on: the Python NVMe driver that was doing verified I/O on A keeps
  doing it and reads back everything written so far (returned to RUNNING, data
  intact); a killed A started again from its image reads it all back too;
* B logs a clear refusal, the one the source was told (B killed: none), and is
  left as it was: idle (a new client connects to its own socket and
  negotiates), holding the fds it held before (every one it was sent is
  closed), its image unchanged in full mode (separate images: xxh64 before ==
  after, no file left beside it); and real handoffs to it succeed afterwards.

The processes are reused from case to case while they are sound (a refusal
before adoption leaves both as they were: that is the point); a killed one is
started again.  Each group ends with a real, unproxied handoff A -> B, and the
shared one also with B -> C through a proxy that changes nothing (the proxy is
transparent: each refusal comes from the damage alone).  Most cases run the CLI
through :func:`appliance.cli.main` in this process (an interpreter start costs
more than the whole handoff here); a few run ``python -m appliance``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import xxhash
from handoff_mitm import Cut, Kill, Mitm, Piece, Transform

from appliance import cli
from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.runtime.control import ControlClient
from appliance.testing.process import ApplianceProcess, make_config
from appliance.testing.workload import VerifiedWriter, file_hash, make_image, pair_configs
from appliance.vfio_user.migration_stream import (
    BlocksHead,
    HeaderFlag,
    RecordHead,
    RecordType,
    StreamHeader,
)
from appliance.vfio_user.wire import PciIrq

SIZE = 16 << 20
T = RecordType
Make = Callable[[], Transform]  # a fresh transform for each run of a case


def ctl(p: ApplianceProcess) -> str:
    return p.config.control.socket


def image(p: ApplianceProcess) -> str:
    return p.config.storage.namespaces[0].image


def open_fds(pid: int | None = None) -> int:
    if pid is None:
        gc.collect()  # sockets earlier tests dropped unclosed must not close mid-count
    return len(os.listdir(f"/proc/{pid or 'self'}/fd"))


def settled_fds(p: ApplianceProcess) -> int:
    """The fds ``p`` holds once its loop has caught up with every connection closed so
    far (two requests one after the other: the second is read in a later pass), this
    control connection included."""
    assert p.proc is not None
    with ControlClient(ctl(p)) as c:
        c("status")
        c("status")
        return open_fds(p.proc.pid)


def status(p: ApplianceProcess) -> Any:
    with ControlClient(ctl(p)) as c:
        return c("status")


def run_handoff(src: ApplianceProcess, to: str | Path) -> subprocess.CompletedProcess[str]:
    """``appliance handoff --from SRC --to TO``, a process of its own."""
    return subprocess.run([sys.executable, "-m", "appliance", "handoff", "--from", ctl(src),
                           "--to", str(to)], check=False, capture_output=True, text=True,
                          timeout=120)


def run_handoff_here(src: ApplianceProcess, to: str | Path) -> subprocess.CompletedProcess[str]:
    """The same command through the same entry point (:func:`appliance.cli.main`), in this
    process: an interpreter start is most of a case's time on this machine."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["handoff", "--from", ctl(src), "--to", str(to)]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


@dataclass
class Rig:
    """A source with a driver doing verified I/O and an idle destination;
    whichever is gone is started again (same configuration) by :meth:`ready`."""

    tmp: Path
    shared: bool
    src_cfg: dict[str, Any] = field(default_factory=dict)
    dst_cfg: dict[str, Any] = field(default_factory=dict)
    src: ApplianceProcess | None = None
    dst: ApplianceProcess | None = None
    driver: NvmeDriver | None = None
    writer: VerifiedWriter | None = None
    written: dict[int, bytes] = field(default_factory=dict)  # what A's clients wrote, all told
    dead: list[ApplianceProcess] = field(default_factory=list)
    starts: int = 0

    def __post_init__(self) -> None:
        self.src_cfg, self.dst_cfg = pair_configs(self.tmp, SIZE, shared=self.shared)
        make_image(self.tmp / "src" / "data" / "disk0.img", SIZE, seed=1, random_mib=4)
        if not self.shared:
            make_image(self.tmp / "dst" / "data" / "disk0.img", SIZE, seed=2, random_mib=2,
                       fill=9)

    def ready(self) -> tuple[ApplianceProcess, ApplianceProcess, VerifiedWriter]:
        """Both processes up (a dead one started again), the driver writing on the source."""
        wanted = []
        if self.src is None or not self.src.alive:
            self._drop_driver()
            wanted.append("src")
        if self.dst is None or not self.dst.alive:
            wanted.append("dst")
        for name in wanted:
            old = getattr(self, name)
            if old is not None:
                self.dead.append(old)
            self.starts += 1
            setattr(self, name, ApplianceProcess(getattr(self, f"{name}_cfg"),
                                                 self.tmp / f"{name}-proc{self.starts}"))
        with ThreadPoolExecutor() as pool:  # both at once when both are wanted
            list(pool.map(lambda name: getattr(self, name).start(), wanted))
        assert self.src is not None and self.dst is not None
        if self.writer is None:
            self.driver = NvmeDriver(VfioUserClient.connect(self.src.config.storage.socket),
                                     mem_size=8 << 20)
            self.driver.setup(io_queues=2, depth=32)
            self.writer = VerifiedWriter(self.driver, blocks=8, seed=5 + self.starts)
            self.writer.written = self.written  # a restarted source must have it all
            assert self.writer.verify_all() == len(self.written)
            self.writer.step(20)
        return self.src, self.dst, self.writer

    def _drop_driver(self) -> None:
        if self.driver is not None:
            self.driver.close()
            self.driver.c.close()
        self.driver = self.writer = None

    def close(self) -> None:
        self._drop_driver()
        procs = {id(p): p for p in [*self.dead, self.src, self.dst] if p is not None}
        for p in procs.values():
            p.stop()
        for p in procs.values():
            assert "Traceback" not in p.log_path.read_text(), p.log_text()


@pytest.fixture(scope="module")
def shared_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("ho-shared"), shared=True)
    yield rig
    rig.close()


@pytest.fixture(scope="module")
def full_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("ho-full"), shared=False)
    yield rig
    rig.close()


# ------------------------------------------------------------ what the proxy does
def flip(kind: RecordType, where: int | None = None, bit: int = 4,
         pick: Callable[[bytes], bool] = lambda raw: True) -> Transform:
    """Flip ``bit`` of byte ``where`` (None: the payload's middle byte) of the
    first record of ``kind`` that ``pick`` takes."""
    done = [False]

    def transform(rtype: RecordType, raw: bytes) -> list[Piece]:
        if rtype is kind and not done[0] and pick(raw):
            done[0] = True
            at = where if where is not None else RecordHead.SIZE + (len(raw) - RecordHead.SIZE) // 2
            bad = bytearray(raw)
            bad[at] ^= 1 << bit
            return [bytes(bad)]
        return [raw]

    return transform


def swap(first: RecordType, second: RecordType) -> Transform:
    """Hold ``first`` back and send it after ``second``."""
    held: list[bytes] = []

    def transform(rtype: RecordType, raw: bytes) -> list[Piece]:
        if rtype is first:
            held.append(raw)
            return []
        if rtype is second:
            return [raw, *held]
        return [raw]

    return transform


def drop(kind: RecordType) -> Transform:
    return lambda rtype, raw: [] if rtype is kind else [raw]


def repeat(kind: RecordType) -> Transform:
    return lambda rtype, raw: [raw, raw] if rtype is kind else [raw]


def cut_at(kind: RecordType, how: str, nth: int = 1,
           pick: Callable[[bytes], bool] = lambda raw: True) -> Transform:
    """End the stream at the ``nth`` record of ``kind`` that ``pick`` takes: in
    the middle of it ("record"), before it ("boundary"), or within the head of
    the frame that would carry it ("frame-head")."""
    seen = [0]

    def transform(rtype: RecordType, raw: bytes) -> list[Piece]:
        if rtype is kind and pick(raw):
            seen[0] += 1
            if seen[0] == nth:
                if how == "record":
                    half = len(raw) // 2
                    return [raw[:half], Cut(promise=len(raw) - half)]
                return [Cut(head_bytes=5 if how == "frame-head" else 0)]
        return [raw]

    return transform


def kill_at(kind: RecordType, who: str, nth: int = 1,
            pick: Callable[[bytes], bool] = lambda raw: True) -> Transform:
    """SIGKILL ``who`` after the ``nth`` record of ``kind`` that ``pick`` takes
    was forwarded (nth=0: before the first record of ``kind``)."""
    seen = [0]

    def transform(rtype: RecordType, raw: bytes) -> list[Piece]:
        if rtype is kind and pick(raw):
            if nth == 0:
                return [Kill(who)]
            seen[0] += 1
            if seen[0] == nth:
                return [raw, Kill(who)]
        return [raw]

    return transform


def edit(kind: RecordType, change: Callable[[bytes], bytes]) -> Transform:
    """Replace the payload of ``kind`` (use with ``resign``: checksums, seq and END fixed up)."""

    def transform(rtype: RecordType, raw: bytes) -> list[Piece]:
        if rtype is kind:
            return [raw[:RecordHead.SIZE] + change(raw[RecordHead.SIZE:])]
        return [raw]

    return transform


def with_data(raw: bytes) -> bool:
    """A NAMESPACE_BLOCKS record that carries data (not a ZEROES run)."""
    return len(raw) > RecordHead.SIZE + BlocksHead.SIZE


def other_fingerprint(payload: bytes) -> bytes:
    out = bytearray(payload)
    out[-1] ^= 0x01  # the fingerprint's last byte
    return bytes(out)


def mode_flipped(payload: bytes) -> bytes:
    head = StreamHeader.unpack(payload)
    head.flags ^= HeaderFlag.SHARED_STORAGE
    return head.pack() + payload[StreamHeader.SIZE:]


def manifest_edit(change: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    def edit_payload(payload: bytes) -> bytes:
        manifest = json.loads(payload)
        change(manifest)
        return json.dumps(manifest).encode()

    return edit_payload


# ------------------------------------------------------------ one faulty handoff
@dataclass
class Fault:
    transform: Transform | None = None
    drop_fds: bool = False
    resign: bool = False
    cli: str = ""  # in the CLI's error line
    cli_pattern: str = ""  # or: a pattern the line must contain
    log: str = ""  # in B's refusal ("" = B is killed)
    src_killed: bool = False
    own_process: bool = False  # run the CLI as a process of its own (else: cli.main here)
    verdict_within: float = 30.0  # the proxy gives up on B's verdict after this long


def broken_channel_or(reason: str) -> str:
    """What the CLI says when B refuses while A is still pre-copying: A's next send
    fails, B's reason (in B's log, and left unread on A's socket) is not in the line."""
    return rf"handoff channel to \S+: \[Errno \d+\] |refused the handoff: .*{re.escape(reason)}"


def attempt(rig: Rig, fault: Fault) -> Mitm:
    """Hand off A -> proxy -> B with ``fault``; check everything the module docstring says."""
    src, dst, writer = rig.ready()
    status(dst)  # B's loop is done with any earlier channel: its log is complete
    dst_log = dst.log_path.stat().st_size
    dst_image = None if rig.shared else file_hash(image(dst))
    dst_fds, own_fds = settled_fds(dst), open_fds()
    with Mitm(rig.tmp / "mitm", src, dst, transform=fault.transform, drop_fds=fault.drop_fds,
              resign=fault.resign, verdict_within=fault.verdict_within) as mitm:
        done = (run_handoff if fault.own_process else run_handoff_here)(src, mitm.ctl_path)
    assert mitm.accept_reply.get("ok"), mitm.accept_reply
    assert open_fds() == own_fds  # the proxy closed every fd it received

    # The CLI: one clear line, exit status 2.
    assert done.returncode == 2, (done, mitm.records_in, mitm.stopped)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("appliance: error: "), done.stderr
    if fault.cli_pattern:
        assert re.search(fault.cli_pattern, lines[0]), (done.stderr, mitm.stopped, mitm.verdict)
    assert fault.cli in lines[0], (done.stderr, mitm.stopped, mitm.verdict)
    assert done.stdout == "" and not mitm.stalled

    # The source: serving on, every block written so far reads back as written.
    if fault.src_killed:
        assert not src.alive
    else:
        assert src.alive, src.log_text()
        writer.step(10)
        assert writer.verify_all() == len(rig.written)
        st = status(src)
        assert st["nvme"]["state"] == "ready" and st["nvme"]["attached"], st

    # The destination: refused with a clear error, left as it was.
    if fault.log:
        assert dst.alive, dst.log_text()
        status(dst)  # (the refusal is logged before this is answered)
        refusal = dst.log_path.read_bytes()[dst_log:].decode(errors="replace")
        assert "handoff refused: " in refusal and fault.log in refusal, refusal
        reason = refusal.split("handoff refused: ", 1)[1].splitlines()[0]
        assert json.loads(mitm.verdict) == {"ok": False, "error": reason}, mitm.verdict
        assert "adopt" not in refusal and "letting go" not in refusal, refusal
        with VfioUserClient.connect(dst.config.storage.socket) as probe:
            assert probe.server_caps  # a client of its own: connected and negotiated
        assert status(dst)["nvme"]["attached"] is False  # (and the probe's end is seen)
        assert settled_fds(dst) == dst_fds  # every fd it was sent is closed again
    else:
        assert not dst.alive and mitm.verdict == b""
    if dst_image is not None:
        assert file_hash(image(dst)) == dst_image
        assert sorted(p.name for p in Path(image(dst)).parent.iterdir()) == ["disk0.img"]
    return mitm


def finish_with_real_handoff(rig: Rig) -> ApplianceProcess:
    """After the failures: the plain handoff A -> B works, the driver carries on on B."""
    src, dst, writer = rig.ready()
    done = run_handoff(src, ctl(dst))
    assert done.returncode == 0, done.stderr
    assert ("shared-storage" if rig.shared else "full") in done.stdout
    assert src.proc is not None and src.proc.wait(timeout=30) == 0
    assert writer.verify_all() == len(rig.written)
    writer.step(20)
    st = status(dst)
    assert st["nvme"]["state"] == "ready" and st["nvme"]["attached"], st
    if not rig.shared:
        assert rig.driver is not None
        expected = bytearray(Path(image(src)).read_bytes())
        for lba, data in rig.written.items():
            expected[lba * 512:lba * 512 + len(data)] = data
        assert xxhash.xxh64(expected).hexdigest() == file_hash(image(dst))
    return dst


# ------------------------------------------------------------ shared storage
HEAD_FLIPS = [  # (type, byte of the 24-byte head, bit, what B says)
    (T.HEADER, 0, 0, "bad magic"),
    (T.PCI_CONFIG, 4, 4, "unknown record type 18"),
    (T.MSIX, 6, 0, "reserved flags 0x1"),
    (T.DEVICE_STATE, 12, 5, "sequence number 35, expected 3"),
    (T.HANDOFF, 20, 2, "(HANDOFF): checksum mismatch"),
    (T.END, 8, 4, "END length 0 not in 16..16"),
]
SHARED_TYPES = [T.HEADER, T.PCI_CONFIG, T.MSIX, T.DEVICE_STATE, T.HANDOFF, T.END]


@pytest.mark.parametrize("kind", SHARED_TYPES, ids=lambda k: k.name)
def test_a_flipped_payload_bit_is_refused(shared_rig: Rig, kind: RecordType) -> None:
    why = f"({kind.name}): checksum mismatch"
    cli = f"refused the handoff: record {SHARED_TYPES.index(kind)} {why}"
    mitm = attempt(shared_rig, Fault(flip(kind), cli=cli, log=why, own_process=kind is T.HEADER))
    assert mitm.answer == b"abort\n"  # A told B so, and serves on


@pytest.mark.parametrize(("kind", "where", "bit", "why"), HEAD_FLIPS,
                         ids=[k.name for k, *_ in HEAD_FLIPS])
def test_a_flipped_head_bit_is_refused(shared_rig: Rig, kind: RecordType, where: int, bit: int,
                                       why: str) -> None:
    attempt(shared_rig, Fault(flip(kind, where, bit), cli=why, log=why))


def test_a_length_past_the_end_of_the_stream_is_refused_at_once(shared_rig: Rig) -> None:
    # bit 16 of HANDOFF's length (a manifest is far smaller): 64 KiB more than the
    # 40 bytes of END that follow
    attempt(shared_rig, Fault(flip(T.HANDOFF, 10, 0), cli="stream truncated",
                              log="stream truncated", verdict_within=3.0))


@pytest.mark.parametrize(("make", "why"), [
    (lambda: swap(T.PCI_CONFIG, T.MSIX), "sequence number 2, expected 1"),
    (lambda: drop(T.MSIX), "sequence number 3, expected 2"),
    (lambda: repeat(T.DEVICE_STATE), "sequence number 3, expected 4"),
    (lambda: swap(T.HANDOFF, T.END), "sequence number 5, expected 4"),
], ids=["swapped", "dropped", "repeated", "end-first"])
def test_records_out_of_order_are_refused(shared_rig: Rig, make: Make, why: str) -> None:
    attempt(shared_rig, Fault(make(), cli=why, log=why))


@pytest.mark.parametrize(("how", "kind", "why"), [
    ("frame-head", T.HEADER, "peer closed the handoff channel (5 of 12 bytes)"),
    ("record", T.DEVICE_STATE, "peer closed the handoff channel (4632 of 4928 bytes)"),
    ("boundary", T.END, "peer closed the handoff channel (0 of 12 bytes)"),
], ids=["in-a-frame-head", "in-DEVICE_STATE", "before-END"])
def test_a_truncated_stream_is_refused(shared_rig: Rig, how: str, kind: RecordType,
                                       why: str) -> None:
    attempt(shared_rig, Fault(cut_at(kind, how), cli=why, log=why))


def test_withheld_fds_are_refused(shared_rig: Rig) -> None:
    mitm = attempt(shared_rig, Fault(drop_fds=True, cli="fds, 0 came", log="fds, 0 came"))
    assert mitm.fds_in > 0


@pytest.mark.parametrize(("make", "why"), [
    (lambda: edit(T.HEADER, other_fingerprint), "for another device configuration"),
    (lambda: edit(T.HEADER, mode_flipped), "shared-storage mode differs"),
    (lambda: edit(T.HANDOFF, manifest_edit(lambda m: m.update(version=99))),
     "handoff manifest version 99"),
    (lambda: edit(T.HANDOFF, manifest_edit(lambda m: m["control"].update(links_down=["net9"]))),
     "names no port here"),
    (lambda: edit(T.HANDOFF, manifest_edit(lambda m: m["control"]["faults"].update(rng=[1]))),
     "fault state"),
], ids=["fingerprint", "storage-mode", "manifest-version", "link-state", "fault-state"])
def test_a_resigned_stream_for_another_configuration_is_refused(shared_rig: Rig, make: Make,
                                                                why: str) -> None:
    """Checksums, sequence and END fixed up: only the meaning is wrong."""
    attempt(shared_rig, Fault(make(), resign=True, cli=why, log=why))


def test_a_resigned_manifest_without_the_device_is_refused(shared_rig: Rig) -> None:
    try:
        attempt(shared_rig, Fault(edit(T.HANDOFF, manifest_edit(lambda m: m.pop("vfio_user"))),
                                  resign=True, cli="refused the handoff", log="vfio_user"))
        # B was left as it was: the next stream gets as far as its manifest again.
        why = "manifest version 99"
        attempt(shared_rig, Fault(edit(T.HANDOFF, manifest_edit(lambda m: m.update(version=99))),
                                  resign=True, cli=why, log=why))
    finally:
        dst = shared_rig.dst
        if dst is not None and dst.alive:
            status(dst)  # its loop is done with the channel (and has logged what it did)
        if dst is not None and (not dst.alive or "Traceback" in dst.log_path.read_text()):
            dst.stop()  # not left usable: the next case gets a new B
            shared_rig.dst = None


def client_socket_is_the_lock_file(m: dict[str, Any]) -> None:
    m["vfio_user"]["client"]["socket"] = m["vfio_user"]["lock"]


def an_irq_fd_is_the_lock_file(m: dict[str, Any]) -> None:
    conn = m["vfio_user"]["client"]["conn"]
    conn["irq_fds"] = [[int(PciIrq.MSIX), 0, m["vfio_user"]["lock"]], *conn["irq_fds"][1:]]


def a_region_address_is_text(m: dict[str, Any]) -> None:
    m["vfio_user"]["client"]["conn"]["regions"][0]["address"] = "0x0"


@pytest.mark.parametrize(("change", "why"), [
    (client_socket_is_the_lock_file, "is not a socket"),
    (an_irq_fd_is_the_lock_file, "is not an eventfd"),
    (a_region_address_is_text, "regions[0].address"),
], ids=["client-fd-not-a-socket", "irq-fd-not-an-eventfd", "region-field-text"])
def test_what_adopting_would_refuse_is_refused_before_anything_is_adopted(
        shared_rig: Rig, change: Callable[[dict[str, Any]], None], why: str) -> None:
    """A manifest the early checks used to pass and the adopt then refused (the
    destination adopted part of it and exited): now refused at the check, and
    the destination stays idle with every fd it got closed."""
    try:
        attempt(shared_rig, Fault(edit(T.HANDOFF, manifest_edit(change)), resign=True,
                                  cli="refused the handoff", log=why))
    finally:
        dst = shared_rig.dst
        if dst is not None and dst.alive:
            status(dst)
        if dst is not None and (not dst.alive or "Traceback" in dst.log_path.read_text()):
            dst.stop()
            shared_rig.dst = None


def test_destination_killed_holding_the_fds(shared_rig: Rig) -> None:
    """SIGKILL B as the DATA frame arrives, after the FDS frame gave it copies of the
    client's socket, memory and eventfds: A and its client carry on."""
    mitm = attempt(shared_rig, Fault(kill_at(T.HEADER, "dst", nth=0),
                                     cli="closed the handoff channel without a verdict"))
    assert mitm.stopped == "killed dst" and mitm.fds_in > 0


def test_source_killed_while_the_destination_holds_the_fds(shared_rig: Rig) -> None:
    """SIGKILL A once B has the fds and the device state: B refuses, closes every copy
    (the client's connection ends: nobody serves it) and stays idle; a new A serves the
    data the driver wrote."""
    assert shared_rig.driver is not None
    old = shared_rig.driver.c.sock
    mitm = attempt(shared_rig, Fault(kill_at(T.DEVICE_STATE, "src"), src_killed=True,
                                     cli="control socket closed",
                                     log="peer closed the handoff channel (0 of 12 bytes)"))
    assert mitm.stopped == "killed src" and mitm.fds_in > 0
    old.settimeout(10)
    assert old.recv(1) == b""  # B did not keep (or serve) the client's connection
    shared_rig.ready()  # a new A: its driver reads back all that was written (verify_all)


def test_another_device_configuration_is_refused_at_accept(shared_rig: Rig) -> None:
    src, _, writer = shared_rig.ready()
    tmp = shared_rig.tmp / "other"
    cfg = make_config(tmp, storage={"namespaces": [{"image": str(tmp / "data" / "disk0.img"),
                                                    "size": f"{2 * SIZE >> 20}M"}]})
    make_image(tmp / "data" / "disk0.img", 2 * SIZE, seed=3, random_mib=1)
    with ApplianceProcess(cfg, tmp / "proc") as other:
        with Mitm(shared_rig.tmp / "mitm", src, other) as mitm:
            done = run_handoff(src, mitm.ctl_path)
        assert mitm.accept_reply.get("ok") is False and mitm.records_in == []
        assert "configuration differs" in mitm.accept_reply["error"]["message"]
        assert done.returncode == 2 and "configuration differs" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert other.alive
        with VfioUserClient.connect(other.config.storage.socket) as probe:
            assert probe.server_caps
        assert "Traceback" not in other.log_text()
    writer.step(10)
    assert writer.verify_all() == len(shared_rig.written)


def test_after_the_faults_real_handoffs_succeed(shared_rig: Rig) -> None:
    """A -> B for real; then B -> C through a proxy that changes nothing (the proxy
    itself is transparent: the refusals above come from what it was told to do)."""
    dst = finish_with_real_handoff(shared_rig)
    assert shared_rig.writer is not None
    tmp = shared_rig.tmp / "third"
    cfg = make_config(tmp, storage={"namespaces": [{"image": image(dst),
                                                    "size": f"{SIZE >> 20}M"}]})
    third = ApplianceProcess(cfg, tmp / "proc").start()
    shared_rig.dead.append(third)
    with Mitm(shared_rig.tmp / "mitm", dst, third) as mitm:
        done = run_handoff_here(dst, mitm.ctl_path)
    assert done.returncode == 0, (done.stderr, mitm.stopped)
    assert json.loads(mitm.verdict.splitlines()[0])["ok"] is True and mitm.answer == b"go\n"
    assert mitm.records_in == SHARED_TYPES and not mitm.stopped
    assert dst.proc is not None and dst.proc.wait(timeout=30) == 0
    assert shared_rig.writer.verify_all() == len(shared_rig.written)
    shared_rig.writer.step(20)
    assert status(third)["nvme"]["attached"]


# ------------------------------------------------------------ separate images (full mode)
@pytest.mark.parametrize(("make", "why"), [
    (lambda: flip(T.NAMESPACE_BLOCKS, pick=with_data), "(NAMESPACE_BLOCKS): checksum mismatch"),
    (lambda: flip(T.DIRTY_ROUND), "record 1 (DIRTY_ROUND): checksum mismatch"),
    (lambda: cut_at(T.NAMESPACE_BLOCKS, "record", nth=2, pick=with_data),
     "peer closed the handoff channel ("),
], ids=["NAMESPACE_BLOCKS-bit", "DIRTY_ROUND-bit", "truncated-in-NAMESPACE_BLOCKS"])
def test_full_mode_faults_during_precopy(full_rig: Rig, make: Make, why: str) -> None:
    """B refuses while A pre-copies; B's image is untouched (xxh64 before == after)."""
    attempt(full_rig, Fault(make(), cli_pattern=broken_channel_or(why), log=why))


def test_full_mode_fault_after_precopy(full_rig: Rig) -> None:
    why = "(DEVICE_STATE): checksum mismatch"
    attempt(full_rig, Fault(flip(T.DEVICE_STATE), cli=why, log=why))


def test_destination_killed_mid_stream(full_rig: Rig) -> None:
    """SIGKILL B as the first DATA frame reaches the proxy (pre-copy round 1): A serves on,
    B's image is as it was, and a new B from the same configuration takes the handoff."""
    mitm = attempt(full_rig, Fault(kill_at(T.HEADER, "dst", nth=0),
                                   cli_pattern=r"handoff channel to \S+: \[Errno \d+\] ",
                                   own_process=True))
    assert mitm.stopped == "killed dst"


def test_source_killed_mid_stream(full_rig: Rig) -> None:
    """SIGKILL A in the middle of pre-copy: B refuses and stays; a new A from A's image
    has every block the driver wrote."""
    mitm = attempt(full_rig, Fault(kill_at(T.NAMESPACE_BLOCKS, "src", nth=2, pick=with_data),
                                   cli="control socket closed", src_killed=True,
                                   log="peer closed the handoff channel (0 of 12 bytes)"))
    assert mitm.stopped == "killed src"
    old = full_rig.src
    full_rig.ready()  # a new A: its driver reads back all that was written (verify_all)
    assert full_rig.src is not old and full_rig.writer is not None
    assert full_rig.writer.verify_all() == len(full_rig.written) > 0


def test_after_the_full_mode_faults_a_real_handoff_succeeds(full_rig: Rig) -> None:
    finish_with_real_handoff(full_rig)

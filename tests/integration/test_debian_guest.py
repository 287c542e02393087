"""The Debian guest (images/debian-guest.sh) on the appliance's NVMe disk: fio verify,
injected media errors, and ext4/xfs/btrfs/f2fs round trips, ext4 across a live handoff;
in the mmap boot, faults armed from inside the guest (OCP Error Injection), an
edit-command fault, and a fio fault plan (delays, media errors, a controller reset).

One boot per doorbell mode (``storage.doorbells`` message and mmap) runs everything:
the guest (Linux 6.1, QEMU 11.1 vfio-user-pci) sees the appliance's controller and,
as a reference, QEMU's built-in nvme on a file; the same fio job runs on both and
their numbers are printed side by side (never asserted: TCG on a shared machine).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from guests import Guest, QemuEnv
from test_qemu_handoff import handoff

from appliance.runtime.control import ControlClient
from appliance.testing.debian import debian_guest, debian_image
from appliance.testing.plugin import GUEST_KEY
from appliance.testing.qemu import qemu_args

pytestmark = pytest.mark.integration

APPLIANCE_MODEL = "Appliance NVMe"
QEMU_MODEL = "QEMU NVMe Ctrl"
DISK = "512M"  # mkfs.xfs wants 300 MiB at least; the image file stays sparse
# randwrite + verify; each of the jobs writes its own 16 MiB (offset_increment)
FIO_VERIFY = ("fio --name=verify --filename={dev} --direct=1 --ioengine=libaio --rw=randwrite "
              "--bs=4k --size=16M --offset_increment=16M --numjobs={jobs} --iodepth={qd} "
              "--verify=crc32c --verify_fatal=1 --group_reporting --output-format=json "
              "--output=/tmp/fio.json; rc=$?; cat /tmp/fio.json; [ $rc = 0 ]")
JOBS = ((2, 1), (2, 16))  # (numjobs, iodepth)
# Every 4 KiB block of the first 4 MiB read once, in three jobs: before the fault
# range, the range, after it. EIO (5) and ENODATA (61: a medium error) are counted
# per job (total_err), not fatal.
FIO_READ_AROUND = ("fio --direct=1 --ioengine=psync --rw=read --bs=4k --continue_on_error=read "
                   "--ignore_error=5:61 --output-format=json --output=/tmp/fio.json "
                   "--name=before --filename={dev} --offset=0 --size={first} "
                   "--name=range --filename={dev} --offset={first} --size={length} "
                   "--name=after --filename={dev} --offset={end} --size={rest}; "
                   "rc=$?; cat /tmp/fio.json; [ $rc = 0 ]")
FAULT_BYTES = (2 << 20, 16 << 10)  # the media-error range: 16 KiB at 2 MiB
RESET_AT = 3 << 20  # the fio fault plan's controller reset: the read of this byte
# OCP Error Injection, one entry: enabled + single instance, type 7 (NAND corruption:
# the next read fails with Unrecovered Read Error, DNR). bookworm's nvme-cli (2.3) has
# no "nvme ocp set-error-injection" (later versions have it): the same Set/Get Features raw.
ERRI_ENTRY = "printf '\\x03\\x00\\x07\\x00' > /tmp/erri.bin; head -c 28 /dev/zero >> /tmp/erri.bin"
ERRI_SET = "nvme set-feature {ctrl} --feature-id=0xc0 --value=1 --data-len=32 --data=/tmp/erri.bin"
ERRI_GET = "nvme get-feature {ctrl} --feature-id=0xc0 --data-len=4064"  # DW0 and a hex dump

MKFS = {"ext4": "mkfs.ext4 -q -F", "xfs": "mkfs.xfs -q -f", "btrfs": "mkfs.btrfs -q -f",
        "f2fs": "mkfs.f2fs -q -f"}
FSCK = {"ext4": "e2fsck -fn", "xfs": "xfs_repair -n", "btrfs": "btrfs check",
        "f2fs": "fsck.f2fs"}
# A tree of files of random sizes, a directory of 20 at a time, logged in /tmp/tree.log
# (until {until} is true); its checksums in /tmp/sums.
WRITE_TREE = ("d=0; until {until}; do d=$((d + 1)); mkdir -p /mnt/d$d/sub; for f in $(seq 20); do "
              "head -c $((RANDOM % 65536 + 1)) /dev/urandom > /mnt/d$d/sub/f$f; done; "
              "sync; echo \"dir $d\" >> /tmp/tree.log; done")
SUMS = "(cd /mnt && find . -type f | sort | xargs sha256sum) > /tmp/sums"


def fs_round_trip(fs: str, dev: str) -> str:
    """The guest script: mkfs, mount, write a tree with checksums, unmount, fsck
    clean, remount, verify, unmount. Ends with FS-OK."""
    return (f"( set -e; rm -f /tmp/tree.log; {MKFS[fs]} {dev}; mount {dev} /mnt; "
            f"{WRITE_TREE.format(until='[ $d = 4 ]')}; {SUMS}; umount /mnt; {FSCK[fs]} {dev}; "
            f"echo 3 > /proc/sys/vm/drop_caches; mount {dev} /mnt; "
            f"(cd /mnt && sha256sum --quiet -c /tmp/sums); umount /mnt; echo FS-OK ) 2>&1")


def disk_of(g: Guest, model: str) -> str:
    """The guest's block device of the NVMe controller whose model is ``model``."""
    out, rc = g.run("for c in /sys/class/nvme/nvme*; do echo \"${c##*/} $(cat $c/model)\"; done")
    assert rc == 0, out
    for line in out.splitlines():
        name, _, mn = line.partition(" ")
        if mn.strip() == model:
            return f"/dev/{name}n1"
    raise AssertionError(f"no NVMe controller {model!r} in the guest: {out}")


def fio_verify(g: Guest, dev: str, jobs: int, qd: int) -> dict[str, float]:
    """Run the verify job on ``dev``; returns its write and verify-read IOPS.

    Raises:
        AssertionError: fio failed or reported an error.
    """
    out, rc = g.run(FIO_VERIFY.format(dev=dev, jobs=jobs, qd=qd), timeout=300)
    assert rc == 0, out
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0, out
    return {"write": job["write"]["iops"], "read": job["read"]["iops"]}


@pytest.fixture
def debian(qemu_env: QemuEnv, appliance_factory: Any, tmp_path: Path,
           request: pytest.FixtureRequest) -> Iterator[tuple[Guest, Any]]:
    """(the Debian guest, appliance A): A serves a 512 MiB disk with the test's
    doorbell mode; QEMU's built-in nvme serves a 512 MiB file next to it."""
    image = debian_image(qemu_env)
    doorbells = request.param
    a = appliance_factory("a", storage={"doorbells": doorbells, "guest_faults": True, "namespaces": [
        {"image": str(tmp_path / "disk0.img"), "size": DISK}]})
    reference = tmp_path / "qemu-nvme.img"
    with open(reference, "wb") as f:
        f.truncate(512 << 20)
    args = qemu_args(a.config, net=False)
    devices = [*args[args.index("-device"):],
               "-drive", f"file={reference},format=raw,if=none,id=qnvme",
               "-device", "nvme,serial=reference,drive=qnvme"]
    g = debian_guest(qemu_env, image, tmp_path, args=devices, name=f"debian-{doorbells}")
    request.node.stash[GUEST_KEY] = g  # the plugin puts the console tail in a failure report
    with g:
        out, rc = g.run("uname -r; dmesg -n 1", timeout=180)  # no kernel lines amid fio's JSON
        assert rc == 0 and out.startswith("6."), out
        yield g, a


@pytest.mark.parametrize("debian", ["message", "mmap"], indirect=True)
def test_fio_faults_and_filesystems_in_the_debian_guest(debian: tuple[Guest, Any],
                                                        appliance_factory: Any,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    g, a = debian
    mode = a.config.storage.doorbells.value
    ours, theirs = disk_of(g, APPLIANCE_MODEL), disk_of(g, QEMU_MODEL)

    # fio verify on both disks, numbers side by side
    header = (f"{'jobs x qd':<10}{'appliance write':>16}{'verify':>9}{'QEMU nvme write':>17}"
              f"{'verify':>9}")
    table = [f"fio randwrite+verify, 4 KiB, 2x16 MiB (IOPS under TCG; doorbells={mode})", header]
    for jobs, qd in JOBS:
        mine, ref = fio_verify(g, ours, jobs, qd), fio_verify(g, theirs, jobs, qd)
        table.append(f"{f'{jobs} x {qd}':<10}{mine['write']:>16.0f}{mine['read']:>9.0f}"
                     f"{ref['write']:>17.0f}{ref['read']:>9.0f}")
    with capsys.disabled():  # in the test output even when it passes
        print("\n" + "\n".join(table))

    # media errors on an LBA range: fio's read errors are exactly that range's blocks
    out, _ = g.run(f"cat /sys/block/{ours[5:]}/queue/logical_block_size")
    lbs = int(out)
    first, length = FAULT_BYTES
    with ControlClient(a.config.control.socket) as ctl:
        ctl("fault.add", action="status", status="unrecovered_read_error", opcode=2,
            lba=f"{first // lbs}-{(first + length) // lbs - 1}")
        out, rc = g.run(FIO_READ_AROUND.format(dev=ours, first=first, length=length,
                                               end=first + length,
                                               rest=(4 << 20) - first - length), timeout=300)
        assert rc == 0, out
        jobs = json.loads(out[out.index("{"):])["jobs"]
        errors = {job["jobname"]: job["total_err"] for job in jobs}
        assert errors == {"before": 0, "range": length // 4096, "after": 0}, errors
        assert ctl("fault.list")["fired"]["nvme.status"] >= length // 4096
        ctl("fault.clear")
    out, rc = g.run(f"dd if={ours} of=/dev/null bs=4k skip={first // 4096} count=4 iflag=direct")
    assert rc == 0, out

    # file systems: ext4, xfs, btrfs and f2fs round trips with fsck clean
    for fs in ("ext4", "xfs", "btrfs", "f2fs"):
        if fs == "ext4" and mode == "message":
            continue  # below: across a live handoff
        out, rc = g.run(fs_round_trip(fs, ours), timeout=300)
        assert rc == 0 and out.endswith("FS-OK"), f"{fs}: {out}"

    if mode == "message":
        ext4_across_a_handoff(g, a, appliance_factory, ours)
    else:
        with ControlClient(a.config.control.socket) as ctl:
            faults_from_inside_the_guest(g, ctl, ours)
            an_edit_fault(g, ctl, ours, lbs)
            fio_fault_plan(g, ctl, ours, lbs)
    assert "Traceback" not in a.log_text()


def faults_from_inside_the_guest(g: Guest, ctl: ControlClient, dev: str) -> None:
    """Set Features C0h from the guest arms a fault: the next read fails with it,
    Get Features C0h shows it, and the control socket lists the same rule."""
    ctrl = dev[:-2]
    out, rc = g.run(f"dmesg -C; {ERRI_ENTRY}; {ERRI_SET.format(ctrl=ctrl)}")
    assert rc == 0, out
    (rule,) = ctl("fault.list")["rules"]
    assert (rule["origin"], rule["ocp_type"], rule["status"], rule["dnr"], rule["hits"]) == (
        "guest", 7, "0x281", True, 0), rule
    out, rc = g.run(f"dd if={dev} of=/dev/null bs=4k count=1 iflag=direct 2>&1")
    assert rc != 0 and "error" in out, out
    out, rc = g.run(f"dd if={dev} of=/dev/null bs=4k count=1 iflag=direct")  # single: once
    assert rc == 0, out
    out, rc = g.run(ERRI_GET.format(ctrl=ctrl))
    assert rc == 0 and "0x00000001" in out and "02 00 07 00" in out, out  # fired: enable clear
    assert ctl("fault.list")["rules"][0]["hits"] == 1
    out, _ = g.run("dmesg | grep -i 'critical medium error' | tail -1")
    assert "sector 0" in out, out
    out, rc = g.run(f"nvme set-feature {ctrl} --feature-id=0xc0 --value=0")
    assert rc == 0, out  # NUME 0: the guest's rules are gone
    assert ctl("fault.list")["rules"] == []


def an_edit_fault(g: Guest, ctl: ControlClient, dev: str, lbs: int) -> None:
    """An edit rule points the guest's read of the first 4 KiB at the tenth (its
    SLBA, CDW10, rewritten): the guest reads what it did not ask for."""
    write = "printf '{word}%.0s' $(seq 1024) | dd of={dev} bs=4k {seek} iflag=fullblock oflag=direct"
    out, rc = g.run(f"{write.format(word='NINE', dev=dev, seek='seek=9')} && "
                    f"{write.format(word='ZERO', dev=dev, seek='')}")
    assert rc == 0, out
    ctl("fault.add", action="edit", opcode=2, lba=0, edit=f"cdw10={9 * 4096 // lbs}", count=1)
    read = f"dd if={dev} bs=4k count=1 iflag=direct 2>/dev/null | head -c 8"
    out, rc = g.run(read)
    assert rc == 0 and out.endswith("NINENINE"), out
    out, rc = g.run(read)
    assert rc == 0 and out.endswith("ZEROZERO"), out  # count 1: once
    assert ctl("fault.list")["fired"]["nvme.edit"] == 1
    ctl("fault.clear")


def fio_fault_plan(g: Guest, ctl: ControlClient, dev: str, lbs: int) -> None:
    """fio under faults: randwrite + verify (2 jobs, queue depth 16) with delayed
    completions and a controller reset (CSTS.CFS) mid-run verifies clean; then a
    read of 4 MiB with delays, a media-error range and another reset reports
    exactly the range's blocks as errors and goes on after the reset."""
    _, rc = g.run(f"echo 5000 > /sys/block/{dev[5:]}/queue/io_timeout")  # 30 s -> 5 s
    assert rc == 0
    ctl("fault.add", action="fatal", opcode=1, lba=RESET_AT // lbs, count=1)
    ctl("fault.add", action="delay", delay=0.02, probability=0.1, opcode=1, seed=5)
    fio_verify(g, dev, 2, 16)  # no error, every block verified
    fired = ctl("fault.list")["fired"]
    assert fired["nvme.fatal"] == 1 and fired["nvme.delay"] > 0, fired
    ctl("fault.clear")

    first, length = FAULT_BYTES
    # the first rule that matches decides: the delays come last
    ctl("fault.add", action="status", status="unrecovered_read_error", dnr=True, opcode=2,
        lba=f"{first // lbs}-{(first + length) // lbs - 1}")
    ctl("fault.add", action="fatal", opcode=2, lba=RESET_AT // lbs, count=1)
    ctl("fault.add", action="delay", delay=0.02, probability=0.2, opcode=2, seed=17)
    # the held command times out after 5 s; the driver then sees CSTS.CFS and resets
    out, rc = g.run("dmesg -C; " + FIO_READ_AROUND.format(
        dev=dev, first=first, length=length, end=first + length,
        rest=(4 << 20) - first - length), timeout=300)
    assert rc == 0, out
    jobs = json.loads(out[out.index("{"):])["jobs"]
    errors = {job["jobname"]: job["total_err"] for job in jobs}
    assert errors == {"before": 0, "range": length // 4096, "after": 0}, errors
    fired = ctl("fault.list")["fired"]  # counted since the process started
    assert fired["nvme.fatal"] == 2 and fired["nvme.status"] >= length // 4096, fired
    out, _ = g.run("dmesg | grep -i -e 'controller is down' -e reset | tail -3")
    assert "controller is down" in out, out
    ctl("fault.clear")
    out, rc = g.run(f"dd if={dev} of=/dev/null bs=4k count=1024 iflag=direct")
    assert rc == 0, out


def ext4_across_a_handoff(g: Guest, a: Any, appliance_factory: Any, dev: str) -> None:
    """ext4's round trip with the tree's writes running while A hands the disk to B:
    directories are written before, during and after the handoff."""
    storage = a.raw_config["storage"]
    b = appliance_factory("b", storage={"doorbells": storage["doorbells"],
                                        "namespaces": storage["namespaces"]})
    out, rc = g.run(f"dmesg -C; rm -f /tmp/tree.log; {MKFS['ext4']} {dev} && mount {dev} /mnt && "
                    f"( {WRITE_TREE.format(until='[ -e /tmp/stop ]')}; echo done >> /tmp/tree.log ) "
                    "> /dev/null 2>&1 & echo started")
    assert rc == 0 and out.endswith("started"), out
    _, rc = g.run("until grep -qs '^dir 3$' /tmp/tree.log; do sleep 0.1; done", timeout=240)
    assert rc == 0, g.tail()
    print(handoff(a, b).strip())
    out, rc = g.run("grep -c ^dir /tmp/tree.log")
    after = int(out.splitlines()[-1]) + 3  # three more directories written by B alone
    _, rc = g.run(f"until grep -qs '^dir {after}$' /tmp/tree.log; do sleep 0.1; done; touch /tmp/stop; "
                  "until grep -q ^done /tmp/tree.log; do sleep 0.1; done", timeout=300)
    assert rc == 0, g.tail()
    out, rc = g.run(f"( set -e; {SUMS}; umount /mnt; {FSCK['ext4']} {dev}; "
                    f"echo 3 > /proc/sys/vm/drop_caches; mount {dev} /mnt; "
                    "(cd /mnt && sha256sum --quiet -c /tmp/sums); umount /mnt; echo FS-OK ) 2>&1",
                    timeout=300)
    assert rc == 0 and out.endswith("FS-OK"), out
    out, _ = g.run("dmesg | grep -c -i -e 'nvme.*timeout' -e 'i/o error'")
    assert out.strip() == "0", out
    assert "Traceback" not in b.log_text()

"""``appliance boot``: the appliance (started if not running) and a QEMU guest on the terminal.

The guest is the provisioned test guest (``images/qemu-env.sh``: kernel 6.1,
busybox; with ``--guest debian`` the Debian guest of ``images/debian-guest.sh``:
bash, fio, nvme-cli, the ext4/xfs/btrfs/f2fs tools) under TCG with the appliance's NVMe controller and net ports
attached; its serial console is this terminal (QEMU ``-nographic``: Ctrl-A X
quits).  The shell starts with echo off (the test harness wants it so): type
``stty echo`` for an interactive session.

If nothing answers on the control socket, ``appliance run`` is started in the
background (log in ``{run_dir}/appliance.log``) and stopped again when QEMU
exits, unless ``--keep`` is given.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.runtime.unix import wait_readable

READY = b"appliance: ready"


def _running(cfg: Config) -> bool:
    from appliance.runtime.control import ControlClient

    try:
        with ControlClient(cfg.control.socket, timeout=2.0) as client:
            client("fault.list")
        return True
    except (OSError, ValueError):
        return False


def _start_appliance(cmd: list[str], log_path: str, timeout: float = 30.0) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")  # noqa: SIM115 - the child holds it
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    finally:
        log.close()
    assert proc.stdout is not None
    fd, buf, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while READY not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            proc.wait()
            raise ApplianceError(f"the appliance did not start in {timeout:.0f} s (see {log_path})")
        if not wait_readable(fd, left):
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            raise ApplianceError(f"the appliance exited ({proc.wait()}); see {log_path}")
        buf += chunk
    return proc


def boot(cfg: Config, config_path: str | None, *, append: str = "", smp: int = 1,
         keep: bool = False, dry_run: bool = False, guest_image: str = "busybox") -> int:
    """Boot a guest (``guest_image``: busybox or debian) on the terminal; returns
    QEMU's exit status.

    Raises:
        ApplianceError: no QEMU environment (or no Debian guest), or the appliance
            does not start.
    """
    from appliance.testing.debian import debian_guest, locate_debian
    from appliance.testing.qemu import Guest, qemu_args
    from appliance.testing.qemu_environment import QemuUnavailable, locate_env

    try:
        env = locate_env()
        image = locate_debian(env) if guest_image == "debian" else None
    except QemuUnavailable as exc:
        raise ApplianceError(f"boot: QEMU environment unavailable: {exc} "
                             "(run `sudo scripts/provision`)") from None
    run_cmd = [sys.executable, "-m", "appliance", "run"] + (["-c", config_path] if config_path else [])
    running = _running(cfg)
    args = qemu_args(cfg, net=True)
    devices = args[args.index("-device"):]
    if image is not None:
        guest = debian_guest(env, image, Path(cfg.run_dir), args=devices, append=append, smp=smp,
                             name="boot-guest")
    else:
        guest = Guest(env, Path(cfg.run_dir), args=devices,
                      append=f"qe.shell {append}".strip(), smp=smp, name="boot-guest")
    argv = list(guest.argv)
    i = argv.index("-qmp")
    del argv[i:i + 2]  # no QMP socket: the terminal is the interface
    guest.kill()  # only its argv is used: this removes its socket directory
    if dry_run:
        if not running:
            print("appliance:", " ".join(shlex.quote(a) for a in run_cmd))
        print("qemu:", " ".join(shlex.quote(a) for a in argv))
        return 0
    proc = None
    if not running:
        os.makedirs(cfg.run_dir, mode=0o700, exist_ok=True)
        log_path = os.path.join(cfg.run_dir, "appliance.log")
        proc = _start_appliance(run_cmd, log_path)
        print(f"appliance: started (pid {proc.pid}, log {log_path})", file=sys.stderr)
    print("appliance: guest console follows; Ctrl-A X quits QEMU; `stty echo` in the guest "
          "for an interactive shell", file=sys.stderr, flush=True)
    try:
        return subprocess.call(argv)
    finally:
        if proc is not None and not keep:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

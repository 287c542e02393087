"""Fuzz the live-handoff manifest checks of a destination appliance.

An Appliance (NVMe, ports p0/p1, control socket) runs in this process, idle,
as a handoff destination.  The input is: byte 0, how many fds came with the
stream (0-7: memfds, eventfds, pipe ends); the rest, the HANDOFF record's
payload (the JSON manifest), where ``@TMP@`` stands for this run's directory
(socket paths must be this process's own to pass).  ``parse_handoff`` (the typed
manifest's checker, ``Manifest.from_json``) and ``Appliance.handoff_check``
may only refuse (HandoffError / ApplianceError).  A manifest they pass must
then be adoptable as far as the state goes: the fault set takes it
(``FaultSet.import_state``) and a fresh vfio-user connection takes the
client's state (``ServerConnection.handoff_adopt``), or refuses it with its
own error having adopted nothing.  Every fd is closed again.

    python tests/fuzz/fuzz_handoff.py -max_total_time=20 tests/fuzz/corpus/handoff
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import common

with common.instrumented(__name__):
    from appliance import config
    from appliance.control.fault_rules import FaultError
    from appliance.control.faults import FaultSet
    from appliance.errors import ApplianceError, LocalProtocolError
    from appliance.runtime.app import Appliance
    from appliance.runtime.handoff.frames import HANDOFF_VERSION, Manifest, parse_handoff
    from appliance.testing.process import make_config
    from appliance.vfio_user.migration_stream import Record, RecordType
    from appliance.vfio_user.server import ServerConnection

_tmp = Path(tempfile.mkdtemp(prefix="fuzz-handoff-"))
atexit.register(shutil.rmtree, _tmp, True)
_ports = [{"socket": str(_tmp / "run" / f"p{i}.sock"), "mac": f"52:54:00:00:00:1{i}"}
          for i in range(2)]
_raw = make_config(_tmp, net={"ports": _ports})
_raw["storage"]["namespaces"][0]["size"] = "1M"
APP = Appliance(config.load(overrides=_raw))
APP.loop.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # not ours to take
APP.start()
atexit.register(APP.close)


def manifest_example() -> dict[str, Any]:
    """What a source sends for an appliance like this one, without a client (for
    seeds; this run's directory written as ``@TMP@``)."""
    fds: list[int] = []
    APP.handoff_quiesce()
    try:
        manifest = APP.handoff_export(fds)
    finally:
        APP.handoff_resume()
    return json.loads(json.dumps(manifest.to_json()).replace(str(_tmp), "@TMP@"))


def _check(data: bytes) -> None:
    if not data:
        return
    fds = [common.new_fd(i) for i in range(data[0] % 8)]
    try:
        try:
            payload = data[1:].replace(b"@TMP@", str(_tmp).encode())
            manifest = parse_handoff(Record(RecordType.HANDOFF, payload), len(fds))
            APP.handoff_check(manifest, fds)
        except ApplianceError:
            return
        _adopt_state(manifest, fds)
    finally:
        for fd in fds:
            os.close(fd)


def _adopt_state(manifest: Manifest, fds: list[int]) -> None:
    assert manifest.version == HANDOFF_VERSION and manifest.fds == len(fds)
    if manifest.control is not None:
        try:
            FaultSet(clock=lambda: 0.0).import_state(manifest.control.faults, APP.controller)
        except FaultError as exc:  # only a hung command on a queue the stream did not bring
            assert "does not exist" in str(exc), exc
    client = manifest.vfio_user.client
    if client is None:
        return
    assert APP.controller is not None
    conn = ServerConnection(APP.controller, notify=lambda fd: None)
    try:
        conn.handoff_adopt(client.conn, fds)
    except LocalProtocolError:
        assert not conn.memory.regions and not conn.irq_fds and not conn.irq_mask_fds
    finally:
        conn.close()


one_input = common.checked(_check)

if __name__ == "__main__":
    common.run_fuzzer(one_input)

"""Fuzz the control protocol: request lines (QMP and JSON lines) and the command table (dispatch).

The input is the byte stream a control client sends.  Every line must become
a request or a reply (an error, or QMP's negotiation); every request must end
in a result that encodes as a reply line or in a ControlError (the protocol's
error reply); nothing else may escape.  Once the connection speaks QMP, every
reply is a QMP response: ``return``, or ``error`` with ``class`` and ``desc``.  The target has an NVMe controller (on a fresh 1 MiB image
each time, so a resize does not carry over) and a fault set; no net service
and no handoff ends (those answer "unavailable").

    python tests/fuzz/fuzz_control.py -max_total_time=20 tests/fuzz/corpus/control
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import common

with common.instrumented(__name__):
    from test_nvme_driver import make_controller

    from appliance.control.commands import Target, dispatch
    from appliance.control.faults import FaultSet
    from appliance.control.protocol import ControlConnection, ControlError, answer_ok

_tmp = Path(tempfile.mkdtemp(prefix="fuzz-control-"))
atexit.register(shutil.rmtree, _tmp, True)
MAX_REQUESTS = 32
def _serve(data: bytes) -> None:
    ctrl = make_controller(_tmp, size=1 << 20)
    target = Target(controller=ctrl, faults=FaultSet(clock=lambda: 0.0))
    try:
        _requests(target, data)
    finally:
        ctrl.close()
        (_tmp / "ns1.img").unlink(missing_ok=True)


def _requests(target: Target, data: bytes) -> None:
    conn = ControlConnection()
    conn.receive_data(data)
    for _ in range(MAX_REQUESTS):
        event = conn.next_event()
        if event is None:
            break
        if isinstance(event, bytes):
            _check_reply(conn, event)  # an error reply or QMP's negotiation, one JSON line
            continue
        try:
            _check_reply(conn, answer_ok(event, dispatch(target, event)))
        except ControlError:
            pass


def _check_reply(conn: ControlConnection, line: bytes) -> None:
    reply = json.loads(line)
    assert line.count(b"\n") == 1 and isinstance(reply, dict), line[:200]
    if conn.dialect == conn.QMP:
        assert line.endswith(b"\r\n") and ("return" in reply) != ("error" in reply), line[:200]
        if "error" in reply:
            assert set(reply["error"]) >= {"class", "desc"}, line[:200]


one_input = common.checked(_serve)

if __name__ == "__main__":
    common.run_fuzzer(one_input)

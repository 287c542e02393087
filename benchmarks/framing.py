"""Framing cost: 100,000 small messages through each protocol's receive path.

vfio-user: ``Framer.feed`` (header, then body, as the runtime reads them) and
``next_frame``.  vhost-user: ``BackendConnection.receive_data`` (header, then
payload) with the framed requests dropped, not dispatched.  Prints µs per
message, best of five.  ``python benchmarks/framing.py [N]``.
"""

from __future__ import annotations

import sys
import time

from appliance.net import vhost_wire as vw
from appliance.net.vhost_protocol import BackendConnection
from appliance.vfio_user import wire as w
from appliance.vfio_user.framing import Framer


class _NoDevice:
    name = "bench"
    num_vrings = 2

    def set_memory(self, memory: object) -> None:
        pass


def vfio_user(n: int) -> float:
    body = bytes(24)  # a REGION_WRITE of 4 bytes: access header + data
    head = w.Header(msg_id=1, command=int(w.Command.REGION_WRITE), size=w.HEADER_SIZE + len(body)).pack()
    framer = Framer(max_size=1 << 20)
    start = time.perf_counter()
    for _ in range(n):
        framer.feed(head, [])
        framer.next_frame()
        framer.feed(body, [])
        framer.next_frame()
    return (time.perf_counter() - start) / n * 1e6


def vhost_user(n: int) -> float:
    body = bytes(8)  # SET_FEATURES' u64
    head = vw.Header(request=int(vw.Request.SET_FEATURES), size=len(body)).pack()
    conn = BackendConnection(_NoDevice())  # type: ignore[arg-type]
    queue = conn._messages
    start = time.perf_counter()
    for _ in range(n):
        conn.receive_data(head, [])
        conn.receive_data(body, [])
        queue.clear()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    for name, fn in (("vfio-user", vfio_user), ("vhost-user", vhost_user)):
        best = min(fn(n) for _ in range(5))
        print(f"{name:10s} {best:.3f} µs/message ({n} messages, best of 5)")


if __name__ == "__main__":
    main()

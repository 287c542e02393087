"""Fuzz the vhost-user framing and requests (BackendConnection over a VirtioNetPort).

Any bytes (cut at the connection's own ``bytes_wanted``, a few fds riding
along) end in replies, NACKs, or a RemoteProtocolError and a closed connection.
Once the requests are in, the rings they set up are run both ways (transmit
from the guest, a frame delivered to it), so a memory table and ring addresses
from the fuzzer reach the chain walker too.  The input ends with a guest
memory image and its length (u16): the image is written at the start of the
first mapped region before the rings run, so rings and packets come from the
fuzzer as well.  Nothing else may escape, nothing
may be logged with a traceback, and every fd is closed with the connection.

    python tests/fuzz/fuzz_vhost_user.py -max_total_time=20 tests/fuzz/corpus/vhost_user
"""

from __future__ import annotations

import common

with common.instrumented(__name__):
    from appliance.errors import RemoteProtocolError
    from appliance.net.port import VirtioNetPort
    from appliance.net.vhost_protocol import BackendConnection

MAC = bytes.fromhex("525400000001")
FRAME = bytes.fromhex("ffffffffffff525400000002") + b"\x08\x00" + bytes(50)
MAX_CHUNKS = 256


def with_image(stream: bytes, image: bytes = b"") -> bytes:
    """An input for this harness: the request stream, then the guest memory image."""
    return stream + image + len(image).to_bytes(2, "little")


def _serve(data: bytes) -> None:
    size = int.from_bytes(data[-2:], "little") if len(data) >= 2 else 0
    size = min(size, len(data) - 2) if len(data) >= 2 else 0
    image, data = data[len(data) - 2 - size:len(data) - 2], data[:max(0, len(data) - 2 - size)]
    port = VirtioNetPort("net0", MAC)
    conn = BackendConnection(port, name="net0")
    chunks = common.Chunks(data)
    try:
        for _ in range(MAX_CHUNKS):
            if conn.closed:
                break
            piece = chunks.next(conn.bytes_wanted())
            if piece is None:
                break
            try:
                conn.receive_data(*piece)
            except RemoteProtocolError:
                break
            conn.process()
            conn.data_to_send()
        if not conn.closed:
            regions = [r for r in conn.memory.regions if r.writable]
            if regions and image:
                conn.memory.write(regions[0].address, image[:regions[0].size])
            for index in range(1, len(port.rings), 2):
                port.process_tx(index, 16)
            port.deliver(FRAME)
            port.flush()
    finally:
        conn.close()


one_input = common.checked(_serve)

if __name__ == "__main__":
    common.run_fuzzer(one_input)

"""VfioUserClient.send_parts: one message whose payload is gathered from parts by
sendmsg, whole even when the socket takes it in many pieces."""

from __future__ import annotations

import os
import socket
import threading

from appliance.client.vfio_user import VfioUserClient
from appliance.vfio_user import wire as w


def test_send_parts_is_one_whole_message_through_a_small_socket_buffer() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    head, data = b"H" * 16, os.urandom(3 << 20)
    got = bytearray()

    def drain() -> None:
        while len(got) < w.Header.SIZE + len(head) + len(data):
            chunk = b.recv(65536)
            if not chunk:
                break
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    client = VfioUserClient(a)
    try:
        msg_id = client.send_parts(w.Command.MIG_DATA_WRITE, [head, memoryview(data)[:]])
        reader.join(10)
    finally:
        a.close()
        b.close()
    header = w.Header.unpack(bytes(got[:w.Header.SIZE]))
    assert (header.msg_id, header.command, header.size) == (
        msg_id, w.Command.MIG_DATA_WRITE, len(got))
    assert bytes(got[w.Header.SIZE:]) == head + data

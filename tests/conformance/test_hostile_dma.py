"""A vfio-user client that stops answering DMA messages, against a real ``appliance run``.

The client maps its memory without an fd, so the controller reaches the
queues and data buffers only through DMA_READ/DMA_WRITE messages.  It sets
up queues normally (the driver serves DMA while it waits for replies), then
submits reads and never answers again: nothing else may wait on it, and
after the DMA timeout the appliance disconnects it with one log line.
"""

from __future__ import annotations

import select
import socket
import time

from hostile import HostileTarget, wait_until

from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.storage import spec

NO_REPLY = "DMA message(s)"
DMA_TIMEOUT = 5.0  # the appliance's limit (appliance.runtime.vfio_user.DMA_TIMEOUT)


def no_reply_lines(target: HostileTarget) -> list[str]:
    return [line for line in target.proc.log_text().splitlines()
            if "no reply to" in line and NO_REPLY in line]


def at_eof(client: VfioUserClient) -> bool:
    """The server closed the connection (EOF after whatever it had sent)."""
    try:
        while client.sock.recv(1 << 16, socket.MSG_DONTWAIT):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:  # reset with our unread bytes in its buffer: closed too
        return True


def test_client_that_stops_answering_dma_is_disconnected_once(target: HostileTarget) -> None:
    """Six reads submitted, their DMA messages never answered: control and vhost are
    served within 100 ms meanwhile; about 5 s later one line and a disconnect; then a
    fresh vfio-user client is served."""
    client = VfioUserClient.connect(target.nvme_sock, timeout=10.0)
    driver = NvmeDriver(client, share_memory=False, interrupts=False)
    try:
        driver.setup(io_queues=1, depth=16)
        assert client.dma_requests > 0  # the queues really went through DMA messages
        served = client.dma_requests
        silent_since = time.monotonic()
        for i in range(6):
            prp1, _, _ = driver.buffer(4096)
            driver.submit(1, driver.rw_command(spec.IoOpcode.READ, 1, i * 8, 8, prp1, 0))
        # From here on nothing reads the socket: the server's DMA requests pile up unanswered.
        assert wait_until(lambda: bool(select.select([client.sock], [], [], 0)[0]))  # sent
        target.assert_healthy(vfio_user=False)
        assert not no_reply_lines(target)  # still connected
        assert wait_until(lambda: bool(no_reply_lines(target)), DMA_TIMEOUT + 10)
        waited = time.monotonic() - silent_since
        assert waited >= DMA_TIMEOUT - 0.5, f"disconnected after {waited:.1f} s"
        assert client.dma_requests == served  # we never answered one
        assert wait_until(lambda: at_eof(client), 5)  # the appliance closed our socket
        target.assert_healthy()
        lines = no_reply_lines(target)
        assert len(lines) == 1, lines
    finally:
        driver.close()
        client.close()

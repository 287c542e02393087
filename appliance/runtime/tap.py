"""Open a TAP interface on the host kernel and pump frames (runtime layer).

:func:`open_tap` opens ``/dev/net/tun`` and attaches it to interface ``ifname``
(TUNSETIFF with ``IFF_TAP | IFF_NO_PI``; the kernel creates the interface, which
disappears when the fd is closed).  :class:`TapService` registers the fd with
the loop: each readable event reads up to :data:`BATCH` frames into the
:class:`~appliance.net.tap.TapPort` (and so into the switch), then lets the
switch publish.  Writes are non-blocking; a full kernel queue
(``EAGAIN``) or any other write error drops the frame, which the port counts.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from collections.abc import Callable

from appliance.errors import ApplianceError
from appliance.net.tap import MAX_FRAME, TapPort
from appliance.runtime.loop import EventLoop

log = logging.getLogger("appliance.net")

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
BATCH = 64


def open_tap(ifname: str, path: str = TUN_PATH) -> int:
    """A non-blocking fd attached to TAP interface ``ifname``.

    Raises:
        ApplianceError: the clone device is missing or the ioctl failed (one line
            naming ``net.tap.name``).
    """
    what = f"net.tap.name: cannot create TAP interface {ifname!r}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ApplianceError(f"{what}: {path}: {exc.strerror or exc}") from None
    try:
        ifr = struct.pack(f"{IFNAMSIZ}sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as exc:
        os.close(fd)
        raise ApplianceError(f"{what}: TUNSETIFF: {exc.strerror or exc}") from None
    return fd


class TapService:
    """One TAP fd on the loop, feeding a :class:`TapPort`."""

    def __init__(self, loop: EventLoop, port: TapPort, flush: Callable[[], None],
                 opener: Callable[[str], int] | None = open_tap) -> None:
        """``opener`` None: a handoff destination, which takes the source's fd
        (:meth:`adopt`) instead of attaching to the interface itself."""
        self.loop = loop
        self.port = port
        self._flush = flush
        self.fd: int | None = opener(port.ifname) if opener is not None else None
        self.paused = False
        port.write = self._write
        if self.fd is not None:
            loop.add_reader(self.fd, self._readable)
            log.info("%s: TAP interface %s attached", port.name, port.ifname)

    def _readable(self) -> None:
        if self.paused:  # dispatched in the loop pass that paused us
            return
        try:
            for _ in range(BATCH):
                if self.fd is None:
                    return
                try:
                    frame = os.read(self.fd, MAX_FRAME)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    log.warning("%s: read from %s failed: %s", self.port.name, self.port.ifname, exc)
                    return
                self.port.receive(frame)
        finally:
            self._flush()

    def _write(self, frame: bytes) -> bool:
        if self.fd is None:
            return False
        try:
            return os.write(self.fd, frame) == len(frame)
        except OSError:  # EAGAIN: the kernel queue is full; EIO: interface down
            return False

    # ------------------------------------------------------------ live handoff
    def pause(self) -> None:
        """Stop reading the fd; frames the kernel sends wait in its queue."""
        self.paused = True
        if self.fd is not None:
            self.loop.remove_reader(self.fd)

    def serve(self) -> None:
        """Read the fd again (after :meth:`pause` or :meth:`adopt`)."""
        self.paused = False
        if self.fd is not None:
            self.loop.remove_reader(self.fd)
            self.loop.add_reader(self.fd, self._readable)

    def adopt(self, fd: int) -> None:
        """Use ``fd`` (another process's, attached to the same interface) instead of
        ours; it is read from :meth:`serve` on."""
        if self.fd is not None:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
        self.fd = fd
        log.info("%s: took over TAP interface %s", self.port.name, self.port.ifname)

    def close(self) -> None:
        if self.fd is None:
            return
        self.loop.remove_reader(self.fd)
        os.close(self.fd)
        self.fd = None
        self.port.write = lambda frame: False

    def stats(self) -> dict[str, object]:
        return self.port.stats()

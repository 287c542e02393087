"""The orchestrator's half of the migration data channel (client layer: it blocks).

Sets up the channel both appliances offer through APPLIANCE_MIG_CHANNEL
(docs/migration.md, *Data channel*) before a migration starts:

* same host: a ``socketpair``, one end passed to each appliance with the SET
  (SCM_RIGHTS on its vfio-user socket).  Only a client connected to both
  vfio-user sockets can do that: that is the authentication.
* destination on another host (``ssh://``): the destination listens on a
  per-session Unix socket (LISTEN mode; its path comes back in the SET's
  reply), the orchestrator forwards it over the ssh master connection that
  already carries the vfio-user socket (:meth:`~appliance.client.ssh.SshForward.forward`),
  connects to the local end and passes that socket to the source.

When a side does not offer the channel, or anything of the set-up fails,
both sides are set back to OFF and the migration runs on the standard path;
:func:`setup_channel` returns why.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from appliance.client.vfio_user import VfioUserClient, VfioUserError
from appliance.errors import ApplianceError
from appliance.vfio_user import wire as w
from appliance.vfio_user.wire import ChannelMode, Feature, MigChannel

log = logging.getLogger("appliance.migrate")

MAX_PATH = 108  # sun_path: the longest LISTEN path a reply carries


@dataclass(frozen=True)
class ChannelPlan:
    """How the orchestrator reaches the destination's data channel.

    ``forward``: None when both appliances are on this host (a socketpair);
    else a function that makes the destination's socket path (on its host)
    reachable here and returns the local path (an ssh forward).
    """

    forward: Callable[[str], str] | None = None
    #: same host: makes the (source end, destination end) pair; default a
    #: socketpair (a test puts a relay between the two)
    pair: Callable[[], tuple[socket.socket, socket.socket]] | None = None


def _channel_feature(client: VfioUserClient, flags: int, data: bytes = b"",
                     fds: list[int] | None = None) -> tuple[MigChannel, bytes]:
    argsz = w.DeviceFeatureHead.SIZE + MigChannel.SIZE + MAX_PATH
    head = w.DeviceFeatureHead(argsz=argsz, flags=flags | Feature.APPLIANCE_MIG_CHANNEL)
    _, payload, reply_fds = client.request(w.Command.DEVICE_FEATURE, head.pack() + data, fds)
    for fd in reply_fds:
        socket.close(fd)
    body = payload[w.DeviceFeatureHead.SIZE:]
    if len(body) < MigChannel.SIZE or len(body) > MigChannel.SIZE + MAX_PATH:
        raise VfioUserError(errno.EPROTO, f"APPLIANCE_MIG_CHANNEL reply of {len(body)} bytes")
    return MigChannel.unpack(body), body[MigChannel.SIZE:]


def channel_offered(client: VfioUserClient) -> int:
    """The modes a device offers (bit ``1 << mode``); 0 when it lacks the feature."""
    try:
        reply, _ = _channel_feature(client, w.FEATURE_GET)
    except VfioUserError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.ENOTSUP):
            return 0
        raise
    return reply.offered


def set_channel(client: VfioUserClient, mode: ChannelMode, timeout: float = 0.0,
                fd: int | None = None) -> str:
    """SET the data channel of the device's next session; returns a LISTEN path ("" else).

    Raises:
        VfioUserError: the device refused.
    """
    req = MigChannel(mode=mode, timeout_ms=int(timeout * 1000) if mode else 0)
    reply, path = _channel_feature(client, w.FEATURE_SET, req.pack(),
                                   [fd] if fd is not None else None)
    if reply.mode != mode:
        raise VfioUserError(errno.EPROTO, f"the device took data channel mode {reply.mode}")
    return path.decode("utf-8", errors="replace") if mode is ChannelMode.LISTEN else ""


def setup_channel(src: VfioUserClient, dst: VfioUserClient, plan: ChannelPlan,
                  timeout: float) -> tuple[bool, str]:
    """Give both appliances the channel for their next session.

    ``timeout``: seconds without progress after which an appliance fails the
    channel (less than the orchestrator's own request timeout, so a stalled
    channel surfaces as a refused request).

    Returns:
        (True, how) when both took it; (False, why not) when the migration
        runs on the standard path (both sides set back to OFF).

    Raises:
        VfioUserError, ConnectionError, TimeoutError: a side failed outright.
    """
    need = 1 << (ChannelMode.FD if plan.forward is None else ChannelMode.LISTEN)
    if not channel_offered(src) & (1 << ChannelMode.FD):
        return False, "the source offers no data channel"
    if not channel_offered(dst) & need:
        return False, "the destination offers no data channel"
    try:
        if plan.forward is None:
            how = "same host"
            a, b = (plan.pair or socket.socketpair)()
        else:
            how = "ssh forward"
            remote = set_channel(dst, ChannelMode.LISTEN, timeout)
            if not remote.startswith("/"):
                raise VfioUserError(errno.EPROTO, f"data channel path {remote!r}")
            local = plan.forward(remote)
            a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            b = None
            try:
                a.settimeout(timeout)
                a.connect(local)
            except OSError:
                a.close()
                raise
        with a:
            set_channel(src, ChannelMode.FD, timeout, a.fileno())
            if b is not None:
                with b:
                    set_channel(dst, ChannelMode.FD, timeout, b.fileno())
    except (VfioUserError, OSError, ValueError, ApplianceError) as exc:
        for side in (src, dst):
            try:
                set_channel(side, ChannelMode.OFF)
            except VfioUserError as again:
                log.warning("data channel: could not turn it off again: %s", again)
        if isinstance(exc, VfioUserError) and exc.errno == errno.ENOTSUP:
            return False, ("a device's data cannot use a data channel (a namespace has "
                           "metadata or was created at run time; its log says which)")
        return False, f"data channel set-up failed: {exc}"
    return True, how

"""The package's root exception and the kinds of error below it: each says whose
fault it is and how it reaches the wire.

=========================  ==========================================  ===================================
kind                       means                                       on the wire
=========================  ==========================================  ===================================
:class:`LocalProtocolError`  a peer's request is invalid (reject it)     its errno (vfio-user), a NACK (vhost-user)
:class:`RemoteProtocolError` the peer broke the protocol for good        the connection is closed
:class:`StreamRefused`       a migration stream / handoff manifest is   its errno (MIG_DATA_WRITE), a refusal
                             refused; nothing of it is adopted           (handoff)
``CommandError``             an NVMe command fails (storage/spec.py)    its NVMe status (+DNR) in the CQE
:class:`ConfigError`         a configuration value is invalid           one line naming the key, exit 2
=========================  ==========================================  ===================================

The kinds do not derive from one another, so a device error escaping into a
protocol's dispatch is never mistaken for a peer's bad request (an EINVAL reply);
what no handler catches is a bug and is logged as one.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Root of every error the appliance raises on purpose."""


class LocalProtocolError(ApplianceError):
    """A peer's message or a requested transition is invalid: reject it.

    Attributes:
        errno: the errno a vfio-user error reply should carry (0 if none).
    """

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class RemoteProtocolError(ApplianceError):
    """The peer violated the protocol in a way that ends the connection."""


class StreamRefused(ApplianceError):
    """A migration stream or a live-handoff manifest is refused (all or nothing).

    Attributes:
        errno: what a vfio-user MIG_DATA_WRITE error reply carries.
    """

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class ConfigError(ApplianceError):
    """A configuration value is invalid; the message names the key's path."""


class StartupError(ApplianceError):
    """The process cannot start as configured (a path, an image, a socket in use);
    the message starts with the config key, as :class:`ConfigError`'s does."""

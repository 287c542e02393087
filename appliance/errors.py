"""The package's root exception and its two branches.

Internals raise :class:`LocalProtocolError` (we detected a problem in what a
peer sent us, or in our own state); the receive entry points of each protocol
reclassify as :class:`RemoteProtocolError` when reporting a peer's fault.  Each
protocol maps these to its own wire error (errno, NVMe status, NACK).
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Root of every error the appliance raises on purpose."""


class LocalProtocolError(ApplianceError):
    """A peer's message or a requested transition is invalid.

    Attributes:
        errno: the errno a vfio-user error reply should carry (0 if none).
    """

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class RemoteProtocolError(ApplianceError):
    """The peer violated the protocol in a way that ends the connection."""


class ConfigError(ApplianceError):
    """A configuration value is invalid; the message names the key's path."""


class StartupError(ApplianceError):
    """The process cannot start as configured (a path, an image, a socket in use);
    the message starts with the config key, as :class:`ConfigError`'s does."""

"""NBD URIs (the NBD project's URI syntax, the subset a namespace's ``image`` takes).

* ``nbd://HOST[:PORT]/EXPORT``: TCP, port 10809 by default;
* ``nbd+unix:///EXPORT?socket=PATH``: a Unix socket.

The export name is the path without its leading ``/`` (percent-decoded; empty
is the server's default export).  TLS schemes (``nbds``, ``nbds+unix``) and
any other query parameter are refused: nothing is guessed.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from appliance.nbd.wire import MAX_STRING

DEFAULT_PORT = 10809
SCHEMES = ("nbd", "nbd+unix")


@dataclass(frozen=True)
class NbdUri:
    """Where an export is: a Unix socket path, or a TCP host and port."""

    export: str
    socket: str | None = None  # the Unix socket's path; None: TCP
    host: str = ""
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        name = urllib.parse.quote(self.export)
        if self.socket is not None:
            return f"nbd+unix:///{name}?socket={urllib.parse.quote(self.socket)}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{name}"


def is_nbd_uri(text: str) -> bool:
    """Whether ``text`` is meant as an NBD URI (its scheme starts with ``nbd``)."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower().startswith("nbd")


def parse(text: str) -> NbdUri:
    """The export ``text`` names.

    Raises:
        ValueError: one line saying what is wrong with it.
    """
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not an NBD URI: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"scheme {parts.scheme!r} not one of {', '.join(SCHEMES)} (no TLS)")
    if parts.fragment:
        raise ValueError("an NBD URI has no #fragment")
    export = urllib.parse.unquote(parts.path.removeprefix("/"))
    if len(export.encode()) > MAX_STRING or "\0" in export:
        raise ValueError(f"export name longer than {MAX_STRING} bytes or with a NUL")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    if scheme == "nbd+unix":
        if parts.netloc:
            raise ValueError("nbd+unix:// takes no host (nbd+unix:///EXPORT?socket=PATH)")
        sockets = query.pop("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise ValueError("nbd+unix:// needs one ?socket=PATH")
        if query:
            raise ValueError(f"unknown query parameter {min(query)!r} (only socket=)")
        return NbdUri(export=export, socket=sockets[0])
    if query:
        raise ValueError(f"unknown query parameter {min(query)!r} (nbd:// takes none)")
    if not parts.hostname:
        raise ValueError("nbd:// needs a host (nbd://HOST[:PORT]/EXPORT)")
    if parts.username or parts.password:
        raise ValueError("nbd:// takes no user name or password")
    return NbdUri(export=export, host=parts.hostname,
                  port=DEFAULT_PORT if port is None else port)

"""The helpers every peer protocol shares: one rejection, one check, one state
step, one way to drop a received fd.

* :class:`Reject` / :func:`require`: a peer's request is refused. The protocol
  that catches it puts ``errno`` on its own wire (a vfio-user error reply, a
  vhost-user NACK); nothing here decides how a refusal looks.
* :func:`step`: one transition of a literal state table (state → {event: next});
  a missing pair raises the caller's error, naming the state and the event.
* :func:`close_quietly`: close an fd a peer sent us (or one we own) on a path
  where it may already be closed.

Stdlib and :mod:`appliance.errors` only, so every layer above may use it.
"""

from __future__ import annotations

import enum
import errno as _errno
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from appliance.errors import LocalProtocolError

S = TypeVar("S")
E = TypeVar("E")


class Reject(LocalProtocolError):
    """A peer's request is refused; ``errno`` is what the protocol's error reply
    (vfio-user) or NACK (vhost-user) carries."""


def require(cond: bool, err: int, message: str) -> None:
    """Refuse the request unless ``cond`` holds.

    Raises:
        Reject: ``message`` with errno ``err`` when ``cond`` is false.
    """
    if not cond:
        raise Reject(message, err)


def einval(cond: bool, message: str) -> None:
    """:func:`require` with EINVAL, the errno of most malformed requests.

    Raises:
        Reject: ``message`` with EINVAL when ``cond`` is false.
    """
    if not cond:
        raise Reject(message, _errno.EINVAL)


def _label(value: object) -> str:
    return str(value.value) if isinstance(value, enum.Enum) else str(value)


def step(table: Mapping[S, Mapping[E, S]], state: S, event: E,
         error: Callable[[str], Exception] = LocalProtocolError, where: str = "") -> S:
    """The state ``table`` moves ``state`` to on ``event``.

    Returns:
        The next state.

    Raises:
        The exception ``error(message)`` builds (LocalProtocolError by default),
        its message ``"<where>: in state <state>, <event> is not allowed"``, when the
        table has no entry for (state, event).
    """
    try:
        return table[state][event]
    except KeyError:
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}in state {_label(state)}, {_label(event)} is not allowed") from None


def close_quietly(fd: int) -> None:
    """Close ``fd``, ignoring one that is already closed (or was never valid)."""
    try:
        os.close(fd)
    except OSError:
        pass


def dup_all(fds: list[int], refs: Sequence[int]) -> list[int]:
    """Our own copies of ``fds[i]`` for each index (all or none).

    Raises:
        OSError: one could not be duplicated (the others are closed).
    """
    out: list[int] = []
    try:
        for i in refs:
            out.append(os.dup(fds[i]))
    except OSError:
        for fd in out:
            close_quietly(fd)
        raise
    return out

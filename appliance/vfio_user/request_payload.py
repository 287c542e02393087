"""Reading a vfio-user request's payload (protocol layer, sans-I/O): its fixed
structure, a range checked against a size, the command's name for messages.
"""

from __future__ import annotations

import errno
from typing import TypeVar

from appliance.protocol_common import require
from appliance.vfio_user import wire as w
from appliance.vfio_user.framing import Frame
from appliance.wire import Struct

S = TypeVar("S", bound=Struct)


def fits(offset: int, count: int, size: int) -> bool:
    """Whether ``count`` items from ``offset`` lie within ``size`` (none negative)."""
    return 0 <= offset and 0 <= count and offset + count <= size


def request_struct(frame: Frame, cls: type[S]) -> S:
    """The fixed structure at the start of ``frame``'s payload.

    Bytes after it are ignored: "The *request* payload size is defined by the
    usual ``msg_size`` field in the header, not the ``argsz`` field"
    (docs/interop/vfio-user.rst, Message sizes), and libvfio-user reads each
    request by its structure; a client that sends its whole ``argsz`` buffer
    is served.

    Raises:
        Reject: EINVAL when the payload is shorter than the structure.
    """
    name = command_name(frame.header.command)
    require(len(frame.payload) >= cls.SIZE, errno.EINVAL,
            f"{name} payload of {len(frame.payload)} bytes, the request needs {cls.SIZE}")
    return cls.unpack(frame.payload)


def command_name(command: int) -> str:
    """The command's name, or ``cmd<number>`` for a number no command has."""
    try:
        return w.Command(command).name
    except ValueError:
        return f"cmd{command}"

"""The shared protocol helpers: one rejection, one state step, one fd closer."""

from __future__ import annotations

import enum
import errno
import os

import pytest

from appliance.errors import LocalProtocolError
from appliance.protocol_common import Reject, close_quietly, require, step


class Light(enum.Enum):
    OFF = "off"
    ON = "on"


TABLE = {Light.OFF: {"press": Light.ON}, Light.ON: {"press": Light.OFF, "unplug": Light.OFF}}


def test_require_passes_and_rejects_with_errno() -> None:
    require(True, errno.EINVAL, "never raised")
    with pytest.raises(Reject) as info:
        require(False, errno.ENOTSUP, "not supported")
    assert info.value.errno == errno.ENOTSUP
    assert str(info.value) == "not supported"
    assert isinstance(info.value, LocalProtocolError)


def test_step_follows_the_table() -> None:
    assert step(TABLE, Light.OFF, "press") is Light.ON
    assert step(TABLE, Light.ON, "unplug") is Light.OFF


def test_step_refusal_names_state_and_event_with_the_callers_error() -> None:
    class Mine(Exception):
        pass

    with pytest.raises(Mine, match=r"^lamp: in state off, unplug is not allowed$"):
        step(TABLE, Light.OFF, "unplug", Mine, where="lamp")
    with pytest.raises(LocalProtocolError, match="in state off, unplug"):
        step(TABLE, Light.OFF, "unplug")


def test_close_quietly_closes_once_and_ignores_a_closed_fd() -> None:
    r, w = os.pipe()
    close_quietly(r)
    close_quietly(r)  # already closed: no error
    close_quietly(-1)
    with pytest.raises(OSError):
        os.fstat(r)
    os.close(w)

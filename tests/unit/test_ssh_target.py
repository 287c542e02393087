"""``ssh://`` sockets of ``appliance migrate``: what names another host's socket."""

from __future__ import annotations

import pytest

from appliance.client.ssh import SshTarget, parse_target
from appliance.errors import ApplianceError


def test_targets() -> None:
    assert parse_target("/run/appliance/nvme.sock") is None
    assert parse_target("ssh://root@10.0.0.2/run/nvme.sock") == SshTarget(
        host="10.0.0.2", path="/run/nvme.sock", user="root")
    t = parse_target("ssh://host:2222/a%20b/nvme.sock")
    assert t == SshTarget(host="host", path="/a b/nvme.sock", port=2222)
    assert t.destination == "host"


@pytest.mark.parametrize("text", ["ssh://host", "ssh:///x.sock", "ssh://host/x?y=1",
                                  "ssh://-oProxyCommand=x/x.sock", "ssh://host:99999/x"])
def test_bad_targets(text: str) -> None:
    with pytest.raises(ApplianceError):
        parse_target(text)

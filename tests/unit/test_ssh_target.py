"""``ssh://`` sockets of ``appliance migrate``: what names another host's socket."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from appliance.client.ssh import SshForward, SshTarget, parse_target
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


@pytest.mark.parametrize("text", ["ssh://host/run/x:22", "ssh://host/run/a:b.sock",
                                  "ssh://root:secret@host/x.sock"])
def test_targets_ssh_cannot_forward_as_written(text: str) -> None:
    # ssh's -L LOCAL:REMOTE has no way to quote ':' (a path "/run/x:22" would
    # be a TCP forward to a host named "/run/x"); a password is never used.
    with pytest.raises(ApplianceError, match="':'|password"):
        parse_target(text)


def test_a_forwarded_path_with_a_colon_is_refused_before_ssh_runs(tmp_path: Path) -> None:
    # The destination's LISTEN reply names the path: a hostile one must not
    # turn the forward into another kind.
    ran = tmp_path / "ran"
    fwd = SshForward(SshTarget(host="h", path="/x.sock"), ssh=[sys.executable, "-c", "import sys; open(sys.argv[1], 'w')", str(ran)])
    fwd.dir = str(tmp_path)
    with pytest.raises(ApplianceError, match="':'"):
        fwd.forward("/run/migch-x/data.sock:10.0.0.1:22")
    assert not ran.exists()

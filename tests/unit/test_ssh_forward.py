"""``SshForward`` against a stand-in ssh: the master, the session that turns
Nagle off at the server, and what a refused or stuck session costs."""

from __future__ import annotations

import json
import logging
import os
import sys
import textwrap
from pathlib import Path

import pytest

from appliance.client import ssh as ssh_mod
from appliance.client.ssh import SshForward, SshTarget

# A stand-in for ssh: logs its argv; the master (-M) makes the local socket's
# path; a session (a command after the destination) behaves as SESSION says.
FAKE_SSH = textwrap.dedent("""
    import json, os, sys, time
    args = sys.argv[1:]
    with open(os.environ["FAKE_SSH_LOG"], "a") as f:
        f.write(json.dumps(args) + "\\n")
    if "-M" in args:
        local = args[args.index("-L") + 1].split(":")[0]
        open(local, "w").close()
        open(args[args.index("-S") + 1], "w").close()
        sys.exit(0)
    if "-O" in args:
        sys.exit(0)
    how = os.environ.get("FAKE_SSH_SESSION", "ok")
    if how == "refused":
        print("Connection to host closed by remote host.", file=sys.stderr)
        sys.exit(255)
    if how == "stuck":
        time.sleep(60)
    sys.exit(0)
""")


@pytest.fixture
def fake_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[tuple[str, ...], Path]:
    script = tmp_path / "ssh.py"
    script.write_text(FAKE_SSH)
    log = tmp_path / "argv.log"
    monkeypatch.setenv("FAKE_SSH_LOG", str(log))
    return (sys.executable, str(script)), log


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


TARGET = SshTarget(host="10.88.0.2", path="/run/appliance/nvme.sock", user="root")


def test_open_runs_one_session_after_the_master(fake_ssh: tuple[tuple[str, ...], Path]) -> None:
    ssh, log = fake_ssh
    with SshForward(TARGET, ["IdentityFile=/k"], ssh=ssh) as fwd:
        assert Path(fwd.local).exists()
        assert fwd.nodelay() is True  # and again, on demand
    master, session, again, exit_ = calls(log)
    assert "-M" in master and "-N" in master
    assert session[-2:] == ["root@10.88.0.2", "true"] and session[-3] == "--"
    assert "-M" not in session and "-N" not in session and "-L" not in session
    assert session[session.index("-S") + 1] == master[master.index("-S") + 1]
    assert "IdentityFile=/k" in session and "BatchMode=yes" in session
    assert "ControlMaster=no" in session  # the master's connection, never a new one
    assert again == session
    assert exit_[exit_.index("-O") + 1] == "exit"


def test_no_session_when_asked(fake_ssh: tuple[tuple[str, ...], Path]) -> None:
    ssh, log = fake_ssh
    with SshForward(TARGET, ssh=ssh, session=False):
        pass
    assert [c for c in calls(log) if c[-1] == "true"] == []


def test_a_refused_session_is_logged_not_an_error(fake_ssh: tuple[tuple[str, ...], Path],
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    ssh, _ = fake_ssh
    monkeypatch.setenv("FAKE_SSH_SESSION", "refused")
    with caplog.at_level(logging.INFO, logger="appliance.client.ssh"), \
            SshForward(TARGET, ssh=ssh) as fwd:
        assert Path(fwd.local).exists()
    assert "the session failed (Connection to host closed by remote host.)" in caplog.text


def test_a_stuck_session_costs_its_timeout_only(fake_ssh: tuple[tuple[str, ...], Path],
                                                monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    ssh, _ = fake_ssh
    monkeypatch.setenv("FAKE_SSH_SESSION", "stuck")
    monkeypatch.setattr(ssh_mod, "SESSION_TIMEOUT", 0.5)
    with caplog.at_level(logging.INFO, logger="appliance.client.ssh"), \
            SshForward(TARGET, ssh=ssh) as fwd:
        assert fwd.nodelay() is False
    assert "no session" in caplog.text


@pytest.mark.parametrize("flag, sessions", [([], 1), (["--no-ssh-session"], 0)])
def test_the_cli_flag_reaches_the_forward(fake_ssh: tuple[tuple[str, ...], Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str],
                                          flag: list[str], sessions: int) -> None:
    # `appliance migrate ssh://...` runs the session unless --no-ssh-session;
    # the stand-in's "socket" is a plain file, so the connect fails after it.
    from appliance.cli import main

    _, log = fake_ssh
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text(f"#!{sys.executable}\n" + FAKE_SSH)
    (bindir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    status = main(["migrate", "ssh://root@h/run/nvme.sock", str(tmp_path / "none.sock"),
                   *flag])
    assert status == 2
    assert "source ssh://root@h/run/nvme.sock" in capsys.readouterr().err
    assert len([c for c in calls(log) if c[-1] == "true"]) == sessions


def test_no_session_before_the_master(fake_ssh: tuple[tuple[str, ...], Path]) -> None:
    ssh, log = fake_ssh
    assert SshForward(TARGET, ssh=ssh).nodelay() is False
    assert not log.exists()  # ssh never ran

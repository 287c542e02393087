"""`appliance --help` names every command, one line each."""

from __future__ import annotations

import argparse

import pytest

from appliance.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    raise AssertionError("no subcommands")


def test_help_lists_every_command_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    commands = _commands(parser)
    assert len(commands) >= 7
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: appliance [-h] COMMAND ...")
    lines = out.splitlines()
    for name in commands:
        rows = [line for line in lines if line.split()[:1] == [name] and line.startswith("  ")]
        assert len(rows) == 1, (name, out)
        assert len(rows[0].split()) > 2  # the name and a description on the same line


def test_unknown_command_is_one_error_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "appliance: error: argument COMMAND: invalid choice: 'no-such-command'" in err


def test_version_is_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    import appliance

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"appliance {appliance.__version__}\n"
    assert appliance.__version__ != "0+unknown"  # installed: the metadata answers

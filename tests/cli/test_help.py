"""`conveyor --help` describes every command and flag; `--version` prints
the release from the package metadata."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata

from conveyor_cli.main import CLIENT_COMMANDS, _parser

# backup.py (another module's owner) names its FILE positional in the
# command's own help line ("write the database to FILE").
DESCRIBED_ELSEWHERE = {("backup", "file"), ("restore", "file")}


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str | None]]:
    """Every (command path, its parser, its one-line help) below ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in action._choices_actions}
            for name, child in action.choices.items():
                yield (*path, name), child, helps.get(name)
                yield from _commands(child, (*path, name))


def test_every_command_and_flag_has_a_one_line_help() -> None:
    missing = []
    commands = list(_commands(_parser()))
    assert len(commands) > 30
    for path, parser, help_text in commands:
        if not help_text or "\n" in help_text:
            missing.append(" ".join(path))
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            if (path[-1], action.dest) in DESCRIBED_ELSEWHERE:
                continue
            if not action.help or "\n" in action.help:
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_every_client_command_is_reachable_from_the_parser() -> None:
    paths = {path for path, _, _ in _commands(_parser())}
    for group, sub in CLIENT_COMMANDS:
        assert ((group, sub) if sub else (group,)) in paths


def test_version_prints_the_installed_release() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "conveyor_cli.main", "--version"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0
    assert done.stdout.strip() == f"conveyor {metadata.version('conveyor')}"


def test_top_level_help_describes_each_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "conveyor_cli.main", "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0
    for line in ("builds ", "logs ", "runners ", "tokens "):
        found = [x for x in done.stdout.splitlines() if x.strip().startswith(line)]
        assert found, line
        assert len(found[0].split()) > 2, found[0]

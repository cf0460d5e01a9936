"""The ``svcard`` command tree: every system registers its commands on the one root group."""

from __future__ import annotations

import re

import click
from click.testing import CliRunner

from svcard.host.cli.main import main


def listed_commands(*path: str) -> list[str]:
    """The command names ``svcard PATH... --help`` lists under "Commands:"."""
    result = CliRunner().invoke(main, [*path, "--help"], prog_name="svcard")
    assert result.exit_code == 0, result.output
    section = result.output.split("Commands:\n", 1)[1]
    return [m.group(1) for line in section.splitlines()
            if (m := re.match(r"  (\S+)", line))]


def test_root_help_lists_every_command() -> None:
    assert listed_commands() == [
        "apdu", "audit", "bank", "batches", "card", "clearing", "demo", "device", "goods", "helper",
        "load", "pay", "readers", "serve", "session", "sp", "terminal", "terminal-key", "trace",
        "wallet"]


def test_serve_lists_every_server() -> None:
    assert listed_commands("serve") == [
        "bank", "goods-auth", "goods-bank", "goods-fulfil", "goods-merchant", "goods-payment",
        "load", "merchant", "payment", "sp", "trade-account-manager", "trade-acquirer",
        "trade-merchant", "trade-merchant-account", "wallet-fin", "wallet-gateway", "wallet-van",
        "wallet-web"]


def test_every_command_has_help() -> None:
    def walk(command: click.Command, path: list[str]) -> list[list[str]]:
        found = [path]
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                found += walk(sub, [*path, name])
        return found

    for path in walk(main, []):
        result = CliRunner().invoke(main, [*path, "--help"], prog_name="svcard")
        assert result.exit_code == 0, (path, result.output)
        assert result.output.startswith(f"Usage: svcard {' '.join(path)}".rstrip()), path

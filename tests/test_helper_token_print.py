"""``svcard helper`` prints its pairing token only when it makes it (or with ``--show-token``), so
the logs of later starts (a user service, nohup) do not hold the credential."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from svcard.host.demo.system import card_image
from svcard.host.kit.serving import free_port

SVCARD = str(Path(sys.executable).parent / "svcard")


def start_output(tmp_path: Path, token_file: Path, *extra: str) -> str:
    """What ``svcard helper`` prints before it serves (read until its banner ends), then
    stopped."""
    card = card_image(tmp_path, "card.json")
    proc = subprocess.Popen(
        [SVCARD, "helper", "--card", f"virtual:{card}", "--allow-origin",
         "http://127.0.0.1:8081", "--port", str(free_port()), "--token-file", str(token_file),
         "--journal", str(tmp_path / "journal.jsonl"), *extra],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "HOME": str(tmp_path)})
    lines: list[str] = []
    deadline = time.monotonic() + 30
    try:
        assert proc.stderr is not None
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith(("pairing token kept", "enter it once")):
                break
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return "".join(lines)


def test_the_token_is_printed_when_made_and_not_on_later_starts(tmp_path: Path) -> None:
    token_file = tmp_path / "state" / "helper-token"
    first = start_output(tmp_path, token_file)
    token = token_file.read_text().strip()
    assert token and token in first, first
    again = start_output(tmp_path, token_file)
    assert token not in again and "--show-token prints it" in again, again
    shown = start_output(tmp_path, token_file, "--show-token")
    assert token in shown, shown

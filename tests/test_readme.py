"""README.md copy-pasted: every fenced ``sh`` block runs, in order, in one fresh folder that holds
a copy of ``fixtures/`` (as a clone does), with this venv's ``svcard`` first on PATH and HOME in
the temporary folder. A block fails the test on any failing command (``set -euo pipefail``) or a
traceback on stderr.

A command ending in ``&`` starts a server in the background; the test then waits (with a
deadline) until that server's port takes connections, as a person waits for the log line before
typing the next command. Servers run until the last block is done, then their process groups
are stopped.

A block may be left out only by an HTML comment on the line before it,
``<!-- readme-test: skip: REASON -->``; the reasons say where else those commands are tested
(the quick start is what CI itself runs; the PC/SC commands need root and the system's pcscd).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"<!--\s*readme-test:\s*skip:\s*(.+?)\s*-->")
BACKGROUND = re.compile(r"&\s*(#.*)?$")
DEFAULT_PORTS = {"payment": 8080, "merchant": 8081, "bank": 8083, "load": 8084, "sp": 8085}
BLOCK_SECONDS = 180


@dataclass
class Block:
    line: int
    text: str
    skip: str | None


def readme_blocks(text: str) -> list[Block]:
    """The fenced ``sh`` blocks of ``text``, each with its first line number and skip reason."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```sh":
            before = lines[i - 1] if i else ""
            skip = SKIP.search(before)
            start = i + 1
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                i += 1
            blocks.append(Block(start + 1, "\n".join(lines[start:i]),
                                skip.group(1) if skip else None))
        i += 1
    return blocks


def commands(block: str) -> list[str]:
    """The block's commands, continuation lines (``\\`` at the end) joined."""
    out: list[str] = []
    pending = ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return [c for c in out if c.strip()]


def server_port(command: str) -> int | None:
    """The port a backgrounded ``svcard serve KIND`` (or ``svcard helper``) listens on."""
    given = re.search(r"--port[ =](\d+)", command)
    if given:
        return int(given.group(1))
    kind = re.search(r"svcard\s+serve\s+(\w+)", command)
    return DEFAULT_PORTS.get(kind.group(1)) if kind else None


def script(block: str) -> str:
    """A bash script for ``block``: strict, and after each backgrounded server a wait for its
    port (at most 30 s)."""
    lines = ["set -euo pipefail",
             "__ready() { for _ in $(seq 300); do "
             "(exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; "
             "echo \"readme-test: nothing listens on port $1 after 30 s\" >&2; return 1; }"]
    for command in commands(block):
        lines.append(command)
        if BACKGROUND.search(command):
            port = server_port(command)
            if port is None:
                raise AssertionError(f"a background command whose port is unknown: {command}")
            lines.append(f"__ready {port}")
    return "\n".join(lines) + "\n"


def test_the_block_reader_sees_skips_continuations_and_servers() -> None:
    text = ("intro\n<!-- readme-test: skip: needs root -->\n```sh\nsudo x\n```\n"
            "```sh\nsvcard serve payment --config c.toml &\nsvcard pay \\\n  URL --card C\n```\n")
    blocks = readme_blocks(text)
    assert [b.skip for b in blocks] == ["needs root", None]
    assert commands(blocks[1].text) == ["svcard serve payment --config c.toml &",
                                        "svcard pay    URL --card C"]
    assert "__ready 8080" in script(blocks[1].text)
    assert server_port("svcard serve bank --port 9001 &") == 9001


def test_every_readme_shell_block_works_when_pasted(tmp_path: Path) -> None:
    work, home = tmp_path / "work", tmp_path / "home"
    home.mkdir()
    shutil.copytree(ROOT / "fixtures", work / "fixtures")
    env = {**os.environ, "HOME": str(home),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("SVCARD_DEBUG", None)
    groups: list[subprocess.Popen[str]] = []
    ran = 0
    try:
        for n, block in enumerate(readme_blocks((ROOT / "README.md").read_text())):
            if block.skip:
                continue
            path = tmp_path / f"block{n}.sh"
            path.write_text(script(block.text))
            # files, not pipes: a backgrounded server keeps its output open after bash exits
            out_path, err_path = tmp_path / f"block{n}.out", tmp_path / f"block{n}.err"
            with out_path.open("w") as out_f, err_path.open("w") as err_f:
                proc = subprocess.Popen(["bash", str(path)], cwd=work, env=env, text=True,
                                        stdout=out_f, stderr=err_f, start_new_session=True)
            groups.append(proc)
            where = f"README.md block at line {block.line}"
            try:
                proc.wait(timeout=BLOCK_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail(f"{where} ran over {BLOCK_SECONDS} s\n--- stdout\n"
                            f"{out_path.read_text()}\n--- stderr\n{err_path.read_text()}")
            out, err = out_path.read_text(), err_path.read_text()
            assert proc.returncode == 0, f"{where} failed\n--- stdout\n{out}\n--- stderr\n{err}"
            assert "Traceback" not in err, f"{where} printed a traceback\n{err}"
            ran += 1
    finally:
        for proc in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    assert ran >= 4, "the README lost its runnable examples"

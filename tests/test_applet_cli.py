"""``svcard card applet``: the IEP applet built and personalised from a card image, then used
as a card by the CLI through the ``jcardsim:`` reader spec it prints."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import demo_image, with_balance

from svcard.card.image import save_new_image
from svcard.host.cli.main import main

BCPROV = "/usr/share/java/bcprov.jar"


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.output


def images(tmp_path: Path) -> tuple[Path, Path]:
    card, psam = tmp_path / "card.json", tmp_path / "psam.json"
    iep = with_balance(demo_image("iep"), 5000)
    save_new_image(card, iep)
    save_new_image(psam, demo_image("psam"))
    return card, psam


def test_refusals_name_the_problem(tmp_path: Path) -> None:
    card, psam = images(tmp_path)
    code, text = run("card", "applet", str(card), "--out", str(tmp_path / "a"),
                     env={"JCARDSIM_JAR": ""})
    assert code == 2 and "--jar" in text
    code, text = run("card", "applet", str(psam), "--out", str(tmp_path / "a"), "--jar", "x.jar")
    assert code == 3 and "a psam image; the applet is a purse card" in text
    code, text = run("card", "applet", str(card), "--out", str(tmp_path / "a"),
                     "--jar", str(tmp_path / "none.jar"))
    assert code == 3 and "none.jar: no such jar" in text
    assert not (tmp_path / "a" / "perso.apdu").exists()


def test_the_printed_spec_pays_with_the_applet(tmp_path: Path) -> None:
    jar = os.environ.get("JCARDSIM_JAR")
    if not jar or shutil.which("javac") is None:
        pytest.skip("JCARDSIM_JAR is not set (or no javac): the applet runs in jCardSim")
    pytest.importorskip("jpype")
    card, psam = images(tmp_path)
    before = card.read_bytes()
    code, text = run("card", "applet", str(card), "--out", str(tmp_path / "app"), "--json",
                     "--jar", jar)
    assert code == 0, text
    built = json.loads(text)
    script = Path(built["script"])
    assert stat.S_IMODE(script.stat().st_mode) == 0o600   # it holds the card's keys
    assert card.read_bytes() == before                      # the image is only read
    classpath = os.pathsep.join([built["classes"], *([BCPROV] if Path(BCPROV).exists() else [])])
    # a process of its own: one JVM per process, with this class path
    done = subprocess.run(
        [sys.executable, "-m", "svcard.host.cli", "terminal", "purchase", "--card",
         built["reader_spec"], "--psam", f"virtual:{psam}", "--amount", "12.34", "--json"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "JCARDSIM_JAR": jar, "JCARDSIM_CLASSPATH": classpath})
    assert done.returncode == 0, done.stderr
    receipt = json.loads(done.stdout)
    assert receipt["balance_before"] == 5000 and receipt["balance_after"] == 3766, receipt

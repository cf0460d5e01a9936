"""Differential testing: random APDU sequences to the Python IEP and to svcard's Java Card
applet (in jCardSim), personalised alike, every answer compared (tests/diffgen.py).

``--diff-count N`` / ``SVCARD_DIFF_COUNT`` sets the APDUs (default 1000, about a second);
``--diff-seed S`` / ``SVCARD_DIFF_SEED`` the seed (default 20261122). A mismatch prints the seed,
the APDU's number, both answers and what came before; the same seed and count replay it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import diffgen as D
import pytest
from conftest import AppletCards


def other_python(image: dict[str, Any]) -> D.Side:
    return D.python_side(image, "other")


def applet_opener(applet: AppletCards) -> D.Opener:
    """The applet; every other personalisation with its own DES-CBC MAC (install flag)."""
    opened = [0]

    def open_side(image: dict[str, Any]) -> D.Side:
        opened[0] += 1
        card = applet.open(image, cbc_mac=opened[0] % 2 == 0)
        return D.Side("applet", card.transmit, card.reset, card.close,
                      D.JCardSimRuntime(bytes.fromhex(image["app"]["aid"]), D.APPLET_LEFT_OUT))
    return open_side


def test_python_card_against_the_applet(iep_applet: AppletCards, diff_count: int,
                                        diff_seed: int) -> None:
    print(f"differential run: seed {diff_seed}, {diff_count} APDUs")
    stats = D.run(D.python_side, applet_opener(iep_applet), diff_count, diff_seed)
    assert stats.apdus == diff_count
    print(f"{stats.episodes} personalisations; status words {stats.status_words}")


def test_two_python_cards_agree(diff_count: int, diff_seed: int) -> None:
    """The harness itself: two copies of the reference never differ, and the run is rich
    (valid purchases and loads, MAC failures, locked keys, refusals of every kind)."""
    stats = D.run(D.python_side, other_python, max(diff_count, 2000), diff_seed)
    for sw in ("9000", "9302", "6983", "6985", "6A86", "6700", "6982", "9401", "9403", "6D00",
               "6E00", "6A82", "6A83", "6C17", "63C2", "6A80"):
        assert sw in stats.status_words, sw
    labels = stats.labels
    assert labels["debit"] > 100 and labels["credit"] > 100 and stats.resets > 10


def test_the_same_seed_replays_the_same_run() -> None:
    sent: list[list[bytes]] = [[], []]

    def recording(n: int) -> D.Opener:
        def open_side(image: dict[str, Any]) -> D.Side:
            side = D.python_side(image)
            inner = side.transmit

            def transmit(apdu: bytes) -> bytes:
                sent[n].append(apdu)
                return inner(apdu)
            side.transmit = transmit
            return side
        return open_side

    D.run(recording(0), other_python, 300, seed=7)
    D.run(recording(1), other_python, 300, seed=7)
    assert sent[0] == sent[1] and len(sent[0]) == 300
    D.run(recording(1), other_python, 300, seed=8)
    assert sent[1][300:] != sent[0]


def injected(change: str) -> D.Opener:
    """A Python card with one difference injected."""
    def open_side(image: dict[str, Any]) -> D.Side:
        side = D.python_side(image, "broken")
        inner = side.transmit

        def transmit(apdu: bytes) -> bytes:
            out = inner(apdu)
            if change == "read record p1 0" and apdu[:4] == bytes.fromhex("00B200C4"):
                return b"\x6a\x87"                      # an unusual status word
            if change == "tac" and apdu[:2] == b"\x80\x54" and out[-2:] == b"\x90\x00":
                return bytes([out[0] ^ 1]) + out[1:]     # one bit of the TAC
            if change == "balance limit" and apdu[:4] == bytes.fromhex("80CA9F77"):
                return out[:-3] + bytes([out[-3] ^ 1]) + out[-2:]
            return out
        side.transmit = transmit
        return side
    return open_side


@pytest.mark.parametrize("change", ["read record p1 0", "tac", "balance limit"])
def test_the_harness_catches_an_injected_difference(change: str) -> None:
    with pytest.raises(D.Mismatch) as caught:
        D.run(D.python_side, injected(change), 20_000, seed=3)
    text = str(caught.value)
    assert text.startswith("seed 3, APDU ")
    assert "python" in text and "broken" in text and "replay: --diff-seed 3" in text
    # the replay stops at the same APDU
    count = int(text.split("--diff-count ")[1].split()[0])
    with pytest.raises(D.Mismatch) as again:
        D.run(D.python_side, injected(change), count, seed=3)
    assert str(again.value) == text
    D.run(D.python_side, injected(change), count - 1, seed=3)   # one APDU less: no mismatch


def test_jcardsim_runtime_rules_hide_only_the_runtime() -> None:
    """What is not sent and what is excused as jCardSim's own answer; nothing else is."""
    rt = D.JCardSimRuntime(D.AID, (bytes.fromhex("805005"),))
    plain = bytes.fromhex("00A4040009F0535643415244010100")
    assert rt.skip(plain) is None
    assert rt.skip(bytes.fromhex("00A4040C09F05356434152440101")) is None
    for other_form in ("00A40400", "00A4040000", "00A4040409F0535643415244010100",
                       "01A4040009F0535643415244010100"):
        assert rt.skip(bytes.fromhex(other_form)), other_form
    assert rt.skip(bytes.fromhex("805005020B0100000001112233445566")) is not None
    assert rt.skip(bytes.fromhex("805C000204")) is None
    # no applet selected: the runtime's 6986/6999 are excused, not another status word
    assert rt.excuse(bytes.fromhex("805C000204"), b"\x69\x86")
    assert rt.excuse(bytes.fromhex("805C000204"), b"\x69\x85") is None
    rt.after(bytes.fromhex("00A4040005A000000003"))          # an unknown AID selects nothing
    assert rt.excuse(bytes.fromhex("805C000204"), b"\x69\x86")
    rt.after(plain)
    assert rt.excuse(bytes.fromhex("805C000204"), b"\x69\x86") is None   # selected: a finding
    assert rt.excuse(bytes.fromhex("805C0002000004"), b"\x67\x00")       # extended length
    assert rt.excuse(bytes.fromhex("805C000204"), b"\x67\x00") is None
    assert rt.excuse(bytes.fromhex("00B0950000AA"), "raised JCardSimError: "
                     "java.lang.ArrayIndexOutOfBoundsException: Index 6")
    assert rt.excuse(bytes.fromhex("805C000204"), "raised JCardSimError: "
                     "java.lang.ArrayIndexOutOfBoundsException: Index 6") is None
    rt.reset()
    assert rt.excuse(bytes.fromhex("805C000204"), b"\x69\x86")


def test_a_runtime_answer_while_selected_is_a_mismatch() -> None:
    """An 'applet' answering 6986 to a command while selected is caught, though the runtime
    answers 6986 when nothing is selected."""
    def open_side(image: dict[str, Any]) -> D.Side:
        side = D.python_side(image, "applet")
        inner = side.transmit

        def transmit(apdu: bytes) -> bytes:
            out = inner(apdu)
            return b"\x69\x86" if apdu[:2] == b"\x80\x5c" and out[-2:] == b"\x90\x00" else out
        side.transmit = transmit
        side.platform = D.JCardSimRuntime(D.AID, D.APPLET_LEFT_OUT)
        return side

    with pytest.raises(D.Mismatch, match="applet - SW 6986"):
        D.run(D.python_side, open_side, 20_000, seed=5)


MUTANT_RUN = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import diffgen as D
import test_iep_differential as T
from conftest import AppletCards
applet = AppletCards({jar!r}, Path({classes!r}))
try:
    stats = D.run(D.python_side, T.applet_opener(applet), 3000, 20261122)
except D.Mismatch as exc:
    print(exc)
else:
    print("no mismatch in", stats.apdus)
"""


def test_a_mutant_applet_is_caught(iep_applet: AppletCards, tmp_path: Path) -> None:
    """The harness against real applet code: the applet with one status word changed (9401,
    insufficient funds, as 9400) differs from the Python card within 3,000 APDUs. (A JVM's class
    path is fixed: the mutant runs in a process of its own.)"""
    from svcard.card.applet import SOURCE_DIR
    src = tmp_path / "src"
    shutil.copytree(SOURCE_DIR, src)
    java = next(src.rglob("IepApplet.java"))
    text = java.read_text()
    original = "SW_INSUFFICIENT_FUNDS = (short) 0x9401;"
    assert original in text, "the applet no longer declares SW_INSUFFICIENT_FUNDS this way"
    java.write_text(text.replace(original, "SW_INSUFFICIENT_FUNDS = (short) 0x9400;"))
    classes = tmp_path / "classes"
    subprocess.run(["javac", "--release", "8", "-nowarn", "-cp", iep_applet.jar, "-d",
                    str(classes), *map(str, src.rglob("*.java"))], check=True, timeout=300,
                   capture_output=True)
    code = MUTANT_RUN.format(tests=str(Path(__file__).parent), jar=iep_applet.jar,
                             classes=str(classes))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert "SW 9400" in done.stdout and "SW 9401" in done.stdout, done.stdout
    assert done.stdout.startswith("seed 20261122, APDU ")

"""Card images on disk: tearing at every write step, kill -9, and two-process locking."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import demo_image, with_balance
from plain import plain_mac
from rawhost import RawHost, u4

from svcard.card.image import open_card, save_new_image
from svcard.card.storage import WRITE_STEPS, ImageLockedError, PowerCut, read_image

HERE = Path(__file__).resolve().parent
AMOUNT = 300


class Tear:
    """Counts write steps once armed, and cuts power at step number ``cut_at``."""

    def __init__(self, cut_at: int | None) -> None:
        self.cut_at = cut_at
        self.armed = False
        self.steps: list[str] = []

    def __call__(self, step: str) -> None:
        if not self.armed:
            return
        index = len(self.steps)
        self.steps.append(step)
        if index == self.cut_at:
            raise PowerCut(step)


def make_image(tmp_path: Path, name: str, ep: int) -> Path:
    path = tmp_path / name
    save_new_image(path, with_balance(demo_image("iep", fixed_random="A1B2C3D4"), ep=ep))
    return path


def state_of(path: Path) -> dict:
    return read_image(path)["app"]


def run_debit(path: Path, tear: Tear) -> dict:
    card = open_card(path, tear=tear)
    try:
        host = RawHost(card)
        host.select()
        init = host.init_purchase(AMOUNT)
        sk = host.purchase_session_key(init, 77)
        apdu = host.debit_apdu(77, host.purchase_mac1(sk, AMOUNT))
        tear.armed = True
        out = card.transmit(apdu)
        return {"out": out, "mac2": plain_mac(sk, u4(AMOUNT)), "init": init}
    finally:
        card.close()


def run_credit(path: Path, tear: Tear) -> dict:
    card = open_card(path, tear=tear)
    try:
        host = RawHost(card)
        host.select()
        init = host.init_load(AMOUNT)
        sk = host.load_session_key(init)
        mac2 = host.load_mac2(sk, AMOUNT)
        apdu = host.credit_apdu(mac2)
        tear.armed = True
        out = card.transmit(apdu)
        return {"out": out, "mac2": mac2, "init": init}
    finally:
        card.close()


@pytest.mark.parametrize(("flow", "txn_type", "counter", "sign"), [
    (run_debit, 0x06, "offline_counter", -1),
    (run_credit, 0x02, "online_counter", +1),
])
def test_power_cut_at_every_write_step(tmp_path: Path, flow, txn_type: int, counter: str,
                                       sign: int) -> None:
    # A dry run counts the write steps of one DEBIT / CREDIT and records the answer.
    dry = make_image(tmp_path, "dry.json", 1000)
    tear = Tear(None)
    ok = flow(dry, tear)
    assert ok["out"][-2:] == b"\x90\x00"
    assert len(tear.steps) == 2 * len(WRITE_STEPS)  # two atomic writes, four steps each
    proof_ok = ok["out"][:-2]
    outcomes = []
    for cut in range(len(tear.steps)):
        path = make_image(tmp_path, f"cut{cut}.json", 1000)
        before = state_of(path)
        with pytest.raises(PowerCut):
            flow(path, Tear(cut))
        on_disk = state_of(path)
        assert on_disk["ep"] in (before["ep"], {**before["ep"],
                                                "balance": 1000 + sign * AMOUNT,
                                                counter: before["ep"][counter] + 1})
        # Power comes back: the card finishes any interrupted log write by itself.
        card = open_card(path)
        try:
            host = RawHost(card)
            host.select()
            after = card.apps[0].to_state()
            assert after["pending_log"] is None
            moved = after["ep"]["balance"] != 1000
            outcomes.append(moved)
            prove = bytes([0x80, 0x5A, 0x00, txn_type, 0x02, 0x00, 0x00, 0x08])
            data, sw = host.send(prove)
            if moved:
                assert after["ep"]["balance"] == 1000 + sign * AMOUNT
                assert after["ep"][counter] == 1
                assert len(after["log"]) == 1
                record = bytes.fromhex(after["log"][0])
                assert record[5:9] == u4(AMOUNT) and record[9] == txn_type
                assert sw == 0x9000
                if txn_type == 0x06:
                    assert data == ok["mac2"] + proof_ok[:4]  # MAC2 || TAC, as answered
                else:
                    assert data == ok["mac2"] + proof_ok        # MAC2 accepted || TAC
            else:
                assert after == {**before, "log": [], "pending_log": None}
                assert sw == 0x9406
                # nothing happened, so the same transaction simply runs again
                assert host.balance() == 1000
        finally:
            card.close()
    # the cuts really fall on both sides of the commit point
    assert outcomes.count(False) >= 3 and outcomes.count(True) >= 4
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_stale_temp_file_is_not_the_image(tmp_path: Path) -> None:
    path = make_image(tmp_path, "card.json", 50)
    stale = tmp_path / ".card.json.999.tmp"
    stale.write_text("{half a")
    card = open_card(path)
    card.close()
    assert not stale.exists()
    assert state_of(path)["ep"]["balance"] == 50


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(HERE / "cardloop.py"), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_kill_9_mid_write_leaves_a_consistent_image(tmp_path: Path) -> None:
    path = make_image(tmp_path, "card.json", 1_000_000 - 1)
    initial = 1_000_000 - 1
    for round_ in range(6):
        child = _spawn("purchase", str(path), "100000", "0")
        assert child.stdout is not None
        for _ in range(3 + 7 * round_):  # let it run a varying number of purchases
            assert child.stdout.readline()
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        raw = json.loads(path.read_bytes())  # always whole JSON: old or new image
        app = raw["app"]
        counter = app["ep"]["offline_counter"]
        assert app["ep"]["balance"] == initial - counter  # 1 minor unit per purchase
        card = open_card(path)  # the dead child's lock went with it
        try:
            state = card.apps[0].to_state()
            assert state["pending_log"] is None
            assert len(state["log"]) == min(counter, 10)
            newest = bytes.fromhex(state["log"][0])
            assert int.from_bytes(newest[:2], "big") == counter - 1
        finally:
            card.close()


def test_second_opener_waits_or_fails_clearly(tmp_path: Path) -> None:
    path = make_image(tmp_path, "card.json", 10)
    holder = _spawn("hold", str(path))
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ImageLockedError, match="in use by another card"):
        open_card(path, lock_timeout=0.2)
    opened: list[object] = []
    waiter = threading.Thread(target=lambda: opened.append(open_card(path, lock_timeout=30)))
    waiter.start()
    holder.stdin.write("go\n")
    holder.stdin.flush()
    waiter.join(timeout=30)
    assert holder.wait(timeout=30) == 0
    assert len(opened) == 1
    opened[0].close()  # type: ignore[attr-defined]


def test_two_processes_never_lose_an_update(tmp_path: Path) -> None:
    path = make_image(tmp_path, "card.json", 1000)
    children = [_spawn("purchase", str(path), "15", "1") for _ in range(2)]
    for child in children:
        out, _ = child.communicate(timeout=120)
        assert child.returncode == 0 and out.split()[-1] == "15"
    app = state_of(path)
    assert app["ep"]["offline_counter"] == 30
    assert app["ep"]["balance"] == 1000 - 30


def test_lock_is_released_by_close_and_reopen_is_possible(tmp_path: Path) -> None:
    path = make_image(tmp_path, "card.json", 10)
    started = time.monotonic()
    for _ in range(3):
        open_card(path, lock_timeout=0.5).close()
    assert time.monotonic() - started < 1.5  # never waited on its own released lock
    shutil.copy(path, tmp_path / "copy.json")
    open_card(tmp_path / "copy.json").close()

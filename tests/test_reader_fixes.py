"""Issue 10, point 8, through the real PC/SC stack (a pcscd of the session's own, the vpcd driver,
pyscard): the 6Cxx re-send keeps the command, a value transaction holds the card against other
PC/SC clients, ``card serve`` says when no vpcd listens, ``readers --watch`` reports events.

Cards are served in process (:class:`VpcdCardServer` on a thread) when the test must see what
reached the card, and with ``svcard card serve`` child processes otherwise.
"""

from __future__ import annotations

import datetime as dt
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import demo_image, with_balance
from pcsc_env import READER_0, Pcscd, Served, start_session_pcscd, wait_for

from svcard.card.image import open_card, save_new_image
from svcard.host.cli.card_serve import serve_images
from svcard.host.terminal import purse
from svcard.host.terminal.card_commands import handled
from svcard.protocols import purse as P
from svcard.protocols.apdu import APDUFormatError, parse_command
from svcard.reader import Reader, VirtualReader
from svcard.reader.pcsc import PcscReader, list_readers
from svcard.reader.vpcd import VpcdCardServer

ATR = bytes.fromhex("3B888001535643415244303119")
SELECT_PURSE = bytes.fromhex("00A4040009") + P.DEFAULT_IEP_AID
WHEN = dt.datetime(2027, 3, 14, 15, 9, 26)


@pytest.fixture(scope="module")
def pcscd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pcscd]:
    daemon = start_session_pcscd(tmp_path_factory.mktemp("pcscd"))
    yield daemon
    daemon.stop()


def card_present(name: str = READER_0) -> bool:
    return any(r.card_present for r in list_readers() if r.name == name)


@contextmanager
def served_in_process(card: Any, port: int) -> Iterator[VpcdCardServer]:
    """``card`` in reader 00 00, played from a thread of this process."""
    server = VpcdCardServer(card, "127.0.0.1", port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        wait_for(card_present, "the card in Virtual PCD 00 00")
        yield server
    finally:
        server.stop()
        thread.join(timeout=10)
        wait_for(lambda: not card_present(), "the card to leave Virtual PCD 00 00")


# --- 1. the 6Cxx re-send ---------------------------------------------------------------------

class WrongLeCard:
    """Answers 8 bytes, and 6C08 to any command whose Le is not 8; keeps what it received."""

    atr = ATR
    answer = bytes(range(1, 9))

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def reset(self) -> bytes:
        return self.atr

    def transmit(self, apdu: bytes) -> bytes:
        self.received.append(apdu)
        try:
            cmd = parse_command(apdu)
        except APDUFormatError:
            return b"\x67\x00"
        if cmd.le != len(self.answer):
            return b"\x6c\x08"
        return self.answer + b"\x90\x00"


@pytest.mark.parametrize(("sent", "resent"), [
    ("80CA000004", "80CA000008"),                                  # case 2
    ("80CA000003AABBCC", "80CA000003AABBCC08"),                    # case 3: data kept
    ("80CA000003AABBCC04", "80CA000003AABBCC08"),                  # case 4
    ("80CA0000000003AABBCC", "80CA0000000003AABBCC0008"),          # extended case 3
    ("80CA0000000003AABBCC0010", "80CA0000000003AABBCC0008"),      # extended case 4
])
def test_wrong_le_is_resent_with_the_command_unchanged(pcscd: Pcscd, sent: str,
                                                       resent: str) -> None:
    card = WrongLeCard()
    with served_in_process(card, pcscd.port):
        reader = PcscReader(READER_0)
        reader.connect()
        try:
            answer = reader.transmit(bytes.fromhex(sent))
        finally:
            reader.disconnect()
    assert [c.hex().upper() for c in card.received] == [sent, resent]
    assert answer == WrongLeCard.answer + b"\x90\x00"


def test_a_malformed_command_answered_6cxx_is_not_resent(pcscd: Pcscd) -> None:
    card = WrongLeCard()
    card.transmit = lambda apdu: (card.received.append(apdu), b"\x6c\x08")[1]  # type: ignore
    with served_in_process(card, pcscd.port):
        reader = PcscReader(READER_0)
        reader.connect()
        try:
            assert reader.transmit(bytes.fromhex("80CA00000004")) == b"\x6c\x08"
        finally:
            reader.disconnect()
    assert card.received == [bytes.fromhex("80CA00000004")]


# --- 2. a value transaction holds the card ---------------------------------------------------

class LoggedCard:
    """A real card, with a log of the commands that reached it (from any PC/SC client)."""

    def __init__(self, path: Path) -> None:
        self.card = open_card(path)
        self.log: list[bytes] = []

    @property
    def atr(self) -> bytes:
        return self.card.atr

    def reset(self) -> bytes:
        return self.card.reset()

    def transmit(self, apdu: bytes) -> bytes:
        self.log.append(apdu)
        return self.card.transmit(apdu)


class HookedReader(Reader):
    """A virtual security module that calls ``hook`` when the flow reaches instruction ``ins``
    (after the card's INITIALIZE, before its DEBIT or CREDIT)."""

    def __init__(self, inner: VirtualReader, ins: int, hook: Any) -> None:
        self.inner, self.ins, self.hook = inner, ins, hook
        self.name = inner.name

    def connect(self) -> bytes:
        return self.inner.connect()

    def transmit(self, apdu: bytes) -> bytes:
        if apdu[1] == self.ins:
            self.hook()
        return self.inner.transmit(apdu)

    def disconnect(self) -> None:
        self.inner.disconnect()


class Interloper:
    """Another PC/SC client that SELECTs the purse in the middle of our flow (which ends the
    card's INITIALIZE session if it gets through)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.answer = b""
        self.thread = threading.Thread(target=self._run, name="interloper", daemon=True)
        self.got_in_during_flow: bool | None = None

    def _run(self) -> None:
        other = PcscReader(READER_0)
        other.connect()
        try:
            self.answer = other.transmit(SELECT_PURSE)
        finally:
            other.disconnect()
            self.done.set()

    def strike(self) -> None:
        self.thread.start()
        # pcsc-lite makes its command wait while our transaction holds the card: it must not
        # get through in this time (without the transaction it takes a few milliseconds)
        self.got_in_during_flow = self.done.wait(0.5)


@pytest.mark.parametrize("flow", ["purchase", "load"])
def test_a_value_transaction_holds_the_card_against_other_pcsc_clients(
        pcscd: Pcscd, tmp_path: Path, flow: str) -> None:
    paths = {}
    for kind in ("iep", "psam", "hsm"):
        image = with_balance(demo_image(kind), 10_000) if kind == "iep" else demo_image(kind)
        paths[kind] = tmp_path / f"{kind}.json"
        save_new_image(paths[kind], image)
    card = LoggedCard(paths["iep"])
    interloper = Interloper()
    module = open_card(paths["psam" if flow == "purchase" else "hsm"])
    ins = P.INS_INIT_SAM_FOR_PURCHASE if flow == "purchase" else P.INS_HSM_AUTHORIZE_LOAD
    security = HookedReader(VirtualReader(module, on_disconnect=module.close), ins,
                            interloper.strike)
    try:
        with served_in_process(card, pcscd.port):
            with PcscReader(READER_0) as reader, security:
                if flow == "purchase":
                    receipt: purse.Receipt = purse.purchase(reader, security, 250, when=WHEN)
                else:
                    receipt = purse.load(reader, security, 250, terminal_id=b"\x00" * 6,
                                         when=WHEN)
            interloper.thread.join(timeout=10)
    finally:
        card.card.close()
    assert interloper.got_in_during_flow is False, "another client's SELECT got in mid-flow"
    assert interloper.answer[-2:] == b"\x90\x00"  # it ran, after the flow
    assert receipt.balance_after == 10_000 + (250 if flow == "load" else -250)
    # what reached the card: the flow from SELECT to DEBIT/CREDIT whole, then the other SELECT
    last = P.INS_DEBIT if flow == "purchase" else P.INS_CREDIT_FOR_LOAD
    order = [apdu[1] for apdu in card.log]
    assert order[0] == order[-1] == P.INS_SELECT and order.count(P.INS_SELECT) == 2
    assert order[-2] == last and P.INS_INITIALIZE in order


def test_transactions_nest_and_are_nothing_for_readers_no_one_else_can_reach(
        pcscd: Pcscd, image_files: dict[str, Path]) -> None:
    opened = open_card(image_files["iep"])
    virtual = VirtualReader(opened, on_disconnect=opened.close)
    with virtual, virtual.transaction(), virtual.transaction():
        assert virtual.transmit(SELECT_PURSE)[-2:] == b"\x90\x00"
    server = Served([image_files["iep"]], pcscd.port)
    try:
        server.wait_present((READER_0,))
        with PcscReader(READER_0) as reader:
            interloper = Interloper()
            with reader.transaction():
                with reader.transaction():
                    reader.transmit(SELECT_PURSE)
                interloper.strike()  # the outer block still holds the card
                assert reader.transmit(bytes.fromhex("805C000204"))[-2:] == b"\x90\x00"
            interloper.thread.join(timeout=10)
        assert interloper.got_in_during_flow is False
        assert interloper.answer[-2:] == b"\x90\x00"
    finally:
        server.kill()


# --- 3. card serve with no vpcd --------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_card_serve_says_when_no_vpcd_listens(image_files: dict[str, Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(SystemExit) as stopped, handled():
        serve_images([image_files["iep"]], "127.0.0.1", port, wait=0.3)
    assert stopped.value.code == 4  # as for no PC/SC service
    err = capsys.readouterr().err
    assert f"no vpcd at 127.0.0.1:{port} yet" in err  # said at once, not after the wait
    assert f"svcard: no vpcd listening at 127.0.0.1:{port} after 0.3 s: is pcscd running" in err
    open_card(image_files["iep"]).close()  # the image was closed: it opens again at once


# --- 4. readers --watch ----------------------------------------------------------------------

class Lines:
    """The lines a child process prints, read on a thread so that waits have deadlines."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout
        threading.Thread(target=lambda: [self.queue.put(line) for line in stdout],
                         daemon=True).start()

    def until(self, wanted: dict[str, Any], timeout: float = 15.0) -> list[dict[str, Any]]:
        seen = []
        deadline = dt.datetime.now() + dt.timedelta(seconds=timeout)
        while dt.datetime.now() < deadline:
            try:
                line = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            event = json.loads(line)
            seen.append(event)
            if all(event.get(k) == v for k, v in wanted.items()):
                return seen
        raise AssertionError(f"no event {wanted} within {timeout} s; saw {seen}")


def test_readers_watch_reports_cards_coming_and_going(pcscd: Pcscd,
                                                      image_files: dict[str, Path]) -> None:
    exe = Path(sys.executable).parent / "svcard"
    watcher = subprocess.Popen([str(exe), "readers", "--watch", "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = Lines(watcher)
        start = lines.until({"event": "reader_added", "reader": "Virtual PCD 00 01"})
        assert {(e["event"], e["reader"], e["initial"]) for e in start} >= {
            ("reader_added", READER_0, True), ("reader_added", "Virtual PCD 00 01", True)}
        server = Served([image_files["iep"]], pcscd.port)
        try:
            inserted = lines.until({"event": "card_inserted", "reader": READER_0})[-1]
            assert inserted["atr"] == ATR.hex().upper() and inserted["initial"] is False
        finally:
            server.kill()
        lines.until({"event": "card_removed", "reader": READER_0})
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=15) == 130
        assert watcher.stderr is not None and watcher.stderr.read() == ""  # quietly
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()

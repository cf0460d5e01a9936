"""pyscard and svcard, both ways (issue 10, point 8): pyscard's own classes (observers, error
checking chains, PC/SC connections and their decorators) on an svcard card in process, and
svcard's terminal flows over a connection made with pyscard, through the session's pcscd."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import demo_image, with_balance
from pcsc_env import READER_0, READER_1, Pcscd, Served, start_session_pcscd
from smartcard.CardConnectionObserver import (
    CardConnectionObserver,
    ConsoleCardConnectionObserver,
)
from smartcard.Exceptions import CardConnectionException, NoCardException
from smartcard.ExclusiveTransmitCardConnection import ExclusiveTransmitCardConnection
from smartcard.PassThruCardService import PassThruCardService
from smartcard.sw.ErrorCheckingChain import ErrorCheckingChain
from smartcard.sw.ISO7816_4ErrorChecker import ISO7816_4ErrorChecker
from smartcard.sw.SWExceptions import CheckingErrorException
from smartcard.System import readers as pyscard_readers

from svcard.card.image import open_card, save_new_image
from svcard.host.terminal import purse
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import purse as P
from svcard.reader import NoCardError, VirtualReader
from svcard.reader.pcsc import PcscReader
from svcard.reader.pyscard_bridge import PyscardReader, SvcardCardConnection
from svcard.reader.trace import RecordingReader

ATR = bytes.fromhex("3B888001535643415244303119")
SELECT_PURSE = list(bytes.fromhex("00A4040009") + P.DEFAULT_IEP_AID)
GET_BALANCE = [0x80, 0x5C, 0x00, 0x02, 0x04]
WHEN = dt.datetime(2027, 3, 14, 15, 9, 26)


class Events(CardConnectionObserver):  # type: ignore[misc]
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def update(self, observable: Any, event: Any) -> None:
        self.seen.append((event.type, event.args))


def virtual_psam(path: Path) -> VirtualReader:
    card = open_card(path)
    return VirtualReader(card, on_disconnect=card.close)


# --- pyscard code on an svcard card ----------------------------------------------------------

def test_pyscard_observers_and_error_checkers_drive_an_svcard_card(
        image_files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    connection = SvcardCardConnection(open_reader(f"virtual:{image_files['iep']}"))
    events = Events()
    connection.addObserver(events)
    connection.addObserver(ConsoleCardConnectionObserver())
    connection.connect()
    assert connection.getATR() == list(ATR)
    data, sw1, sw2 = connection.transmit(SELECT_PURSE)
    assert (sw1, sw2) == (0x90, 0x00) and bytes(data[4:13]) == P.DEFAULT_IEP_AID
    service = PassThruCardService(connection)  # pyscard's card service on our card
    assert service.connection.transmit(GET_BALANCE) == ([0x00, 0x00, 0x27, 0x10], 0x90, 0x00)
    assert [kind for kind, _ in events.seen] == ["connect", "command", "response", "command",
                                                "response"]
    assert events.seen[-1][1] == [[0x00, 0x00, 0x27, 0x10], 0x90, 0x00]
    out = capsys.readouterr().out
    assert "> 80 5C 00 02 04" in out and "< 00 00 27 10 90 00" in out
    # pyscard's ISO 7816-4 checker raises on our card's status words
    chain: list[Any] = []
    chain = [ErrorCheckingChain(chain, ISO7816_4ErrorChecker())]  # as pyscard's docs build it
    connection.setErrorCheckingChain(chain)
    with pytest.raises(CheckingErrorException) as error:
        connection.transmit([0x00, 0xB0, 0x99, 0x00, 0x00])  # no such file: 6A82
    assert (error.value.sw1, error.value.sw2) == (0x6A, 0x82)
    connection.disconnect()
    with pytest.raises(CardConnectionException, match="not connected"):
        connection.transmit(GET_BALANCE)
    open_card(image_files["iep"]).close()  # disconnect released the image


def test_svcard_reader_errors_reach_pyscard_as_its_exceptions(tmp_path: Path,
                                                              image_files: dict[str, Path]
                                                              ) -> None:
    trace = tmp_path / "t.jsonl"
    with RecordingReader(open_reader(f"virtual:{image_files['iep']}"), trace) as recorder:
        recorder.transmit(bytes(SELECT_PURSE))
    connection = SvcardCardConnection(open_reader(f"trace:{trace}"))
    connection.connect()
    with pytest.raises(CardConnectionException, match="trace mismatch at command #0"):
        connection.transmit(GET_BALANCE)


def test_an_svcard_flow_over_a_pyscard_connection_in_process(tmp_path: Path,
                                                             image_files: dict[str, Path]
                                                             ) -> None:
    connection = SvcardCardConnection(open_reader(f"virtual:{image_files['iep']}"))
    events = Events()
    connection.addObserver(events)
    with PyscardReader(connection) as card, virtual_psam(image_files["psam"]) as psam:
        receipt = purse.purchase(card, psam, 250, when=WHEN)
    assert receipt.balance_after == 10_000 - 250
    commands = [bytes(args[0]) for kind, args in events.seen if kind == "command"]
    # SELECT, GET DATA (the UID, for a MAC scheme that needs it), INITIALIZE, DEBIT
    assert [c[1] for c in commands] == [0xA4, 0xCA, 0x50, 0x54]
    assert events.seen[-1][0] == "disconnect"


# --- svcard flows over pyscard's PC/SC connections -------------------------------------------

@pytest.fixture(scope="module")
def pcscd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pcscd]:
    daemon = start_session_pcscd(tmp_path_factory.mktemp("pcscd"))
    yield daemon
    daemon.stop()


def pyscard_connection(name: str) -> Any:
    (reader,) = [r for r in pyscard_readers() if str(r) == name]
    return reader.createConnection()


def test_svcard_runs_over_a_users_pyscard_pcsc_connection(pcscd: Pcscd,
                                                          image_files: dict[str, Path]) -> None:
    server = Served([image_files["iep"]], pcscd.port)
    try:
        server.wait_present((READER_0,))
        connection = pyscard_connection(READER_0)
        connection.connect()  # the user's open connection: svcard neither opens nor closes it
        with PyscardReader(connection, connect=False) as card:
            assert purse.read_balance(card)[1] == 10_000
            with virtual_psam(image_files["psam"]) as psam:
                assert purse.purchase(card, psam, 100, when=WHEN).balance_after == 9_900
        assert connection.transmit(GET_BALANCE)[1:] == (0x90, 0x00)  # still open
        connection.release()  # the user's: disconnects, and frees its PC/SC context
        empty = pyscard_connection(READER_1)
        with pytest.raises(NoCardError) as no_card:
            PyscardReader(empty).connect()
        assert no_card.value.exit_code == 6
        empty.release()
    finally:
        server.kill()


def test_a_pyscard_connection_gets_transactions_and_t0_completion(pcscd: Pcscd,
                                                                  tmp_path: Path) -> None:
    image = with_balance(demo_image("iep"), 100)
    image["t0"] = True  # case 4 answers come as 61xx: the reader fetches them
    path = tmp_path / "t0.json"
    save_new_image(path, image)
    server = Served([path], pcscd.port)
    try:
        server.wait_present((READER_0,))
        # through pyscard's own decorator: the PC/SC handle is found under it
        connection = ExclusiveTransmitCardConnection(pyscard_connection(READER_0))
        card = PyscardReader(connection)
        with card:
            fci = card.transmit(bytes(SELECT_PURSE) + b"\x00")
            assert fci[0] == 0x6F and fci[-2:] == b"\x90\x00"
            other_done = threading.Event()

            def other_client() -> None:
                with PcscReader(READER_0) as other:
                    other.transmit(bytes(GET_BALANCE))
                other_done.set()

            with card.transaction():
                thread = threading.Thread(target=other_client, daemon=True)
                thread.start()
                assert not other_done.wait(0.3)  # held off by our transaction
                assert card.transmit(bytes(GET_BALANCE)) == bytes.fromhex("000000649000")
            assert other_done.wait(10)  # and let in after it
            thread.join(timeout=10)
        connection.release()
    finally:
        server.kill()


def test_pyscard_no_card_is_nocardexception(pcscd: Pcscd, image_files: dict[str, Path]) -> None:
    connection = SvcardCardConnection(PcscReader(READER_1))  # no card served to 00 01
    with pytest.raises(NoCardException):
        connection.connect()

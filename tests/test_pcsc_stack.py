"""Our cards inside the system's PC/SC stack: pcscd + vsmartcard vpcd + pyscard + opensc-tool.

Everything here is real: a pcscd child of the test session, ``svcard card serve`` child
processes speaking the vpcd protocol over loopback TCP, pyscard through libpcsclite.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import demo_image, with_balance
from pcsc_env import READER_0, READER_1, Pcscd, Served, start_session_pcscd, wait_for

from svcard.card.image import save_new_image
from svcard.card.storage import read_image
from svcard.reader import CardRemovedError, NoCardError, NoSuchReaderError, ReaderError
from svcard.reader.pcsc import PcscReader, list_readers


@pytest.fixture(scope="module")
def pcscd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pcscd]:
    daemon = start_session_pcscd(tmp_path_factory.mktemp("pcscd"))
    yield daemon
    daemon.stop()


@pytest.fixture
def images(image_files: dict[str, Path]) -> dict[str, Path]:
    """The demo IEP (EP 100.00), PSAM and HSM images of conftest."""
    return image_files


@pytest.fixture
def served(pcscd: Pcscd, images: dict[str, Path]) -> Iterator[Served]:
    server = Served([images["iep"], images["psam"]], pcscd.port)
    server.wait_present((READER_0, READER_1))
    yield server
    server.kill()


def svcard(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "svcard"
    return subprocess.run([str(exe) if exe.exists() else "svcard", *args], capture_output=True,
                          text=True, timeout=60)


def test_readers_list_shows_both_cards(served: Served) -> None:
    states = {r.name: r for r in list_readers()}
    assert states[READER_0].card_present and states[READER_1].card_present
    assert states[READER_0].atr == bytes.fromhex("3B888001535643415244303119")
    result = svcard("readers", "--json")
    assert result.returncode == 0
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == [READER_0, READER_1]
    assert all(r["card_present"] for r in rows)


def test_opensc_tool_reads_our_card(served: Served) -> None:
    if shutil.which("opensc-tool") is None:
        pytest.skip("opensc-tool is not installed (apt-get install opensc)")
    result = subprocess.run(
        ["opensc-tool", "-r", READER_0, "-s", "00A4040009F05356434152440101",
         "-s", "805C000204"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Received (SW1=0x90, SW2=0x00)" in out
    assert "00 00 27 10" in out  # 10000 minor units, as read by a third-party tool


def test_purchase_and_load_through_pcscd(served: Served, images: dict[str, Path]) -> None:
    card, psam = f"pcsc:{READER_0}", f"pcsc:{READER_1}"
    load = svcard("terminal", "load", "--card", card, "--hsm", f"virtual:{images['hsm']}",
                  "--amount", "500u", "--json")
    assert load.returncode == 0, load.stderr
    assert json.loads(load.stdout)["balance_after"] == 10_500
    buy = svcard("terminal", "purchase", "--card", card, "--psam", psam, "--amount", "1234u",
                 "--json")
    assert buy.returncode == 0, buy.stderr
    receipt = json.loads(buy.stdout)
    assert receipt["balance_after"] == 10_500 - 1234 and receipt["terminal_txn_number"] == 1
    log = svcard("terminal", "log", "--card", "pcsc:#0", "--json")
    assert [e["amount"] for e in json.loads(log.stdout)] == [1234, 500]
    assert served.interrupt() == 0  # Ctrl-C: the images are left consistent
    app = read_image(images["iep"])["app"]
    assert app["ep"] == {"balance": 9266, "online_counter": 1, "offline_counter": 1,
                         "overdraft_limit": 0}
    assert len(app["log"]) == 2 and app["pending_log"] is None
    psam_app = read_image(images["psam"])["app"]
    assert psam_app["next_ttn"] == 2 and len(psam_app["records"]) == 1


def test_reader_errors_have_distinct_exit_codes(served: Served, pcscd: Pcscd) -> None:
    assert svcard("terminal", "balance", "--card", "pcsc:Nope").returncode == 5
    ambiguous = svcard("terminal", "balance", "--card", "pcsc:Virtual")
    assert ambiguous.returncode == 5 and "several readers" in ambiguous.stderr
    assert svcard("terminal", "balance", "--card", "pcsc:#7").returncode == 5
    with pytest.raises(NoSuchReaderError):
        PcscReader("Nope").connect()


def test_no_card_in_reader(pcscd: Pcscd, images: dict[str, Path]) -> None:
    server = Served([images["iep"]], pcscd.port)  # only reader 00 00 gets a card
    try:
        server.wait_present((READER_0,))
        with pytest.raises(NoCardError):
            PcscReader(READER_1).connect()
        assert svcard("terminal", "balance", "--card", f"pcsc:{READER_1}").returncode == 6
    finally:
        server.kill()


def test_no_pcsc_service_exit_code(served: Served) -> None:
    env_cmd = [sys.executable, "-c",
               "import sys; from svcard.host.cli.main import main; sys.argv[0]='svcard'; main()",
               "readers"]
    import os
    result = subprocess.run(env_cmd, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PCSCLITE_CSOCK_NAME": "/nonexistent/pcscd"})
    assert result.returncode == 4, result.stderr
    assert "PC/SC service" in result.stderr


def test_card_removed_mid_transaction(pcscd: Pcscd, images: dict[str, Path]) -> None:
    server = Served([images["iep"]], pcscd.port)
    reader = PcscReader(READER_0)
    try:
        server.wait_present((READER_0,))
        reader.connect()
        assert reader.transmit(bytes.fromhex("00A4040009F05356434152440101"))[-2:] == b"\x90\0"
        server.kill()  # the card leaves the reader
        wait_for(lambda: not {r.name: r.card_present for r in list_readers()}[READER_0],
                 "the card to be gone")
        with pytest.raises(CardRemovedError):
            reader.transmit(bytes.fromhex("805C000204"))
    finally:
        reader.disconnect()
        server.kill()


def test_sharing_violation(served: Served) -> None:
    from smartcard import scard

    hresult, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    assert hresult == scard.SCARD_S_SUCCESS
    hresult, card, _ = scard.SCardConnect(ctx, READER_0, scard.SCARD_SHARE_EXCLUSIVE,
                                          scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1)
    assert hresult == scard.SCARD_S_SUCCESS
    try:
        result = svcard("terminal", "balance", "--card", f"pcsc:{READER_0}")
        assert result.returncode == 8, result.stderr
    finally:
        scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)
        scard.SCardReleaseContext(ctx)


def test_reset_drops_session_but_not_value(served: Served) -> None:
    from smartcard import scard

    reader = PcscReader(READER_0)
    reader.connect()
    try:
        reader.transmit(bytes.fromhex("00A4040009F05356434152440101"))
        init = reader.transmit(bytes.fromhex("805001020B0100000001112233445566"))
        assert init[-2:] == b"\x90\x00"
        s = scard
        hresult, _ = s.SCardReconnect(reader._card, s.SCARD_SHARE_SHARED,
                                      s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1,
                                      s.SCARD_RESET_CARD)
        assert hresult == s.SCARD_S_SUCCESS
        reader.transmit(bytes.fromhex("00A4040009F05356434152440101"))
        debit = reader.transmit(bytes.fromhex("805401000F0000000120270314150926AABBCCDD08"))
        assert debit[-2:] == b"\x69\x85"  # the INITIALIZE went with the reset
        assert reader.transmit(bytes.fromhex("805C000204")) == bytes.fromhex("000027109000")
    finally:
        reader.disconnect()


def test_reader_layer_refuses_short_commands(served: Served) -> None:
    reader = PcscReader(READER_0)
    reader.connect()
    try:
        for short in (b"", b"\x00", b"\x00\xa4\x04"):
            with pytest.raises(ReaderError, match="at least 4 bytes"):
                reader.transmit(short)
        assert reader.transmit(bytes.fromhex("00A4040009F05356434152440101"))[-2:] == b"\x90\0"
    finally:
        reader.disconnect()


def test_get_response_and_wrong_le_are_handled_in_the_reader(pcscd: Pcscd,
                                                              tmp_path: Path) -> None:
    image = with_balance(demo_image("iep"), 100)
    image["t0"] = True  # case 4 answers come as 61xx
    path = tmp_path / "t0.json"
    save_new_image(path, image)
    server = Served([path], pcscd.port)
    reader = PcscReader(READER_0)
    try:
        server.wait_present((READER_0,))
        reader.connect()
        fci = reader.transmit(bytes.fromhex("00A4040009F05356434152440101") + b"\x00")
        assert fci[0] == 0x6F and fci[-2:] == b"\x90\x00"  # no 61xx seen up here
        init = reader.transmit(bytes.fromhex("805001020B0100000001112233445566") + b"\x0f")
        assert len(init) == 17 and init[-2:] == b"\x90\x00"
        # GET BALANCE with Le 08: the card says 6C04, the reader asks again with Le 04
        assert reader.transmit(bytes.fromhex("805C000208")) == bytes.fromhex("000000649000")
    finally:
        reader.disconnect()
        server.kill()


def test_serve_reconnects_when_pcscd_restarts(pcscd: Pcscd, images: dict[str, Path]) -> None:
    server = Served([images["iep"]], pcscd.port)
    try:
        server.wait_present((READER_0,))
        pcscd.restart()
        server.wait_present((READER_0,))  # it found the new vpcd by itself
        result = svcard("terminal", "balance", "--card", f"pcsc:{READER_0}", "--json")
        assert result.returncode == 0 and json.loads(result.stdout)["balance"] == 10_000
    finally:
        server.kill()


def test_serve_waits_for_pcscd_to_start(pcscd: Pcscd, images: dict[str, Path]) -> None:
    pcscd.stop()
    server = Served([images["iep"]], pcscd.port)  # nothing listens yet: it keeps polling
    try:
        assert server.proc.poll() is None
        pcscd.start()
        server.wait_present((READER_0,))
    finally:
        server.kill()

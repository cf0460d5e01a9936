"""The PSAM and the load HSM at APDU level, their MACs checked the plain way."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from conftest import demo_image, with_balance
from plain import demo_card_keys, plain_mac, tdes_encrypt_block
from rawhost import DATE, TIME, RawHost, u4

from svcard.card.image import card_from_image
from svcard.card.runtime import Card
from svcard.protocols import purse as P

PSAM_AID = "F05356434152440201"
HSM_AID = "F05356434152440301"
SERIAL8 = bytes.fromhex("0000000000000001")
ISSUER = bytes.fromhex("1000000000000001")
PSAM_TID = bytes.fromhex("000000000001")


def tx(card: Card, apdu: str | bytes) -> tuple[bytes, int]:
    raw = bytes.fromhex(apdu) if isinstance(apdu, str) else apdu
    out = card.transmit(raw)
    return out[:-2], int.from_bytes(out[-2:], "big")


def selected(card: Card, aid: str) -> Card:
    assert tx(card, f"00A40400{len(aid) // 2:02X}{aid}00")[1] == 0x9000
    return card


def init_sam_apdu(random: bytes = b"\x01\x02\x03\x04", counter: int = 5, amount: int = 300,
                  p1: int = 0, serial: bytes = SERIAL8, key_version: int = 1,
                  issuer: bytes | None = None) -> bytes:
    data = (random + counter.to_bytes(2, "big") + u4(amount) + b"\x06" + DATE + TIME
            + bytes([key_version, 0]) + serial + (issuer or b""))
    return bytes([0x80, 0x70, p1, 0x00, len(data)]) + data + b"\x08"


def expected_sam(random: bytes, counter: int, amount: int, ttn: int) -> tuple[bytes, bytes]:
    keys = demo_card_keys(bytes.fromhex("00000000000000000001"))
    sk = tdes_encrypt_block(keys["dpk"], random + counter.to_bytes(2, "big") + u4(ttn)[2:])
    mac1 = plain_mac(sk, u4(amount) + b"\x06" + PSAM_TID + DATE + TIME)
    return mac1, plain_mac(sk, u4(amount))


# --- PSAM ----------------------------------------------------------------------------------

def test_psam_terminal_id_and_currency(psam: Card) -> None:
    selected(psam, PSAM_AID)
    assert tx(psam, "00B0960006") == (PSAM_TID, 0x9000)
    assert tx(psam, "00B0970003") == (bytes.fromhex("009C02"), 0x9000)
    assert tx(psam, "00B0980000")[1] == 0x6A82


def test_init_sam_mac1_and_credit_sam(psam: Card) -> None:
    selected(psam, PSAM_AID)
    data, sw = tx(psam, init_sam_apdu())
    assert sw == 0x9000 and len(data) == 8
    ttn = int.from_bytes(data[:4], "big")
    assert ttn == 1
    mac1, mac2 = expected_sam(b"\x01\x02\x03\x04", 5, 300, ttn)
    assert data[4:] == mac1
    assert tx(psam, b"\x80\x72\x00\x00\x08" + mac2 + b"TAC!")[1] == 0x9000
    state = psam.apps[0].to_state()
    assert state["next_ttn"] == 2
    rec = P.PsamRecord.parse(bytes.fromhex(state["records"][0]))
    assert (rec.terminal_txn_number, rec.card_serial, rec.card_counter, rec.amount,
            rec.tac, rec.status) == (1, SERIAL8, 5, 300, b"TAC!", 0)
    # the next INIT SAM gets the next number
    data, _ = tx(psam, init_sam_apdu())
    assert int.from_bytes(data[:4], "big") == 2


def test_credit_sam_bad_mac_and_without_init(psam: Card) -> None:
    selected(psam, PSAM_AID)
    assert tx(psam, "8072000004DEADBEEF")[1] == 0x6985
    tx(psam, init_sam_apdu())
    before = copy.deepcopy(psam.apps[0].to_state())
    # INIT SAM recorded the purchase already: no TAC, status 1 (not credited)
    (raw,) = before["records"]
    rec = P.PsamRecord.parse(bytes.fromhex(raw))
    assert (rec.terminal_txn_number, rec.tac, rec.status) == (1, bytes(4), 1)
    assert tx(psam, "8072000004DEADBEEF")[1] == 0x9302
    after = psam.apps[0].to_state()
    assert after["records"] == before["records"]  # a wrong MAC2 changes no record
    assert tx(psam, "8072000003DEADBE")[1] == 0x6985  # session gone after a failure


def test_init_sam_records_at_once_and_credit_rewrites_that_record(psam: Card) -> None:
    """T1: the record exists from INIT SAM on; CREDIT SAM completes it in place (same TTN, no
    second record); a session lost before CREDIT SAM leaves the record without TAC."""
    selected(psam, PSAM_AID)
    assert tx(psam, init_sam_apdu(amount=100))[1] == 0x9000
    assert tx(psam, "8078000000")[1] == 0x9000  # a query keeps the session
    _, mac2 = expected_sam(b"\x01\x02\x03\x04", 5, 100, 1)
    assert tx(psam, b"\x80\x72\x00\x00\x08" + mac2 + b"TAC1")[1] == 0x9000
    tx(psam, init_sam_apdu(amount=200))          # TTN 2: its host never comes back
    assert tx(psam, "807A000000")[1] == 0x9000   # another command: the session is gone
    _, mac2 = expected_sam(b"\x01\x02\x03\x04", 5, 200, 2)
    assert tx(psam, b"\x80\x72\x00\x00\x08" + mac2 + b"TAC2")[1] == 0x6985
    records = [P.PsamRecord.parse(bytes.fromhex(r))
               for r in psam.apps[0].to_state()["records"]]
    assert [(r.terminal_txn_number, r.amount, r.tac, r.status) for r in records] == [
        (1, 100, b"TAC1", 0), (2, 200, bytes(4), 1)]


@pytest.mark.parametrize(("apdu", "sw"), [
    ("8070000010" + "00" * 16, 0x6700),
    ("8070020000", 0x6A86),
    ("8072010004DEADBEEF", 0x6A86),
])
def test_psam_errors(psam: Card, apdu: str, sw: int) -> None:
    selected(psam, PSAM_AID)
    assert tx(psam, apdu)[1] == sw


def test_unknown_key_version_and_bad_date(psam: Card) -> None:
    selected(psam, PSAM_AID)
    assert tx(psam, init_sam_apdu(key_version=9))[1] == 0x9403
    bad = bytearray(init_sam_apdu())
    bad[5 + 13] = 0x99  # month byte of the date (random 4, counter 2, amount 4, type 1, YYYY)
    assert tx(psam, bytes(bad))[1] == 0x6A80
    assert psam.apps[0].to_state()["next_ttn"] == 1


def test_early_release_returns_expected_mac2_and_records(psam: Card) -> None:
    selected(psam, PSAM_AID)
    data, sw = tx(psam, init_sam_apdu(p1=1))
    assert sw == 0x9000 and len(data) == 12
    mac1, mac2 = expected_sam(b"\x01\x02\x03\x04", 5, 300, 1)
    assert data[4:8] == mac1 and data[8:] == mac2
    rec = P.PsamRecord.parse(bytes.fromhex(psam.apps[0].to_state()["records"][0]))
    assert rec.status == 1
    prev, _ = tx(psam, "8078000000")
    assert prev == u4(1) + mac1 + mac2 + bytes([P.SIGNATURE_RELEASED])


def test_blocked_card_list(psam: Card) -> None:
    selected(psam, PSAM_AID)
    assert tx(psam, "8076010008" + SERIAL8.hex())[1] == 0x9000
    assert tx(psam, init_sam_apdu())[1] == 0x6985
    assert tx(psam, init_sam_apdu(serial=bytes(8)))[1] == 0x9000
    assert tx(psam, "8076020008" + SERIAL8.hex())[1] == 0x9000
    assert tx(psam, init_sam_apdu())[1] == 0x9000
    assert tx(psam, "8076030008" + SERIAL8.hex())[1] == 0x6A86


def test_previous_signature_states(psam: Card) -> None:
    selected(psam, PSAM_AID)
    assert tx(psam, "8078000000") == (bytes(12) + b"\x00", 0x9000)
    data, _ = tx(psam, init_sam_apdu())
    prev, _ = tx(psam, "8078000000")
    assert prev[:8] == data and prev[12] == P.SIGNATURE_PENDING
    _, mac2 = expected_sam(b"\x01\x02\x03\x04", 5, 300, 1)
    data, _ = tx(psam, init_sam_apdu())
    _, mac2 = expected_sam(b"\x01\x02\x03\x04", 5, 300, 2)
    assert tx(psam, b"\x80\x72\x00\x00\x04" + mac2)[1] == 0x9000
    prev, _ = tx(psam, "8078000000")
    assert prev[:4] == u4(2) and prev[8:12] == mac2 and prev[12] == P.SIGNATURE_CREDITED


def test_totals_and_batch_close_with_mac(psam: Card) -> None:
    selected(psam, PSAM_AID)
    for amount in (100, 250):
        data, _ = tx(psam, init_sam_apdu(amount=amount))
        ttn = int.from_bytes(data[:4], "big")
        _, mac2 = expected_sam(b"\x01\x02\x03\x04", 5, amount, ttn)
        assert tx(psam, b"\x80\x72\x00\x00\x04" + mac2)[1] == 0x9000
    totals, sw = tx(psam, "807A000000")
    assert sw == 0x9000 and totals == ISSUER + u4(2) + (350).to_bytes(8, "big")
    records = [tx(psam, "807C000005" + "00" + u4(i).hex())[0] for i in range(2)]
    assert tx(psam, "807C000005" + "00" + u4(2).hex())[1] == 0x6A83
    answer, sw = tx(psam, "807E000000")
    assert sw == 0x9000
    header = PSAM_TID + u4(1) + u4(2) + (350).to_bytes(8, "big")
    assert answer[:22] == header
    batch_key = bytes.fromhex(psam.apps[0].to_state()["batch_key"])
    assert answer[22:] == plain_mac(batch_key, header + b"".join(records))
    assert tx(psam, "807A000000") == (b"", 0x9000)
    assert tx(psam, "807E010000") == (answer, 0x9000)  # the closed batch, answered again
    assert tx(psam, "807C000005" + "01" + u4(1).hex()) == (records[1], 0x9000)
    empty, _ = tx(psam, "807E000000")
    assert empty[6:10] == u4(2) and empty[10:14] == u4(0)


def test_two_level_diversification_with_the_24_byte_form(tmp_path: Path) -> None:
    issuer = (Path(__file__).parent.parent / "fixtures" / "demo-issuer.toml").read_text()
    (tmp_path / "issuer.toml").write_text(issuer.replace("diversify_by_issuer = false",
                                                         "diversify_by_issuer = true"))
    fixtures = Path(__file__).parent.parent / "fixtures"
    for name in ("iep-demo.toml", "psam-demo.toml"):
        text = (fixtures / name).read_text().replace("demo-issuer.toml", "issuer.toml")
        (tmp_path / name).write_text(text)
    from svcard.card.personalise import image_from_profile
    from svcard.host.terminal import purse as T
    from svcard.reader import VirtualReader

    iep_image = with_balance(image_from_profile(tmp_path / "iep-demo.toml"), 500)
    psam_image = image_from_profile(tmp_path / "psam-demo.toml")
    card_r = VirtualReader(card_from_image(iep_image))
    psam_r = VirtualReader(card_from_image(psam_image))
    card_r.connect()
    psam_r.connect()
    with pytest.raises(T.Declined) as err:
        T.purchase(card_r, psam_r, 10)  # the 1C form diversifies once: the card says 9302
    assert err.value.sw == 0x9302 and err.value.step == "DEBIT FOR PURCHASE"
    receipt = T.purchase(card_r, psam_r, 10, issuer_factor=True)
    assert receipt.balance_after == 490


# --- HSM -----------------------------------------------------------------------------------

def hsm_authorize_apdu(init: object, amount: int, s1: bytes | None = None, p1: int = 0,
                       issuer: bytes = ISSUER) -> bytes:
    data = (issuer + SERIAL8 + bytes([init.key_version, init.algorithm])  # type: ignore[attr-defined]
            + u4(init.balance) + u4(amount) + b"\x02" + bytes.fromhex("112233445566")  # type: ignore[attr-defined]
            + init.counter.to_bytes(2, "big") + init.random  # type: ignore[attr-defined]
            + (s1 if s1 is not None else init.mac1) + DATE + TIME)  # type: ignore[attr-defined]
    return bytes([0x80, 0xE2, p1, 0x00, len(data)]) + data


def test_hsm_authorizes_a_valid_s1_and_its_s2_loads_the_card(hsm: Card) -> None:
    selected(hsm, HSM_AID)
    card = card_from_image(with_balance(demo_image("iep"), 40))
    host = RawHost(card)
    host.select()
    init = host.init_load(60)
    s2, sw = tx(hsm, hsm_authorize_apdu(init, 60))
    assert sw == 0x9000
    assert s2 == host.load_mac2(host.load_session_key(init), 60)
    s3, sw = host.send(host.credit_apdu(s2))
    assert sw == 0x9000 and host.balance() == 100
    body = (ISSUER + SERIAL8 + u4(100) + init.counter.to_bytes(2, "big") + u4(60) + b"\x02"
            + bytes.fromhex("112233445566") + DATE + TIME)
    assert tx(hsm, bytes([0x80, 0xE6, 0, 0, len(body) + 4]) + body + s3) == (b"", 0x9000)
    forged = bytes([s3[0] ^ 0xFF]) + s3[1:]
    assert tx(hsm, bytes([0x80, 0xE6, 0, 0, len(body) + 4]) + body + forged)[1] == 0x9302


def test_hsm_refuses_tampered_s1_and_unknown_issuer(hsm: Card) -> None:
    selected(hsm, HSM_AID)
    card = card_from_image(demo_image("iep"))
    host = RawHost(card)
    host.select()
    init = host.init_load(60)
    assert tx(hsm, hsm_authorize_apdu(init, 61))[1] == 0x9302      # amount changed
    assert tx(hsm, hsm_authorize_apdu(init, 60, s1=bytes(4)))[1] == 0x9302
    assert tx(hsm, hsm_authorize_apdu(init, 60, issuer=bytes(8)))[1] == 0x9403
    assert tx(hsm, hsm_authorize_apdu(init, 60, p1=1)) == (b"", 0x9000)   # verify only
    assert tx(hsm, "80E2000003010203")[1] == 0x6700
    assert tx(hsm, "00E2000000")[1] == 0x6E00

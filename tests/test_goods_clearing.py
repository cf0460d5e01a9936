"""Issue 12: the goods the purse paid reach clearing. The goods payment server closes its
PSAMs' batches (``POST /v1/batches/close``, ``svcard goods close-batch``) and hands each
record with the TAC of its committed composite purchase (type 09); ``svcard clearing run``
then pays the goods merchant exactly the purse-paid goods whose sessions committed. Real
servers on loopback, real card and PSAM images, the real clearing run."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from svcard.fixtures import fixture_path
from svcard.host.goods import wire as W
from svcard.host.goods.batch import CloseError, close_batches
from svcard.host.goods.device import Device, FirstMessage
from svcard.host.goods.server.psam_batches import BATCH_CLOSE
from svcard.host.goods.stack import MERCHANT_ISSUER, GoodsStack, make_card, start_goods
from svcard.host.settle.clearing import ClearingReport, run_clearing
from svcard.host.settle.config import clearing_config
from svcard.host.settle.db import make_engine
from svcard.host.terminal import apdus
from svcard.host.terminal.purse import call, select_purse
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import goods as G
from svcard.protocols import purse as P
from svcard.reader.base import CardRemovedError

EP = 10_000
PRICE = 1250   # the demo ticket
MERCHANT = MERCHANT_ISSUER.hex().upper()
ACQUIRER = "4143515530303031"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[GoodsStack]:
    s = start_goods(tmp_path / "servers")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


class Clearing:
    """The clearing system: its configuration (the goods payment server's terminal pays the
    goods merchant), its database, the concentration folder."""

    def __init__(self, folder: Path, terminal: str) -> None:
        self.folder = folder
        self.batches = folder / "concentration"
        self.path = folder / "clearing.toml"
        self.path.write_text(
            'settlement_key = "5C1E2A7F0B9D4E6A8C3B1F0D2E4A6C8B9D0F1E2A3B4C5D6E7F8091A2B3C4D5E6"\n'
            f'[[issuer]]\nprofile = "{fixture_path("demo-issuer.toml")}"\n'
            f'[[terminal]]\nterminal_id = "{terminal}"\n'
            'batch_key = "311B7052A40A83B818D99E9EC07821C9"\n'
            f'merchant_id = "{MERCHANT}"\nacquirer_id = "{ACQUIRER}"\n')
        self.engine = make_engine(f"sqlite:///{folder / 'clearing.db'}")

    def run(self) -> ClearingReport:
        return run_clearing(clearing_config(self.path), self.batches, self.engine,
                            self.folder / "settlement")


def payouts(report: ClearingReport) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in report.lines:
        if line["payer"] == ACQUIRER:
            out[str(line["payee"])] = out.get(str(line["payee"]), 0) + int(line["amount"])
    return out


def first_for(stack: GoodsStack, http: httpx.Client, device: Device) -> FirstMessage:
    answer = stack.order(http, "ticket", device)
    assert answer.status_code == 200, answer.text
    order = answer.json()["order"]
    [first] = [f for f in device.poll(wait=5) if f.order == order]
    return first


def buy(stack: GoodsStack, http: httpx.Client, device: Device, card: Path) -> str:
    first = first_for(stack, http, device)
    with open_reader(f"virtual:{card}") as reader:
        out = device.pay_with_purse(reader, first)
    assert out.paid and out.written, out
    return first.order


def close(stack: GoodsStack, clearing: Clearing, resend: bool = False) -> list[Path]:
    return close_batches(stack.configs["payment"], clearing.batches, resend=resend)


def clearing_for(stack: GoodsStack, tmp_path: Path) -> Clearing:
    return Clearing(tmp_path, stack.servers["payment"].terminal)  # type: ignore[attr-defined]


def test_a_purse_good_is_paid_to_the_goods_merchant_once(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    card = make_card(tmp_path, 72_001, ep=EP)
    device = stack.device()
    buy(stack, http, device, card)
    buy(stack, http, device, card)
    clearing = clearing_for(stack, tmp_path)
    [batch] = close(stack, clearing)
    doc = json.loads(batch.read_text())
    assert [P.PsamRecord.parse(bytes.fromhex(r)).txn_type for r in doc["records"]] == \
        [P.TYPE_COMPOSITE_PURCHASE] * 2
    assert set(doc["proofs"]) == {"0", "1"}   # the TACs of the committed sessions
    report = clearing.run()
    assert report.records_cleared == 2 and report.total_paid == 2 * PRICE
    assert payouts(report) == {MERCHANT: 2 * PRICE}
    # a second close: nothing new; the files again (resend) clear nothing twice
    assert close(stack, clearing) == []
    assert close(stack, clearing, resend=True) == [batch]
    again = clearing.run()
    assert again.total_paid == 0 and again.records_cleared == 0
    assert again.batches[0]["reason"].startswith("duplicate batch")


def test_a_session_never_committed_is_held_not_paid(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    card = make_card(tmp_path, 72_002, ep=EP)
    device = stack.device()
    first = first_for(stack, http, device)
    open_session(stack, device, first, card, 72_002)   # INIT SAM made a record; no DEBIT
    clearing = clearing_for(stack, tmp_path)
    [batch] = close(stack, clearing)
    assert json.loads(batch.read_text())["proofs"] == {}
    report = clearing.run()
    assert report.total_paid == 0 and payouts(report) == {}
    assert report.batches[0]["counts"] == {"held": 1}


def open_session(stack: GoodsStack, device: Device, first: FirstMessage, card: Path,
                 serial: int) -> None:
    """INITIALIZE FOR CAPP PURCHASE and the purse debit: the PSAM records the purchase; the
    DEBIT is never sent to the card."""
    with open_reader(f"virtual:{card}") as reader:
        select_purse(reader)
        init = call(reader, apdus.initialize(G.INIT_CAPP_PURCHASE, P.PURSE_EP, 1, PRICE,
                                             bytes.fromhex(str(first.fields["terminal"]))),
                    "INITIALIZE FOR CAPP PURCHASE")
        device._post("/v1/purse/debits", W.PURSE_DEBIT, {
            "order": first.order, "device": device.id, "card": f"{serial:020d}",
            "issuer": "0102030405060708", "first": _digest(first.text),
            "init": init.hex().upper(), "uid": "", "created": int(time.time())})


def test_an_abandoned_session_retried_at_its_counter_is_paid_once(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    card = make_card(tmp_path, 72_006, ep=EP)
    device = stack.device()
    first = first_for(stack, http, device)
    open_session(stack, device, first, card, 72_006)   # abandoned: no DEBIT
    with open_reader(f"virtual:{card}") as reader:     # the same order, the same counter
        out = device.pay_with_purse(reader, first)
    assert out.paid and out.written
    clearing = clearing_for(stack, tmp_path)
    [batch] = close(stack, clearing)
    assert set(json.loads(batch.read_text())["proofs"]) == {"1"}
    report = clearing.run()
    assert report.total_paid == PRICE and payouts(report) == {MERCHANT: PRICE}
    assert report.batches[0]["counts"] == {"held": 1, "cleared": 1}
    from sqlalchemy import select

    from svcard.host.settle.db import uncleared
    with clearing.engine.connect() as conn:
        assert [r.state for r in conn.execute(select(uncleared))] == ["superseded"]


def test_a_proof_after_the_close_goes_out_late_and_pays_once(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    card = make_card(tmp_path, 72_003, ep=EP)
    device = stack.device()
    first = first_for(stack, http, device)

    class LostAnswer:   # the card commits the DEBIT; its answer never reaches the device
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def exchange(self, apdu: bytes) -> Any:
            answer = self.inner.exchange(apdu)
            if apdu[:2] == b"\x80\x54":
                raise CardRemovedError("the card was pulled")
            return answer

    with open_reader(f"virtual:{card}") as reader, pytest.raises(CardRemovedError):
        device.pay_with_purse(LostAnswer(reader), first)
    clearing = clearing_for(stack, tmp_path)
    [batch] = close(stack, clearing)              # the record goes out without its TAC
    assert json.loads(batch.read_text())["proofs"] == {}
    assert clearing.run().total_paid == 0          # held
    with open_reader(f"virtual:{card}") as reader:   # the card's next contact proves it
        [out] = device.pickup(reader)
    assert out.paid
    [late] = close(stack, clearing)
    assert late.name.startswith("proofs-")
    report = clearing.run()
    assert report.total_paid == PRICE and payouts(report) == {MERCHANT: PRICE}
    assert close(stack, clearing) == []            # the proof goes out once
    assert clearing.run().total_paid == 0


def test_a_tac_altered_in_the_files_moves_nothing(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    card = make_card(tmp_path, 72_004, ep=EP)
    device = stack.device()
    buy(stack, http, device, card)
    clearing = clearing_for(stack, tmp_path)
    [batch] = close(stack, clearing)
    doc = json.loads(batch.read_text())
    tac = bytes.fromhex(doc["proofs"]["0"])
    doc["proofs"]["0"] = bytes([tac[0] ^ 1]).hex().upper() + tac[1:].hex().upper()
    batch.write_text(json.dumps(doc))
    report = clearing.run()
    assert report.total_paid == 0 and payouts(report) == {}
    assert "does not verify" in report.batches[0]["problems"][0]["reason"]
    # the right TAC in a late proofs file of the operator's making still pays (once)
    late = {"format": "svcard late proofs v1", "terminal_id": doc["terminal_id"],
            "psam_id": doc["psam_id"],
            "proofs": [{"batch_number": doc["batch_number"],
                        "terminal_txn_number": P.PsamRecord.parse(
                            bytes.fromhex(doc["records"][0])).terminal_txn_number,
                        "tac": tac.hex().upper()}]}
    wrong = {**late, "proofs": [{**late["proofs"][0], "tac": "00000000"}]}
    (clearing.batches / f"proofs-{doc['terminal_id']}-{doc['psam_id']}-{'0' * 20}.json") \
        .write_text(json.dumps(wrong))
    assert clearing.run().total_paid == 0
    (clearing.batches / f"proofs-{doc['terminal_id']}-{doc['psam_id']}-{'1' * 20}.json") \
        .write_text(json.dumps(late))
    assert clearing.run().total_paid == PRICE


def test_only_the_payment_party_closes(stack: GoodsStack, http: httpx.Client,
                                       tmp_path: Path) -> None:
    url = stack.url("payment") + "/v1/batches/close"
    payload = {"resend": True, "created": int(time.time())}
    for role in ("auth", "merchant", "fulfil"):   # another party's key, in its own name
        body, headers = W.signed(stack.keys[role], stack.system.peer(role).id, BATCH_CLOSE,
                                 payload)
        assert http.post(url, content=body, headers=headers).status_code == 403
    me = stack.system.peer("payment").id
    body, headers = W.signed(stack.keys["auth"], me, BATCH_CLOSE, payload)   # forged
    assert http.post(url, content=body, headers=headers).status_code == 401
    body, headers = W.signed(stack.keys["payment"], me, W.PURSE_PROOF, payload)  # other label
    assert http.post(url, content=body, headers=headers).status_code == 401
    old = {**payload, "created": int(time.time()) - 3600}                     # replayed late
    body, headers = W.signed(stack.keys["payment"], me, BATCH_CLOSE, old)
    assert http.post(url, content=body, headers=headers).status_code == 401
    body, headers = W.signed(stack.keys["payment"], me, BATCH_CLOSE, payload)
    assert http.post(url, content=body[:-2], headers=headers).status_code in (400, 401)
    clearing = clearing_for(stack, tmp_path)
    assert close(stack, clearing) == []   # nothing bought: every batch empty


def test_a_file_of_other_bytes_is_never_overwritten(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    card = make_card(tmp_path, 72_005, ep=EP)
    device = stack.device()
    buy(stack, http, device, card)
    clearing = clearing_for(stack, tmp_path)
    [batch] = close(stack, clearing)
    batch.write_text("{}")
    with pytest.raises(CloseError, match="not overwritten"):
        close(stack, clearing, resend=True)
    assert batch.read_text() == "{}"


def _digest(text: str) -> str:
    from svcard.host.goods.server.auth import digest
    return digest(text)


def goods_toml(stack: GoodsStack, folder: Path, payment_key: bytes) -> Path:
    """The stack's system as a goods.toml, with ``payment_key`` as the payment party's key."""
    from svcard.protocols.signatures import write_private_key

    folder.mkdir(parents=True, exist_ok=True)
    write_private_key(folder / "payment.key", payment_key)
    lines = []
    for role, peer in stack.system.parties.items():
        lines += [f"[parties.{role}]", f'id = "{peer.id}"', f'url = "{peer.url}"',
                  f'public_key = "{peer.public_key.hex()}"']
        if role == "payment":
            lines.append('private_key_file = "payment.key"')
        if role == "merchant":
            lines.append(f'issuer_id = "{MERCHANT}"')
        if role == "bank":
            lines.append(f'seal_key = "{stack.system.seal_key.hex()}"')
    lines += ["[[item]]", 'sku = "ticket"', 'kind = "ticket"', "price = 1250", "value = 1250"]
    path = folder / "goods.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_command_line_closes_and_clearing_pays(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from svcard.host.cli.main import main as cli

    card = make_card(tmp_path, 72_007, ep=EP)
    buy(stack, http, stack.device(), card)
    clearing = clearing_for(stack, tmp_path)
    out = str(clearing.batches)
    wrong = goods_toml(stack, tmp_path / "wrong", stack.keys["auth"])   # not the payment key
    result = CliRunner().invoke(cli, ["goods", "close-batch", "--config", str(wrong),
                                      "--out", out])
    assert result.exit_code == 1 and "401" in result.output, result.output
    assert not clearing.batches.exists()
    right = goods_toml(stack, tmp_path / "right", stack.keys["payment"])
    result = CliRunner().invoke(cli, ["goods", "close-batch", "--config", str(right),
                                      "--out", out, "--json"])
    assert result.exit_code == 0, result.output
    [name] = json.loads(result.output)["files"]
    assert Path(name).name.startswith("batch-")
    result = CliRunner().invoke(cli, ["clearing", "run", "--config", str(clearing.path),
                                      "--batches", out, "--db",
                                      f"sqlite:///{tmp_path / 'clearing.db'}",
                                      "--out", str(tmp_path / "settlement"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["total_paid"] == PRICE
    stack.threads["payment"].stop()
    result = CliRunner().invoke(cli, ["goods", "close-batch", "--config", str(right),
                                      "--out", out])
    assert result.exit_code == 11 and "cannot reach" in result.output, result.output


def test_the_audit_ties_purse_goods_to_clearing(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    from sqlalchemy import update

    from svcard.card.storage import read_image
    from svcard.host.goods import db as D
    from svcard.host.kit.db import step
    from svcard.host.settle.audit import audit

    serial = 72_008
    card = make_card(tmp_path, serial, ep=EP)
    device = stack.device()
    buy(stack, http, device, card)
    # a good the bank pays too (the goods audit reads the institution's books)
    stack.account("acc1", serial, balance=5_000)
    answer = stack.order(http, "ticket", device)
    assert answer.status_code == 200, answer.text
    [first] = [f for f in device.poll(wait=5) if f.order == answer.json()["order"]]
    with open_reader(f"virtual:{card}") as reader:
        assert device.authorise(reader, first, "123456").written
    clearing = clearing_for(stack, tmp_path)
    dbs = tuple(stack.configs[r].db_url for r in ("merchant", "payment", "auth", "bank",
                                                  "fulfil"))
    url = f"sqlite:///{tmp_path / 'clearing.db'}"

    def books() -> Any:
        cards = {f"{serial:020d}": int(read_image(card)["app"]["ep"]["balance"])}
        return audit(cards, goods_dbs=dbs, clearing_db=url, opening=EP)

    before = books()   # the debit proved, not yet cleared: unsettled
    assert before.clean, before.text()
    assert before.figures["purchases unsettled"] == PRICE
    close(stack, clearing)
    clearing.run()
    after = books()    # cleared: settled, the goods merchant paid (ledger)
    assert after.clean, after.text()
    assert after.figures["purchases settled"] == PRICE
    assert after.figures["purchases unsettled"] == 0
    assert after.figures["merchants paid (ledger)"] == PRICE
    with step(stack.engine("payment")) as conn:   # the books lose the committed session
        conn.execute(update(D.purse_sessions).values(state=D.FAILED))
    lost = books()
    assert not lost.clean
    assert any("has no confirmed payment" in d for d in lost.discrepancies), lost.text()


def test_a_batch_closed_but_not_kept_is_read_again_at_the_next_close(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from svcard.host.goods.server import psam_batches

    card = make_card(tmp_path, 72_009, ep=EP)
    buy(stack, http, stack.device(), card)
    clearing = clearing_for(stack, tmp_path)
    real = psam_batches.keep_batch

    def crash(*args: Any) -> Any:   # the step after CLOSE BATCH never runs
        raise OSError("the database went away")

    monkeypatch.setattr(psam_batches, "keep_batch", crash)
    with pytest.raises(CloseError, match="500"):
        close(stack, clearing)
    monkeypatch.setattr(psam_batches, "keep_batch", real)
    [batch] = close(stack, clearing)   # the PSAM answers its last closed batch again
    assert set(json.loads(batch.read_text())["proofs"]) == {"0"}
    assert clearing.run().total_paid == PRICE
    assert close(stack, clearing) == []


def test_every_psam_of_the_pool_is_closed(http: httpx.Client, tmp_path: Path) -> None:
    stack = start_goods(tmp_path / "servers", psams=2)
    try:
        device = stack.device()
        cards = [make_card(tmp_path, 72_010 + i, ep=EP) for i in range(4)]
        for card in cards:
            buy(stack, http, device, card)
        clearing = clearing_for(stack, tmp_path)
        files = close(stack, clearing)
        psams = {json.loads(f.read_text())["psam_id"] for f in files}
        records = sum(len(json.loads(f.read_text())["records"]) for f in files)
        assert records == 4 and len(psams) == len(files)
        report = clearing.run()
        assert report.total_paid == 4 * PRICE and payouts(report) == {MERCHANT: 4 * PRICE}
    finally:
        stack.close()


def test_raced_and_replayed_closes_hand_each_record_once(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    card = make_card(tmp_path, 72_020, ep=EP)
    device = stack.device()
    for _ in range(3):
        buy(stack, http, device, card)
    clearing = clearing_for(stack, tmp_path)
    with ThreadPoolExecutor(4) as pool:   # four closes at once: one at a time at the server
        found = [f for got in pool.map(lambda _: close(stack, clearing), range(4)) for f in got]
    assert len(found) == 1 and len(json.loads(found[0].read_text())["records"]) == 3
    url = stack.url("payment") + "/v1/batches/close"
    body, headers = W.signed(stack.keys["payment"], stack.system.peer("payment").id,
                             BATCH_CLOSE, {"resend": False, "created": int(time.time())})
    for _ in range(2):   # the same signed request again: it closes (empty) batches only
        answer = http.post(url, content=body, headers=headers)
        assert answer.status_code == 200 and answer.json()["files"] == []
    report = clearing.run()
    assert report.total_paid == 3 * PRICE and report.records_cleared == 3


def test_a_psam_pulled_mid_close_is_503_and_its_batch_read_again(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from svcard.host.goods.server import psam_batches

    card = make_card(tmp_path, 72_030, ep=EP)
    buy(stack, http, stack.device(), card)
    clearing = clearing_for(stack, tmp_path)
    real = psam_batches.close_open

    def pulled(reader: Any) -> Any:   # CLOSE BATCH done, then the PSAM is gone
        assert reader.exchange(apdus.sam_close_batch()).ok
        raise CardRemovedError("the PSAM was pulled")

    monkeypatch.setattr(psam_batches, "close_open", pulled)
    with pytest.raises(CloseError, match=r"503.*PSAM failed"):
        close(stack, clearing)
    monkeypatch.setattr(psam_batches, "close_open", real)
    [batch] = close(stack, clearing)
    assert len(json.loads(batch.read_text())["records"]) == 1
    assert clearing.run().total_paid == PRICE


def test_a_system_of_purse_goods_only_audits_clean(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    """No bank payment at all: the goods books read the institution's empty tables."""
    from svcard.card.storage import read_image
    from svcard.host.settle.audit import audit

    serial = 72_040
    card = make_card(tmp_path, serial, ep=EP)
    buy(stack, http, stack.device(), card)
    clearing = clearing_for(stack, tmp_path)
    close(stack, clearing)
    clearing.run()
    dbs = tuple(stack.configs[r].db_url for r in ("merchant", "payment", "auth", "bank",
                                                  "fulfil"))
    cards = {f"{serial:020d}": int(read_image(card)["app"]["ep"]["balance"])}
    report = audit(cards, goods_dbs=dbs, clearing_db=f"sqlite:///{tmp_path / 'clearing.db'}",
                   opening=EP)
    assert report.clean, report.text()
    assert report.figures["goods 156: purse goods written"] == PRICE
    assert report.figures["purchases settled"] == PRICE

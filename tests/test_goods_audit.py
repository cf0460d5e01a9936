"""The goods system in ``svcard audit`` (seed 000): the five servers on loopback, real card
images; the audit reads the parties' databases (read only) and the cards' goods. Clean after
goods written and one refunded; every tampering below is found."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import test_goods_random as GR
from click.testing import CliRunner
from sqlalchemy import delete, insert, update
from test_goods_flow import buy
from test_goods_pickup import paid_while_fulfilment_was_down

from svcard.host.cli.main import main as cli
from svcard.host.goods import db as D
from svcard.host.goods import records as R
from svcard.host.goods.config import ROLES
from svcard.host.goods.stack import GoodsStack, make_card, start_goods
from svcard.host.kit.db import DatabaseError, step
from svcard.host.settle.audit import AuditReport, audit
from svcard.host.settle.goods_books import card_goods
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import goods as G
from svcard.protocols import purse as P
from svcard.reader.base import CardRemovedError, Reader

SERIAL = 70_301
PURSE_SERIAL = 70_302
DAY_MS = 24 * 3600 * 1000


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[GoodsStack]:
    s = start_goods(tmp_path / "servers")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def bought(stack: GoodsStack, tmp_path: Path) -> dict[str, Any]:
    """A ticket and a coupon written onto the card, a third good refunded (paid while the
    fulfilment server was down, never picked up, refunded past its deadline)."""
    card = make_card(tmp_path, SERIAL)
    stack.account("acc1", SERIAL, balance=10_000)
    device = stack.device()
    with httpx.Client(timeout=30) as http:
        written = [buy(stack, http, device, card, sku) for sku in ("ticket", "coupon")]
    refunded = paid_while_fulfilment_was_down(stack, device, card)
    later = stack.fulfil.now_ms() + 8 * DAY_MS
    assert asyncio.run(stack.fulfil.refund_due(at_ms=later)) == 1
    return {"card": card, "written": written, "refunded": refunded}


def urls(stack: GoodsStack) -> tuple[str, ...]:
    return tuple(stack.configs[r].db_url for r in ROLES)


def goods_of(card: Path) -> dict[str, list[bytes]]:
    with open_reader(f"virtual:{card}") as reader:
        return card_goods([reader], P.DEFAULT_IEP_AID)


def run(stack: GoodsStack, card: Path | None = None, **kw: Any) -> AuditReport:
    return audit({}, goods_dbs=urls(stack), card_goods=goods_of(card) if card else None, **kw)


def tamper(stack: GoodsStack, role: str, statement: Any) -> None:
    with step(stack.engine(role)) as conn:
        assert conn.execute(statement).rowcount == 1


def test_written_and_refunded_goods_audit_clean_to_the_minor_unit(
        stack: GoodsStack, bought: dict[str, Any]) -> None:
    report = run(stack, bought["card"])
    assert report.clean, report.discrepancies
    f = report.figures
    assert f["goods 156: bank debits"] == 1250 + 100 + 1250
    assert f["goods 156: bank credits"] == f["goods 156: goods refunded"] == 1250
    assert f["goods 156: goods written"] == 1350 and f["goods 156: goods open"] == 0
    assert len([c for c in report.checks if c["name"].startswith("goods")]) == 4
    assert {R.role_of(u) for u in urls(stack)} == set(ROLES)


def test_the_command_line_audits_the_goods_dbs_and_the_card(
        stack: GoodsStack, bought: dict[str, Any]) -> None:
    args = ["audit", "--card", str(bought["card"])]
    for url in urls(stack):
        args += ["--goods-db", url]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "goods 156: bank credits = goods refunded" in result.output
    assert "clean" in result.output
    tamper(stack, "fulfil", update(D.goods).where(D.goods.c.order_ref == bought["refunded"])
           .values(state="written", writes=1))
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "does not hold it" in result.output


def test_a_good_marked_written_with_no_write_is_found(
        stack: GoodsStack, bought: dict[str, Any]) -> None:
    order = bought["written"][0]
    tamper(stack, "fulfil", update(D.goods).where(D.goods.c.order_ref == order)
           .values(writes=0))
    report = run(stack)
    assert any(order in d and "no write of it was ever handed out" in d
               for d in report.discrepancies), report.discrepancies


def test_a_good_marked_written_that_the_card_lacks_is_found(
        stack: GoodsStack, bought: dict[str, Any], tmp_path: Path) -> None:
    report = run(stack, make_card(tmp_path / "other", SERIAL))   # same serial, no goods
    assert sum("does not hold it" in d for d in report.discrepancies) == 2


def test_a_refund_with_no_bank_credit_is_found(
        stack: GoodsStack, bought: dict[str, Any]) -> None:
    order = bought["written"][1]
    tamper(stack, "fulfil", update(D.goods).where(D.goods.c.order_ref == order)
           .values(state="refunded"))
    report = run(stack)
    assert any(order in d and "never credited it back" in d for d in report.discrepancies)
    assert any(d.startswith("check failed: goods 156: bank credits = goods refunded")
               for d in report.discrepancies)


def test_a_paid_good_vanished_is_found(stack: GoodsStack, bought: dict[str, Any]) -> None:
    order = bought["written"][0]
    tamper(stack, "fulfil", delete(D.goods).where(D.goods.c.order_ref == order))
    report = run(stack)
    assert any(order in d and "vanished" in d for d in report.discrepancies)
    assert any("bank debits = goods kept" in d for d in report.discrepancies)


def test_a_good_without_payment_is_found(stack: GoodsStack, bought: dict[str, Any]) -> None:
    order = bought["written"][0]
    tamper(stack, "bank", delete(D.bank_payments).where(
        D.bank_payments.c.order_ref == order))
    report = run(stack)
    assert any(order in d and "good without payment" in d for d in report.discrepancies)
    assert any("payment server has order" in d for d in report.discrepancies)


def test_a_good_both_written_and_credited_back_is_found(
        stack: GoodsStack, bought: dict[str, Any]) -> None:
    order = bought["written"][0]
    tamper(stack, "bank", update(D.bank_payments).where(
        D.bank_payments.c.order_ref == order).values(state="refunded"))
    report = run(stack)
    assert any(order in d and "written and refunded" in d for d in report.discrepancies)


def test_a_good_on_the_card_twice_or_never_bought_is_found(
        stack: GoodsStack, bought: dict[str, Any]) -> None:
    goods = goods_of(bought["card"])
    [serial] = goods
    record = goods[serial][0]
    stranger = record[:10] + bytes(8) + record[18:]     # the merchant's issuer, no such good
    report = audit({}, goods_dbs=urls(stack),
                   card_goods={serial: [*goods[serial], record, stranger]})
    assert any("twice" in d for d in report.discrepancies)
    assert any("which no payment bought" in d for d in report.discrepancies)


def test_a_pending_good_past_its_deadline_is_found(stack: GoodsStack, tmp_path: Path) -> None:
    card = make_card(tmp_path, SERIAL)
    stack.account("acc1", SERIAL, balance=10_000)
    order = paid_while_fulfilment_was_down(stack, stack.device(), card)
    assert run(stack).clean                                  # pending, within its deadline
    report = run(stack, now=stack.fulfil.now_ms() + 8 * DAY_MS)
    assert any(order in d and "past its pick-up deadline" in d for d in report.discrepancies)


def test_a_debit_not_yet_at_the_fulfilment_server_is_listed_then_a_finding(
        stack: GoodsStack, bought: dict[str, Any]) -> None:
    order = bought["written"][0]
    tamper(stack, "fulfil", delete(D.goods).where(D.goods.c.order_ref == order))
    tamper(stack, "payment", update(D.payment_orders).where(
        D.payment_orders.c.order_ref == order).values(answer=None))
    report = run(stack)
    assert report.clean and [p["order"] for p in report.goods_pending] == [order]
    assert "goods on their way: 1" in report.text()
    late = run(stack, now=stack.fulfil.now_ms() + 8 * DAY_MS)
    assert any(order in d and "maximum age" in d for d in late.discrepancies)


def test_a_database_of_no_goods_party_is_refused(tmp_path: Path, stack: GoodsStack) -> None:
    with pytest.raises(DatabaseError, match=r"no such|does not exist|not a"):
        R.role_of(f"sqlite:///{tmp_path / 'missing.db'}")
    result = CliRunner().invoke(cli, ["audit", "--goods-db", f"sqlite:///{tmp_path}/x.db"])
    assert result.exit_code == 3 and "x.db" in result.output
    assert not (tmp_path / "x.db").exists()


AUDIT_RUNS = int(os.environ.get("SVCARD_GOODS_AUDIT_RUNS", "12"))
AUDIT_SEED = int(os.environ.get("SVCARD_GOODS_AUDIT_SEED", "4"))   # 4: a refund among 12


def test_random_goods_audit_clean_after_every_good_and_at_the_end(
        tmp_path: Path) -> None:
    """Goods bought with link cuts, declines and the fulfilment server down (G1's randomised
    steps), picked up or refunded: the audit is clean after every good (what is on its way is
    listed, never a finding) and at the end, with every card's goods read."""
    print(f"goods audit randomised run: SVCARD_GOODS_AUDIT_RUNS={AUDIT_RUNS} "
          f"SVCARD_GOODS_AUDIT_SEED={AUDIT_SEED}")
    offset = [0.0]
    stack = start_goods(tmp_path / "servers", clock=lambda: time.time() + offset[0])
    try:
        rng = random.Random(AUDIT_SEED)
        device = stack.device()
        cards: dict[str, Path] = {}
        with httpx.Client(timeout=30) as http:
            for n in range(AUDIT_RUNS):
                serial = 91_000 + n // GR.PER_CARD
                if f"{serial:020d}" not in cards:
                    cards[f"{serial:020d}"] = make_card(tmp_path / "cards", serial)
                    stack.account(f"acc{serial}", serial, balance=GR.START)
                GR.one_good(stack, rng, device, cards[f"{serial:020d}"], http,
                            GR.SKUS[n % len(GR.SKUS)])
                report = run(stack)
                assert report.clean, (n, report.discrepancies)
        offset[0] = stack.system.issue_lease + 1
        for card in cards.values():
            if rng.random() < 0.5:
                with open_reader(f"virtual:{card}") as reader:
                    device.pickup(reader)
        later = stack.fulfil.now_ms() + 8 * DAY_MS
        asyncio.run(stack.fulfil.refund_due(at_ms=later))
        for card in cards.values():
            with open_reader(f"virtual:{card}") as reader:
                device.pickup(reader)
        on_cards: dict[str, list[bytes]] = {}
        for card in cards.values():
            on_cards.update(goods_of(card))
        report = audit({}, goods_dbs=urls(stack), card_goods=on_cards, now=later)
        assert report.clean, report.discrepancies
        assert report.goods_pending == []
        f = report.figures
        print(f"  bank debits {f['goods 156: bank debits']}, written "
              f"{f['goods 156: goods written']}, refunded {f['goods 156: goods refunded']}")
        assert f["goods 156: goods open"] == 0
        assert f["goods 156: bank debits"] == (f["goods 156: goods written"]
                                               + f["goods 156: goods refunded"])
    finally:
        stack.close()


# --- goods the purse paid (the composite purchase) ----------------------------------------------
@pytest.fixture
def purse_bought(stack: GoodsStack, tmp_path: Path) -> dict[str, Any]:
    """On one card: a ticket paid by the purse, a coupon paid by the purse, a voucher paid
    from the bank account; a fourth good's purse purchase never committed (expired)."""
    card = make_card(tmp_path, PURSE_SERIAL, ep=50_000)
    stack.account("acc2", PURSE_SERIAL, balance=10_000)
    device = stack.device()
    purse = []
    with httpx.Client(timeout=30) as http:
        for sku in ("ticket", "coupon"):
            assert stack.order(http, sku, device).status_code == 200
            [first] = device.poll(wait=5)
            with open_reader(f"virtual:{card}") as reader:
                assert device.pay_with_purse(reader, first).written
            purse.append(first.order)
        bank = buy(stack, http, device, card, "airtime")
        assert stack.order(http, "rides10", device).status_code == 200
        [first] = device.poll(wait=5)
        with open_reader(f"virtual:{card}") as reader, pytest.raises(CardRemovedError):
            device.pay_with_purse(cast(Reader, CutBefore(reader, b"\x80\x54")), first)   # no DEBIT
    assert stack.fulfil.purse_expire(stack.fulfil.now_ms() + 8 * DAY_MS) == 1
    return {"card": card, "purse": purse, "bank": bank, "expired": first.order}


class CutBefore:
    def __init__(self, inner: Reader, prefix: bytes) -> None:
        self.inner, self.prefix = inner, prefix

    def exchange(self, apdu: bytes) -> Any:
        if apdu.startswith(self.prefix):
            raise CardRemovedError("the card was pulled")
        return self.inner.exchange(apdu)


def test_goods_the_purse_paid_audit_clean_with_the_card_read(
        stack: GoodsStack, purse_bought: dict[str, Any]) -> None:
    report = run(stack, purse_bought["card"])
    assert report.clean, report.discrepancies
    f = report.figures
    assert f["goods 156: purse debits"] == f["goods 156: purse goods written"] == 1250 + 100
    assert f["goods 156: goods written"] == 5000
    assert len(goods_of(purse_bought["card"])[f"{PURSE_SERIAL:020d}"]) == 3


def test_a_purse_good_marked_written_without_a_proved_debit_is_found(
        stack: GoodsStack, purse_bought: dict[str, Any]) -> None:
    order = purse_bought["expired"]
    tamper(stack, "fulfil", update(D.purse_goods).where(D.purse_goods.c.order_ref == order)
           .values(state="written"))
    report = run(stack)
    assert any(order in d and "no purse debit of it was proved" in d
               for d in report.discrepancies), report.discrepancies
    assert any("purse debits proved = purse goods written" in d for d in report.discrepancies)


def test_a_proved_purse_debit_whose_good_is_not_written_is_found(
        stack: GoodsStack, purse_bought: dict[str, Any]) -> None:
    order = purse_bought["purse"][0]
    tamper(stack, "fulfil", update(D.purse_goods).where(D.purse_goods.c.order_ref == order)
           .values(state="expired"))
    report = run(stack, purse_bought["card"])
    assert any(order in d and "the purse paid it" in d for d in report.discrepancies)
    good_id = order[:16].upper()
    assert any(good_id in d and "no debit proved" in d for d in report.discrepancies), \
        report.discrepancies


def test_an_order_debited_twice_from_the_purse_is_found(
        stack: GoodsStack, purse_bought: dict[str, Any]) -> None:
    order = purse_bought["purse"][0]
    s = D.purse_sessions
    with step(stack.engine("payment")) as conn:
        row = conn.execute(s.select().where(s.c.order_ref == order)).first()
        assert row is not None
        values = {k: v for k, v in row._mapping.items() if k != "id"}
        conn.execute(insert(s).values({**values, "counter": row.counter + 5}))
    report = run(stack)
    assert any(order in d and "debited from the purse twice" in d
               for d in report.discrepancies), report.discrepancies


def test_a_good_paid_both_by_the_purse_and_the_bank_is_found(
        stack: GoodsStack, purse_bought: dict[str, Any]) -> None:
    order = purse_bought["bank"]
    g = D.goods
    with step(stack.engine("fulfil")) as conn:
        row = conn.execute(g.select().where(g.c.order_ref == order)).first()
        assert row is not None
        conn.execute(insert(D.purse_goods).values(
            order_ref=order, state="expired", card=row.card, device=row.device,
            merchant=row.merchant, record=row.record, sfi=row.sfi, counter=0,
            deadline=row.deadline, amount=row.amount, currency_code=row.currency_code,
            created=row.created, updated=row.updated))
    report = run(stack)
    assert any(order in d and "paid twice" in d for d in report.discrepancies)


def test_a_good_on_a_card_not_as_it_was_sold_is_found(
        stack: GoodsStack, bought: dict[str, Any], tmp_path: Path) -> None:
    """Only using a good changes it (its status; a token's rides left going down): a card
    whose good is worth more or rides more than was sold is a finding."""
    card = make_card(tmp_path / "rides", SERIAL + 5)
    stack.account("acc5", SERIAL + 5, balance=10_000)
    with httpx.Client(timeout=30) as http:
        buy(stack, http, stack.device(), card, "rides10")
    held = {**goods_of(bought["card"]), **goods_of(card)}
    ticket_card, token_card = f"{SERIAL:020d}", f"{SERIAL + 5:020d}"
    [ticket, coupon] = held[ticket_card]
    [token] = held[token_card]

    def audited(ticket: bytes, token: bytes) -> list[str]:
        return audit({}, goods_dbs=urls(stack), card_goods={
            ticket_card: [ticket, coupon], token_card: [token]}).discrepancies

    def rides(record: bytes, left: int) -> bytes:
        return record[:26] + left.to_bytes(2, "big") + record[28:]

    used = ticket[:1] + bytes([G.STATUS_USED]) + ticket[2:]
    assert audited(used, rides(token, 9)) == []           # used: as sold
    worth = int.from_bytes(ticket[26:30], "big") * 10
    richer = ticket[:26] + worth.to_bytes(4, "big") + ticket[30:]
    assert any("not as it was sold: its value" in d for d in audited(richer, token))
    found = audited(ticket, rides(token, 11))
    assert any("not as it was sold: 11 rides left, 10 bought" in d for d in found), found
    longer = ticket[:22] + b"\x20\x99\x12\x31" + ticket[26:]
    assert any("validity differ" in d for d in audited(longer, token))

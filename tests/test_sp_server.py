"""The SP server end to end over loopback (seed 001 FIG. 2 and 3A): a customer's signed retail
order becomes a wholesale card payment at the merchant, made by the SP's purse pool through the
real payment server, and a bill line; non-billable customers are refused with nothing paid;
concurrent orders cannot overrun one credit limit; paid orders are billed after a restart and
never paid twice."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text, update

from svcard.host.demo.system import System
from svcard.host.pay.merchant import db as MD
from svcard.host.sp import db as D
from svcard.host.sp import records
from svcard.host.sp.billing import DAY_MS, bill_order
from svcard.host.sp.config import BillingEntry
from svcard.host.sp.purses.pool import PursePool, PursePoolConfig
from svcard.host.sp.stack import SpStack, demo_config, purse_images, start_sp


class Clock:
    """The SP server's clock, moved by the tests."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


@dataclass
class Sp:
    system: System
    stack: SpStack
    clock: Clock
    purses: list[Path]
    folder: Path

    def balances(self) -> list[int]:
        return [int(json.loads(p.read_text())["app"]["ep"]["balance"]) for p in self.purses]

    def merchant_paid(self) -> int:
        return int(self.system.pay.merchant_server.db.counts().get(MD.PAID, 0))


def pool_config(system: System, purses: list[Path]) -> PursePoolConfig:
    return PursePoolConfig(readers=[f"virtual:{p}" for p in purses],
                           bank_url=system.load.bank_url, account="sp-bank", secret="sp-pw",
                           currency_code=156)


def open_sp(system: System, folder: Path, *, purses: int = 2, first_serial: int = 9_000_001,
            billing: BillingEntry | None = None, wholesale: dict[str, int] | None = None,
            db_url: str | None = None) -> Sp:
    system.load.account("sp-bank", 1_000_000, "sp-pw")
    images = purse_images(folder / "purses", purses, ep=50_000, first_serial=first_serial)
    clock = Clock()
    config = demo_config(folder, system.pay.merchant.url, billing=billing, wholesale=wholesale,
                         purses=pool_config(system, images), db_url=db_url)
    return Sp(system, start_sp(config, clock=clock), clock, images, folder)


@pytest.fixture
def sp(system: System, tmp_path: Path) -> Iterator[Sp]:
    s = open_sp(system, tmp_path / "sp")
    yield s
    s.stack.close()


def test_retail_order_is_paid_wholesale_and_billed(sp: Sp, http: httpx.Client) -> None:
    alice = sp.stack.customer("alice", credit_limit=10_000)
    before = sp.balances()
    answer = sp.stack.order(http, alice, "song")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["state"] == "billed"
    assert body["goods"].startswith("https://")            # relayed merchandise (FIG. 3A 316)
    assert body["receipt"]["amount"] == 99                  # the merchant's own receipt
    # retail 1.20 from the SP's catalogue, wholesale 0.99 paid, fee 0.05, half the 0.21
    # wholesale discount passed on (0.10): billed 1.15
    assert body["line"] == {"retail": 120, "wholesale": 99, "fee": 5, "discount": 10,
                            "billed": 115, "currency_code": 156}
    assert sum(before) - sum(sp.balances()) == 99           # one purse debited the wholesale
    assert sp.merchant_paid() == 1                          # an ordinary card payment
    url = sp.stack.config.db_url
    [c] = records.customers(url)
    assert (c["reserved"], c["open_total"], c["owed"]) == (0, 115, 0)
    events = [e["event"] for e in records.order_log(url, body["order"])]
    assert events == ["ordered", "paid", "billed"]
    [line] = records.bill_lines(url)
    assert (line["order_ref"], line["purse_serial"] != "") == (body["order"], True)


def _overdue_bill(sp: Sp, customer: str) -> None:
    with sp.stack.engine.begin() as conn:
        from svcard.host.sp.billing import issue_bill, log_event

        log_event(conn, "spo-test", customer, "test", 0)
        conn.execute(D.bill_lines.insert().values(
            order_ref="spo-old", customer=customer, merchant="M", sku="s", item="old",
            retail=10, wholesale=10, fee=0, discount=0, billed=10, currency_code=156,
            merchant_txn="", purse_serial="", created=0))
        conn.execute(update(D.customers).where(D.customers.c.id == customer).values(
            open_total=D.customers.c.open_total + 10))
        issue_bill(conn, customer, "manual", 0, 14)   # issued at 1970: long overdue


def test_each_non_billable_customer_is_refused_with_nothing_paid(
        sp: Sp, http: httpx.Client) -> None:
    from svcard.host.sp.customers import set_blocked
    from svcard.host.sp.stack import Customer

    blocked = sp.stack.customer("bob")
    set_blocked(sp.stack.engine, "bob", True, "fraud check")
    late = sp.stack.customer("carol")
    _overdue_bill(sp, "carol")
    poor = sp.stack.customer("dave", credit_limit=100)     # a song holds 1.25
    stranger = Customer("eve", sp.stack.customer("eve-twin").key)   # no account "eve"
    before = sp.balances()
    expect = {"bob": (402, "blocked"), "carol": (402, "bad_history"),
              "dave": (402, "credit_limit"), "eve": (403, None)}
    for who in (blocked, late, poor, stranger):
        answer = sp.stack.order(http, who, "song")
        status, kind = expect[who.id]
        assert answer.status_code == status, (who.id, answer.text)
        assert answer.json().get("kind") == kind
        assert answer.json()["reason"]
    assert sp.balances() == before and sp.merchant_paid() == 0
    url = sp.stack.config.db_url
    rejected = records.orders(url, "rejected")
    assert sorted(o["customer"] for o in rejected) == ["bob", "carol", "dave"]
    assert all(c["reserved"] == 0 for c in records.customers(url))
    assert {e["event"] for e in records.order_log(url) if e["customer"] == "dave"} == {
        "rejected"}


def test_concurrent_orders_cannot_overrun_one_credit_limit(sp: Sp) -> None:
    # room for exactly two songs (2 x 1.25 reserved), eight asked at once
    frank = sp.stack.customer("frank", credit_limit=250)
    before = sp.balances()
    with httpx.Client(timeout=60) as http, cf.ThreadPoolExecutor(8) as ex:
        answers = list(ex.map(lambda _i: sp.stack.order(http, frank, "song"), range(8)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 200] + [402] * 6, [a.text for a in answers]
    assert all(a.json()["kind"] == "credit_limit" for a in answers if a.status_code == 402)
    assert sum(before) - sum(sp.balances()) == 2 * 99 and sp.merchant_paid() == 2
    [c] = records.customers(sp.stack.config.db_url)
    assert (c["reserved"], c["open_total"]) == (0, 230)


def test_forged_replayed_stale_and_malformed_orders(sp: Sp, http: httpx.Client) -> None:
    from svcard.host.sp.signing import HEADER, sign, signed_order

    gina = sp.stack.customer("gina")
    other = sp.stack.customer("hank")
    url = f"{sp.stack.url}/v1/orders"
    # signed by another customer's key
    body, headers = signed_order(other.key, "gina", "MERCH001", "song")
    assert http.post(url, content=body, headers=headers).status_code == 401
    # a good signature, then the body changed (a dearer item)
    body, headers = signed_order(gina.key, "gina", "MERCH001", "song")
    forged = body.replace(b'"song"', b'"ticket"')
    assert http.post(url, content=forged, headers=headers).status_code == 401
    # no signature
    assert http.post(url, content=body,
                     headers={"Content-Type": "application/json"}).status_code == 401
    # the honest order, then the same bytes replayed
    first = http.post(url, content=body, headers=headers)
    assert first.status_code == 200, first.text
    again = http.post(url, content=body, headers=headers)
    assert again.status_code == 409 and again.json()["order"] == first.json()["order"]
    # the same order key with another item, freshly signed: still the used key
    reuse = json.loads(body)
    reuse["sku"] = "article"
    raw = json.dumps(reuse).encode()
    assert http.post(url, content=raw, headers={HEADER: sign(gina.key, raw)}
                     ).status_code == 409
    # made too long ago (held back and sent later)
    body, headers = signed_order(gina.key, "gina", "MERCH001", "song",
                                 created=int(time.time()) - 1000)
    assert http.post(url, content=body, headers=headers).status_code == 401
    # malformed: an extra field, a price of the customer's own, a huge body
    for bad in ({**json.loads(body), "price": 1}, {"customer": "gina"}, [1, 2]):
        raw = json.dumps(bad).encode()
        answer = http.post(url, content=raw, headers={HEADER: sign(gina.key, raw)})
        assert answer.status_code == 400, answer.text
    huge = b'{"customer":"' + b"g" * 5000 + b'"}'
    assert http.post(url, content=huge, headers={HEADER: "00" * 64}).status_code == 413
    # a lookup: another customer's order is not found; an order's signature is not a lookup's
    from svcard.host.sp.signing import signed_lookup

    key = json.loads(first.request.content)["order_key"]
    body, headers = signed_lookup(other.key, "hank", key)
    assert http.post(url + "/lookup", content=body, headers=headers).status_code == 404
    body, headers = signed_lookup(gina.key, "gina", key)
    assert http.post(url + "/lookup", content=body, headers=headers).json()["state"] == "billed"
    assert http.post(url + "/lookup", content=body,
                     headers={HEADER: sign(gina.key, body)}).status_code == 401
    # an item the SP does not sell
    body, headers = signed_order(gina.key, "gina", "MERCH001", "login")
    assert http.post(url, content=body, headers=headers).status_code == 404
    assert sp.merchant_paid() == 1
    assert len(records.bill_lines(sp.stack.config.db_url)) == 1


def test_merchandising_log_is_append_only(sp: Sp, http: httpx.Client) -> None:
    ivy = sp.stack.customer("ivy")
    assert sp.stack.order(http, ivy, "article").status_code == 200
    for statement in ("UPDATE sp_order_log SET event = 'x'", "DELETE FROM sp_order_log"):
        with pytest.raises(Exception, match="append-only"), sp.stack.engine.begin() as conn:
            conn.execute(text(statement))
    assert len(records.order_log(sp.stack.config.db_url)) == 3


def test_bill_issued_as_soon_as_the_open_total_reaches_the_maximum(
        system: System, tmp_path: Path, http: httpx.Client) -> None:
    s = open_sp(system, tmp_path / "sp", billing=BillingEntry(maximum=230))
    try:
        jack = s.stack.customer("jack")
        first = s.stack.order(http, jack, "song").json()
        assert "bill" not in first and records.bills(s.stack.config.db_url) == []
        second = s.stack.order(http, jack, "song").json()
        [bill] = records.bills(s.stack.config.db_url)
        assert second["bill"] == bill["id"] and bill["trigger"] == "maximum"
        assert (bill["total"], bill["lines"], bill["state"]) == (230, 2, "issued")
        assert sorted(i["order_ref"] for i in bill["items"]) == sorted(
            [first["order"], second["order"]])
        [c] = records.customers(s.stack.config.db_url)
        assert (c["open_total"], c["owed"]) == (0, 230)
        # the third starts a new open total
        assert "bill" not in s.stack.order(http, jack, "song").json()
    finally:
        s.stack.close()


def test_bill_issued_at_the_end_of_the_period(sp: Sp, http: httpx.Client) -> None:
    kim = sp.stack.customer("kim")
    for sku in ("song", "article"):
        assert sp.stack.order(http, kim, sku).status_code == 200
    url = sp.stack.config.db_url
    assert sp.stack.server.recover()["bills"] == 0          # the month has not ended
    sp.clock.t += 32 * DAY_MS / 1000                        # into the next month
    assert sp.stack.server.recover()["bills"] == 1
    [bill] = records.bills(url)
    # song 1.15 + article (retail 0.30, wholesale 0.25, fee 0.05, discount 0.02) 0.33
    assert (bill["trigger"], bill["total"], bill["lines"]) == ("period", 148, 2)
    assert sp.stack.server.recover()["bills"] == 0          # billed once


def test_paid_but_unbilled_orders_are_billed_after_a_restart(
        sp: Sp, http: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    import svcard.host.sp.server.app as app_module

    lee = sp.stack.customer("lee")

    def crash(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("power cut before billing")

    monkeypatch.setattr(app_module, "bill_order", crash)
    answer = sp.stack.order(http, lee, "song")
    assert answer.status_code == 500
    [order] = records.orders(sp.stack.config.db_url)
    assert order["state"] == "paid" and records.bill_lines(sp.stack.config.db_url) == []
    monkeypatch.setattr(app_module, "bill_order", bill_order)
    sp.stack.restart()
    [order] = records.orders(sp.stack.config.db_url)
    assert order["state"] == "billed"
    assert len(records.bill_lines(sp.stack.config.db_url)) == 1 and sp.merchant_paid() == 1


class CrashAfterPaying:
    """The pool pays, then the SP 'dies' before it learns the outcome."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def pay(self, checkout_url: str, *, http: httpx.Client, order_ref: str,
            amount: int | None = None, max_amount: int | None = None) -> Any:
        self.pool.pay(checkout_url, http=http, order_ref=order_ref, amount=amount,
                      max_amount=max_amount)
        raise ConnectionError("the SP lost the pool's answer")


def test_an_order_whose_payment_outcome_was_lost_is_never_paid_twice(
        sp: Sp, http: httpx.Client) -> None:
    from svcard.host.sp.client import lookup

    mia = sp.stack.customer("mia")
    before = sp.balances()
    real = sp.stack.server.payer
    sp.stack.server.payer = CrashAfterPaying(real)
    answer = sp.stack.order(http, mia, "ticket", order_key="ab" * 16)
    assert answer.status_code == 502 and answer.json()["state"] == "in_doubt"
    url = sp.stack.config.db_url
    [c] = records.customers(url)
    assert c["reserved"] == 1255                            # kept while in doubt
    sp.stack.server.payer = real
    sp.stack.restart()                                      # recovery asks the pool again
    [order] = records.orders(url)
    assert order["state"] == "billed"
    assert sum(before) - sum(sp.balances()) == 1250 and sp.merchant_paid() == 1
    [c] = records.customers(url)
    assert (c["reserved"], c["open_total"]) == (0, 1255)
    with sp.stack.engine.connect() as conn:
        events = conn.execute(select(D.order_log.c.event).where(
            D.order_log.c.order_ref == order["order_ref"])).scalars().all()
    assert events == ["ordered", "in_doubt", "paid", "billed"]
    # the customer fetches the merchandise recovery paid for (the relay, FIG. 3A 316)
    found = lookup(http, sp.stack.url, customer="mia", key=mia.key, order_key="ab" * 16)
    assert found["state"] == "billed" and found["goods"] == "TICKET-MUSEUM-0042"
    assert found["line"]["billed"] == 1255 and found["receipt"]["amount"] == 1250


def test_pool_refusal_gives_the_reservation_back(sp: Sp, http: httpx.Client) -> None:
    from svcard.host.sp.purses.pool import PoolBusy

    class Busy:
        def pay(self, *_a: Any, **_k: Any) -> Any:
            raise PoolBusy("no purse came free")

    nia = sp.stack.customer("nia")
    sp.stack.server.payer = Busy()
    answer = sp.stack.order(http, nia, "song")
    assert answer.status_code == 503 and answer.json()["state"] == "failed"
    [c] = records.customers(sp.stack.config.db_url)
    assert c["reserved"] == 0 and sp.merchant_paid() == 0


def test_pool_is_real(sp: Sp) -> None:
    assert isinstance(sp.stack.server.payer, PursePool)


def test_an_agreed_wholesale_price_is_the_only_one_paid(system: System, tmp_path: Path,
                                                        http: httpx.Client) -> None:
    # the SP agreed 0.99 for the song and 0.20 for the article; the merchant asks 0.25
    s = open_sp(system, tmp_path / "sp", wholesale={"song": 99, "article": 20})
    try:
        ona = s.stack.customer("ona")
        before = s.balances()
        assert s.stack.order(http, ona, "song").json()["line"]["wholesale"] == 99
        refused = s.stack.order(http, ona, "article")
        assert refused.status_code == 503 and refused.json()["state"] == "failed"
        assert "asks 25" in refused.json()["reason"]
        assert sum(before) - sum(s.balances()) == 99 and s.merchant_paid() == 1
        [c] = records.customers(s.stack.config.db_url)
        assert (c["reserved"], c["open_total"]) == (0, 115)
    finally:
        s.stack.close()


def test_the_billing_clock_issues_period_bills_by_itself(system: System, tmp_path: Path,
                                                         http: httpx.Client) -> None:
    s = open_sp(system, tmp_path / "sp", billing=BillingEntry(check_seconds=1, period="day"))
    try:
        pat = s.stack.customer("pat")
        assert s.stack.order(http, pat, "song").status_code == 200
        s.clock.t += 2 * DAY_MS / 1000                      # the day has ended
        deadline = time.monotonic() + 20
        while not records.bills(s.stack.config.db_url):
            assert time.monotonic() < deadline, "no bill within 20 s"
            time.sleep(0.1)
        [bill] = records.bills(s.stack.config.db_url)
        assert (bill["trigger"], bill["total"]) == ("period", 115)
    finally:
        s.stack.close()


def test_a_draining_server_takes_no_new_order(sp: Sp, http: httpx.Client) -> None:
    quin = sp.stack.customer("quin")
    sp.stack.server.begin_drain()
    answer = sp.stack.order(http, quin, "song")
    assert answer.status_code == 503 and "shutting down" in answer.json()["reason"]
    assert http.get(f"{sp.stack.url}/v1/health").json()["status"] == "draining"
    assert records.orders(sp.stack.config.db_url) == [] and sp.merchant_paid() == 0

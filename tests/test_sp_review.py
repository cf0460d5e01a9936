"""An attacker's and a payment engineer's review of the SP (issue 13): a merchant charging more
than the SP would pay, an order the SP failed paid later by another SP process, a pool that
left work open resumed only at a purse's next lease, a customer kept in another currency, and
the goods of a payment finished by a resume."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import test_sp_purses as base
from pg_env import Cluster, start_cluster
from sqlalchemy import Engine, select
from test_sp_purses import TICKET, pool_config, purse_image
from test_sp_purses_faults import CutAfterDebit
from test_sp_server import open_sp

from svcard.host.demo.system import System
from svcard.host.kit.config import ConfigError
from svcard.host.kit.db import first_row
from svcard.host.sp import db as D
from svcard.host.sp import records
from svcard.host.sp.config import ItemEntry, MerchantEntry, items_of, sp_config
from svcard.host.sp.customers import add_customer
from svcard.host.sp.purses import db as PDB
from svcard.host.sp.purses.pool import PoolBusy, PursePool
from svcard.host.sp.server import orders as O
from svcard.host.sp.server.payment import pay_order
from svcard.host.sp.signing import new_key, order_body

engine, sp_system = base.engine, base.sp_system   # the fixtures


def test_a_merchant_asking_more_than_the_sp_would_pay_is_not_paid(
        system: System, tmp_path: Path, http: httpx.Client) -> None:
    # no agreed price: the SP sells the song for 0.50 and the article for 0.30 (ceiling 0.28);
    # the merchant's checkout asks 0.99 and 0.25
    s = open_sp(system, tmp_path / "sp")
    try:
        merchant = MerchantEntry(
            name="MERCH001", checkout_url=f"{system.pay.merchant.url}/v1/checkout",
            item=[ItemEntry(sku="song", retail=50),
                  ItemEntry(sku="article", retail=30, max_wholesale=28)])
        s.stack.config.items = items_of([merchant])
        ona = s.stack.customer("ona")
        before = s.balances()
        refused = s.stack.order(http, ona, "song")
        assert refused.status_code == 503 and refused.json()["state"] == "failed"
        assert "99" in refused.json()["reason"]
        assert s.balances() == before and s.merchant_paid() == 0
        paid = s.stack.order(http, ona, "article")             # 0.25 <= 0.28: paid
        assert paid.status_code == 200 and paid.json()["line"]["wholesale"] == 25
        assert sum(before) - sum(s.balances()) == 25 and s.merchant_paid() == 1
        [c] = records.customers(s.stack.config.db_url)
        assert (c["reserved"], c["open_total"]) == (0, 30)      # retail, no discount passed on
    finally:
        s.stack.close()


class Busy:
    """One SP process's pool: no purse came free (nothing paid)."""

    def pay(self, *_a: object, **_k: object) -> object:
        raise PoolBusy("no purse came free")


def test_an_order_one_sp_failed_is_never_paid_by_another(
        system: System, tmp_path: Path, http: httpx.Client) -> None:
    check_failed_order_never_paid_by_another(system, tmp_path, http, None)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    yield c
    c.stop()


def test_an_order_one_sp_failed_is_never_paid_by_another_postgresql(
        system: System, tmp_path: Path, http: httpx.Client, cluster: Cluster) -> None:
    check_failed_order_never_paid_by_another(system, tmp_path, http, cluster.new_database())


def check_failed_order_never_paid_by_another(system: System, tmp_path: Path,
                                             http: httpx.Client, db_url: str | None) -> None:
    # two SP processes on one database: B's recovery read the order while it was paying;
    # A's pool then said nothing was paid, A failed it and gave the credit back; B asks its
    # own pool under the same order_ref
    s = open_sp(system, tmp_path / "sp", db_url=db_url)
    try:
        engine = s.stack.engine
        _private, public = new_key()
        add_customer(engine, "rex", public, 10_000, 156)
        body = order_body("rex", "MERCH001", "ticket")
        item = s.stack.config.item("MERCH001", "ticket")
        assert item is not None
        admission = O.admit(engine, O.parse_order(body), item, "d" * 64, 156,
                            int(time.time() * 1000))
        snapshot = first_row(engine, D.orders, order_ref=admission.order_ref)
        assert snapshot is not None and snapshot["state"] == D.PAYING
        assert pay_order(engine, Busy(), http, snapshot)[0] == D.FAILED       # process A
        state, _outcome, _reason = pay_order(engine, s.stack.server.payer, http, snapshot)
        assert state == D.FAILED and s.merchant_paid() == 0                   # process B
        [c] = records.customers(s.stack.config.db_url)
        assert c["reserved"] == 0 and records.bill_lines(s.stack.config.db_url) == []
        with engine.connect() as conn:
            row = conn.execute(select(PDB.payments)).one()._mapping
        assert row["state"] == "void" and row["amount"] is None
    finally:
        s.stack.close()


def test_the_sp_settles_what_its_pool_left_open_when_it_starts(
        system: System, tmp_path: Path) -> None:
    s = open_sp(system, tmp_path / "sp", purses=1)
    s.stack.close()
    pool = PursePool.open(s.stack.config.purses, s.stack.engine,  # type: ignore[arg-type]
                          journal_dir=s.stack.config.journal_dir)
    [purse] = pool.status()
    pool.book.start_payment("killed-after-claim", purse["serial"], 156)
    s.stack.restart()                          # a new process: its pool resumes at once
    try:
        row = pool.book.payment("killed-after-claim")
        assert row is not None and row["state"] == "failed"
    finally:
        s.stack.close()


def test_a_customer_in_another_currency_is_not_billed_in_the_sps(
        system: System, tmp_path: Path, http: httpx.Client) -> None:
    s = open_sp(system, tmp_path / "sp")
    try:
        private, public = new_key()
        add_customer(s.stack.engine, "usd", public, 10_000, 840)
        from svcard.host.sp.stack import Customer
        answer = s.stack.order(http, Customer("usd", private), "song")
        assert answer.status_code == 402 and answer.json()["kind"] == "currency"
        assert s.merchant_paid() == 0
        [c] = records.customers(s.stack.config.db_url)
        assert c["reserved"] == 0
    finally:
        s.stack.close()


def test_a_pool_paying_in_another_currency_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "sp.toml"
    path.write_text(
        'currency_code = 156\n[[merchant]]\nname = "M"\ncheckout_url = "http://127.0.0.1:1/c"\n'
        '[[merchant.item]]\nsku = "a"\nretail = 10\n'
        '[purses]\nreaders = ["virtual:x.json"]\nbank_url = "http://127.0.0.1:1/l"\n'
        'account = "sp"\nsecret = "s"\ncurrency_code = 840\n')
    with pytest.raises(ConfigError, match=r"purses\.currency_code"):
        sp_config(path)


def test_the_goods_of_a_resumed_payment_are_recorded(
        sp_system: System, engine: Engine, tmp_path: Path, http: httpx.Client) -> None:
    spec = purse_image(tmp_path, 1, ep=50_000)
    pool = PursePool.open(pool_config(sp_system, [spec]), engine, journal_dir=tmp_path / "j")
    url = sp_system.pay.checkout_url("ticket")
    with httpx.Client(timeout=30, transport=CutAfterDebit()) as cut, \
            pytest.raises(Exception, match="cut off"):
        pool.pay(url, http=cut, order_ref="o1")
    outcome = pool.pay(url, http=http, order_ref="o1")   # resumed: the merchant answers now
    assert outcome.resumed and outcome.amount == TICKET
    assert outcome.goods == "TICKET-MUSEUM-0042"
    again = pool.pay(url, http=http, order_ref="o1")     # and it stays in the books
    assert again.goods == "TICKET-MUSEUM-0042"


def test_an_order_left_paying_too_long_is_failed_not_paid_late(
        system: System, tmp_path: Path) -> None:
    # the SP stopped right after taking the order (no pool claimed it) and comes back after
    # more than MAX_SKEW: the customer's request would be refused as stale now, so the
    # intent is not carried out late either
    s = open_sp(system, tmp_path / "sp")
    try:
        engine = s.stack.engine
        _private, public = new_key()
        add_customer(engine, "sam", public, 10_000, 156)
        item = s.stack.config.item("MERCH001", "ticket")
        assert item is not None
        old = int((s.clock.t - 400) * 1000)
        admission = O.admit(engine, O.parse_order(order_body("sam", "MERCH001", "ticket")),
                            item, "e" * 64, 156, old)
        s.stack.restart()
        [order] = records.orders(s.stack.config.db_url)
        assert (order["order_ref"], order["state"]) == (admission.order_ref, D.FAILED)
        assert "too old" in order["reason"] and s.merchant_paid() == 0
        [c] = records.customers(s.stack.config.db_url)
        assert c["reserved"] == 0
    finally:
        s.stack.close()


class BilledMeanwhile:
    """The pool pays; before this process records it, another SP process's recovery has
    recorded and billed the order."""

    def __init__(self, pool: object, engine: Engine) -> None:
        self.pool, self.engine = pool, engine

    def pay(self, checkout_url: str, **kwargs: object) -> object:
        from svcard.host.sp.billing import bill_order
        from svcard.host.sp.server.payment import record_paid

        outcome = self.pool.pay(checkout_url, **kwargs)  # type: ignore[attr-defined]
        assert record_paid(self.engine, str(kwargs["order_ref"]), outcome)
        assert bill_order(self.engine, str(kwargs["order_ref"]), 50_000, 14) is not None
        return outcome


def test_an_order_billed_by_another_process_meanwhile_is_answered_billed(
        system: System, tmp_path: Path, http: httpx.Client) -> None:
    s = open_sp(system, tmp_path / "sp")
    try:
        tia = s.stack.customer("tia")
        s.stack.server.payer = BilledMeanwhile(s.stack.server.payer, s.stack.engine)
        answer = s.stack.order(http, tia, "song")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["state"] == "billed" and body["goods"].startswith("https://")
        assert body["line"]["billed"] == 115 and s.merchant_paid() == 1
    finally:
        s.stack.close()


@pytest.mark.parametrize("where", ["status", "payment"])
def test_a_checkout_sending_the_payment_elsewhere_is_not_paid(
        sp_system: System, engine: Engine, tmp_path: Path, http: httpx.Client,
        where: str) -> None:
    # a merchant's checkout names where the purse's draw and its confirmation go: the
    # confirmation must go back to the merchant's own origin, the draw to a configured acquirer
    from svcard.host.sp.purses.pool import PursePoolError

    spec = purse_image(tmp_path, 1, ep=50_000)
    changes = {"payment_servers": ["http://127.0.0.1:1"]} if where == "payment" else {}
    pool = PursePool.open(pool_config(sp_system, [spec], **changes), engine,
                          journal_dir=tmp_path / "j")
    if where == "status":
        sp_system.pay.merchant_server.config.public_url = "http://127.0.0.1:9"
    with pytest.raises(PursePoolError, match="not paid"):
        pool.pay(sp_system.pay.checkout_url("ticket"), http=http, order_ref="o1")
    assert base.image_app(spec)["ep"]["balance"] == 50_000
    assert base.merchant_paid(sp_system) == []
    [row] = pool.book.all_payments()
    assert row["state"] == "failed"
    if where == "payment":   # the merchant's acquirer configured: paid
        pool2 = PursePool.open(pool_config(sp_system, [spec], payment_servers=[
            sp_system.pay.payment.url]), engine, journal_dir=tmp_path / "j")
        assert pool2.pay(sp_system.pay.checkout_url("ticket"), http=http,
                         order_ref="o2").amount == TICKET


def test_a_ceiling_below_the_agreed_price_is_a_configuration_error() -> None:
    item = ItemEntry(sku="song", retail=120, wholesale=99, max_wholesale=90)
    with pytest.raises(ValueError, match=r"item\[0\]\.max_wholesale: 90"):
        items_of([MerchantEntry(name="M", checkout_url="http://127.0.0.1:1/c", item=[item])])

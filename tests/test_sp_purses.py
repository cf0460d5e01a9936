"""The service provider's purse pool (issue 13, point 2) against the real payment stack and load
stack on loopback: real purse card images behind ``virtual:`` readers, paying a merchant with
``pay.client`` and topped up through ``load.client``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, MetaData

from svcard.card.image import save_new_image
from svcard.card.personalise import image_from_profile
from svcard.fixtures import fixture_path
from svcard.host.demo.system import System, start_system
from svcard.host.kit.db import make_engine
from svcard.host.sp.purses.pool import (
    PoolExhausted,
    PursePool,
    PursePoolConfig,
    PursePoolError,
)

TICKET = 1250   # the demo merchant's "ticket" (minor units)


def purse_image(folder: Path, index: int, *, ep: int, offline: int = 0,
                online: int = 0) -> str:
    """A purse card of its own serial; its reader spec."""
    image = image_from_profile(fixture_path("iep-demo.toml"),
                               app_serial=f"{7_700_000 + index:020d}")
    image["app"]["ep"]["balance"] = ep
    image["app"]["ep"]["offline_counter"] = offline
    image["app"]["ep"]["online_counter"] = online
    path = folder / f"purse{index}.json"
    save_new_image(path, image, overwrite=True)
    return f"virtual:{path}"


def image_app(spec: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(spec.split(":", 1)[1]).read_text())
    return data["app"]


@pytest.fixture
def sp_system(tmp_path: Path) -> Iterator[System]:
    s = start_system(tmp_path / "sys")
    s.load.account("provider", 1_000_000, "provider-pw")
    yield s
    s.close()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = make_engine(f"sqlite:///{tmp_path / 'sp.db'}", MetaData())
    yield e
    e.dispose()


def pool_config(system: System, readers: list[str], **changes: Any) -> PursePoolConfig:
    return PursePoolConfig(readers=readers, bank_url=system.load.bank_url, account="provider",
                           secret="provider-pw", currency_code=156, **changes)


def merchant_paid(system: System) -> list[dict[str, Any]]:
    """The merchant's own record of released orders (what its POS received; FIG. 7's are
    released on the client terminal's word, proven once the card's proof arrives)."""
    from sqlalchemy import select

    from svcard.host.pay.merchant import db as MDB

    with system.pay.merchant_server.db.engine.connect() as conn:
        rows = conn.execute(select(MDB.orders)).all()
    return [dict(r._mapping) for r in rows if r._mapping["state"] in MDB.RELEASED]


def test_pays_an_ordinary_card_payment_and_records_it(sp_system: System, engine: Engine,
                                                      tmp_path: Path, http: httpx.Client
                                                      ) -> None:
    spec = purse_image(tmp_path, 1, ep=50_000)
    pool = PursePool.open(pool_config(sp_system, [spec]), engine, journal_dir=tmp_path / "j")
    outcome = pool.pay(sp_system.pay.checkout_url("ticket"), http=http, order_ref="order-1")
    assert outcome.amount == TICKET and outcome.goods == "TICKET-MUSEUM-0042"
    assert outcome.purse_serial == f"{7_700_001:020d}" and len(outcome.tac) == 8
    assert outcome.balance_after == 50_000 - TICKET
    assert image_app(spec)["ep"]["balance"] == 50_000 - TICKET
    [row] = pool.book.all_payments()
    assert (row["order_ref"], row["state"], row["amount"], row["counter"], row["tac"]) == (
        "order-1", "paid", TICKET, 0, outcome.tac)
    [status] = pool.status()
    assert (status["balance"], status["offline_counter"], status["state"]) == (
        50_000 - TICKET, 1, "ready")
    # the same order again: its recorded outcome, no second payment
    again = pool.pay(sp_system.pay.checkout_url("ticket"), http=http, order_ref="order-1")
    assert again.resumed and again.txn_id == outcome.txn_id
    assert image_app(spec)["ep"]["balance"] == 50_000 - TICKET
    assert "provider-pw" not in repr(pool.config) and "provider-pw" not in str(pool.status())


def test_a_purse_running_low_is_topped_up_mid_stream(sp_system: System, engine: Engine,
                                                     tmp_path: Path, http: httpx.Client) -> None:
    spec = purse_image(tmp_path, 1, ep=3_000)
    pool = PursePool.open(pool_config(sp_system, [spec], topup_threshold=2_000,
                                      topup_amount=5_000), engine, journal_dir=tmp_path / "j")
    outcomes = [pool.pay(sp_system.pay.checkout_url("ticket"), http=http, order_ref=f"o{i}")
                for i in range(6)]
    # 3000 -> 1750 (< 2000: +5000 after it) -> 6750 -> 5500 -> 4250 -> 3000 -> 1750 (+5000)
    assert [len(o.topups) for o in outcomes] == [1, 0, 0, 0, 1, 0]
    assert all(t["outcome"] == "loaded" for o in outcomes for t in o.topups)
    loads = pool.book.all_loads()
    assert [(ld["state"], ld["amount"]) for ld in loads] == [("loaded", 5_000)] * 2
    assert all(ld["txn_id"] and ld["online_counter"] is not None for ld in loads)
    balance = image_app(spec)["ep"]["balance"]
    assert balance == 3_000 + 2 * 5_000 - 6 * TICKET
    # the books close: opening + loads = debits + balance
    [status] = pool.status()
    debits = sum(p["amount"] for p in pool.book.all_payments() if p["state"] == "paid")
    assert status["opening_balance"] + 10_000 == debits + status["balance"] == debits + balance
    assert sp_system.load.bank_server.db.account("provider")["balance"] == 1_000_000 - 10_000
    assert pool.books() == {156: {"opening": 3_000, "loaded": 10_000, "debits": 6 * TICKET,
                                  "balances": balance, "open_payments": 0, "open_loads": 0}}


def test_a_purse_at_its_counter_limit_is_retired_and_the_next_used(
        sp_system: System, engine: Engine, tmp_path: Path, http: httpx.Client) -> None:
    worn = purse_image(tmp_path, 1, ep=50_000, offline=0xFFFF - 4)   # margin 3: one payment
    fresh = purse_image(tmp_path, 2, ep=50_000)
    pool = PursePool.open(pool_config(sp_system, [worn, fresh], retire_margin=3), engine,
                          journal_dir=tmp_path / "j")
    first = pool.pay(sp_system.pay.checkout_url("ticket"), http=http, order_ref="a")
    assert first.purse_serial == f"{7_700_001:020d}" and first.counter == 0xFFFF - 4
    states = {p["serial"][-1]: p for p in pool.status()}
    assert states["1"]["state"] == "retired" and "offline counter" in states["1"]["reason"]
    later = [pool.pay(sp_system.pay.checkout_url("ticket"), http=http, order_ref=f"b{i}")
             for i in range(3)]
    assert {o.purse_serial for o in later} == {f"{7_700_002:020d}"}
    assert image_app(worn)["ep"]["offline_counter"] == 0xFFFF - 3


def test_every_purse_retired_or_empty_refuses_and_pays_nothing(
        sp_system: System, engine: Engine, tmp_path: Path, http: httpx.Client) -> None:
    sp_system.load.account("poor", 0, "poor-pw")
    worn = purse_image(tmp_path, 1, ep=50_000, offline=0xFFFF)
    empty = purse_image(tmp_path, 2, ep=0)
    config = pool_config(sp_system, [worn, empty]).model_copy(
        update={"account": "poor", "secret": "poor-pw"})
    pool = PursePool.open(config, engine, journal_dir=tmp_path / "j")
    for amount in (TICKET, None):
        with pytest.raises(PoolExhausted, match=r"no purse can pay.*nothing was paid"):
            pool.pay(sp_system.pay.checkout_url("ticket"), http=http, order_ref="x",
                     amount=amount)
    assert merchant_paid(sp_system) == []
    assert image_app(worn)["ep"]["balance"] == 50_000 and image_app(empty)["ep"]["balance"] == 0
    assert [p["state"] for p in pool.status()] == ["retired", "ready"]
    assert all(ld["state"] == "refused" for ld in pool.book.all_loads())
    assert all(p["state"] == "failed" for p in pool.book.all_payments())


def test_bad_input_is_refused_before_anything(sp_system: System, engine: Engine,
                                              tmp_path: Path, http: httpx.Client) -> None:
    spec = purse_image(tmp_path, 1, ep=50_000)
    pool = PursePool.open(pool_config(sp_system, [spec]), engine, journal_dir=tmp_path / "j")
    url = sp_system.pay.checkout_url("ticket")
    for kwargs in ({"order_ref": ""}, {"order_ref": "x" * 65}, {"order_ref": "a b"},
                   {"order_ref": "ok", "amount": 0}, {"order_ref": "ok", "amount": 1 << 32}):
        with pytest.raises(PursePoolError):
            pool.pay(url, http=http, **kwargs)
    with pytest.raises(PursePoolError, match="checkout URL"):
        pool.pay("file:///etc/passwd", http=http, order_ref="ok")
    assert pool.book.all_payments() == [] and merchant_paid(sp_system) == []
    with pytest.raises(ValueError, match="named twice"):
        pool_config(sp_system, [spec, spec])


def test_a_checkout_asking_another_amount_is_not_paid(sp_system: System, engine: Engine,
                                                      tmp_path: Path, http: httpx.Client) -> None:
    """A merchant whose checkout asks more (or less) than the wholesale order the SP made:
    refused before the card is asked; the purse is free and clean for the next order."""
    spec = purse_image(tmp_path, 1, ep=50_000)
    pool = PursePool.open(pool_config(sp_system, [spec]), engine, journal_dir=tmp_path / "j")
    url = sp_system.pay.checkout_url("ticket")
    with pytest.raises(PursePoolError, match="asks 1250 minor units, the order says 1249"):
        pool.pay(url, http=http, order_ref="o1", amount=TICKET - 1)
    [row] = pool.book.all_payments()
    assert row["state"] == "failed" and "1249" in row["reason"]
    assert image_app(spec)["ep"]["balance"] == 50_000 and merchant_paid(sp_system) == []
    assert pool.journal(f"{7_700_001:020d}").unfinished(f"{7_700_001:020d}") == []
    assert pool.pay(url, http=http, order_ref="o1", amount=TICKET).amount == TICKET


def test_a_purse_that_cannot_be_read_is_a_clear_error(sp_system: System, engine: Engine,
                                                      tmp_path: Path) -> None:
    missing = f"virtual:{tmp_path / 'nowhere.json'}"
    with pytest.raises(PursePoolError, match=r"purses.readers: virtual:.*nowhere.json: the purse"):
        PursePool.open(pool_config(sp_system, [missing]), engine, journal_dir=tmp_path / "j")
    spec = purse_image(tmp_path, 1, ep=100)
    with pytest.raises(PursePoolError, match="holds currency 156, the pool pays in 978"):
        PursePool.open(pool_config(sp_system, [spec]).model_copy(update={"currency_code": 978}),
                       engine, journal_dir=tmp_path / "j")


@pytest.mark.parametrize("variant", ["fig5", "fig6", "fig7", "fig8"])
def test_every_confirmation_variant_is_an_ordinary_card_payment(
        sp_system: System, engine: Engine, tmp_path: Path, http: httpx.Client,
        variant: str) -> None:
    """FIG. 5-8: the merchant chooses; the pool's purse pays as any card does (FIG. 7 with the
    client terminal key the stack registered in this process)."""
    spec = purse_image(tmp_path, 1, ep=50_000)
    pool = PursePool.open(pool_config(sp_system, [spec]), engine, journal_dir=tmp_path / "j")
    outcome = pool.pay(sp_system.pay.checkout_url("ticket", variant), http=http,
                       order_ref=f"v-{variant}", amount=TICKET)
    assert (outcome.variant, outcome.amount, outcome.goods) == (variant, TICKET,
                                                                "TICKET-MUSEUM-0042")
    assert len(merchant_paid(sp_system)) == 1 and pool.books()[156]["debits"] == TICKET
    assert pool.journal(outcome.purse_serial).unfinished(outcome.purse_serial) == []


def test_a_purse_whose_online_counter_nears_its_end_is_retired_after_a_top_up(
        sp_system: System, engine: Engine, tmp_path: Path, http: httpx.Client) -> None:
    """Top-ups move the online counter: the one that brings it within the margin retires the
    purse, and the next order goes to the other purse."""
    worn = purse_image(tmp_path, 1, ep=1_500, online=0xFFFF - 4)
    fresh = purse_image(tmp_path, 2, ep=50_000)
    pool = PursePool.open(pool_config(sp_system, [worn, fresh], retire_margin=3,
                                      topup_threshold=1_000, topup_amount=5_000), engine,
                          journal_dir=tmp_path / "j")
    first = pool.pay(sp_system.pay.checkout_url("ticket"), http=http, order_ref="a")
    assert first.purse_serial.endswith("1") and [t["outcome"] for t in first.topups] == [
        "loaded"]
    states = {p["serial"][-1]: p for p in pool.status()}
    assert states["1"]["state"] == "retired" and "online counter" in states["1"]["reason"]
    assert states["1"]["balance"] == 1_500 - TICKET + 5_000 == image_app(worn)["ep"]["balance"]
    assert pool.pay(sp_system.pay.checkout_url("ticket"), http=http,
                    order_ref="b").purse_serial.endswith("2")

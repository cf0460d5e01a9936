"""Issue 16: a load's database steps on the bank and the load server run statements built once
(no SQLAlchemy statement or cache key built per call), and do what they did before: the
compare-and-set guards, the fence, a refund, a refused debit that changes nothing, and a
column name that is not one refused rather than ignored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from svcard.host.kit import db as kit_db
from svcard.host.load.bank import db as bank_db
from svcard.host.load.bank import steps as bank_steps
from svcard.host.load.server import db as load_db
from svcard.host.load.server.leases import LeaseStore


def _no_building(*_args: Any, **_kwargs: Any) -> Any:
    raise AssertionError("a statement was built during a load's step")


@pytest.fixture()
def built_once(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any select/insert/update built by the hot steps' modules (or kit.db's helpers they
    used to call) fails the test."""
    for module in (kit_db, bank_db, bank_steps, load_db):
        for name in ("select", "insert", "update"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, _no_building)
    yield


@pytest.fixture()
def bank(tmp_path: Path) -> bank_db.BankDb:
    db = bank_db.BankDb(bank_db.make_engine(f"sqlite:///{tmp_path}/bank.db"))
    db.create_account("alice", "Alice", 156, balance=1_000, secret="pw")
    return db


@pytest.fixture()
def loads(tmp_path: Path) -> load_db.LoadDb:
    return load_db.LoadDb(load_db.make_engine(f"sqlite:///{tmp_path}/load.db"))


def _row(txn: str, s1: str) -> dict[str, Any]:
    return {"bank_id": "0102030405060708", "txn_id": txn, "state": "received", "amount": 100,
            "currency_code": 156, "card_serial": "1234", "s1": s1, "online_counter": 7}


def _balance(bank: bank_db.BankDb) -> int:
    with bank.engine.connect() as conn:
        return int(conn.exec_driver_sql(
            "SELECT balance FROM accounts WHERE account_id = 'alice'").scalar_one())


def test_bank_load_steps_build_no_statement(bank: bank_db.BankDb, built_once: None) -> None:
    stored = bank.secret_hash("alice")
    assert stored is not None
    for i, loaded in enumerate((True, False)):
        txn = f"{i:032x}"
        assert bank_steps.remembered_start(bank, "alice", stored, f"req{i}", txn, 300,
                                           "1234", "") is None
        assert bank.remembered_secret_ok("alice", kit_db.now_ms()) == 0.0
        assert bank.load(txn) is not None and bank.load_by_request(f"req{i}") is not None
        done = bank_steps.register_confirmed(bank, txn, 300, "1234", loaded, "")
        assert done.outcome == "registered"
        assert done.balance == 700 == _balance(bank)   # a refund gives the 300 back
        again = bank_steps.register_confirmed(bank, txn, 300, "1234", not loaded, "")
        assert (again.outcome, again.state) == ("already", "confirmed" if loaded else "refunded")
    # a repeated request id goes the long way with what was read; nothing is debited
    view = bank_steps.remembered_start(bank, "alice", stored, "req0", "ff" * 16, 300, "1234", "")
    assert view is not None and view.prior is not None and view.prior["txn_id"] == f"{0:032x}"


def test_a_debit_beyond_the_balance_changes_nothing(bank: bank_db.BankDb,
                                                    built_once: None) -> None:
    with pytest.raises(bank_db.BankError, match="insufficient funds"):
        bank.debit_for_load("alice", "aa" * 16, 1_001, "1234", "r1", "")
    assert bank.load("aa" * 16) is None
    with pytest.raises(kit_db.DuplicateError):     # the same transaction id twice
        bank.debit_for_load("alice", "bb" * 16, 10, "1234", "r2", "")
        bank.debit_for_load("alice", "bb" * 16, 10, "1234", "r3", "")
    assert bank_steps.register_confirmed(bank, "bb" * 16, 11, "1234", True, "").outcome \
        == "mismatch"
    assert bank_steps.register_confirmed(bank, "cc" * 16, 10, "1234", True, "").outcome \
        == "missing"
    assert _balance(bank) == 990


def test_load_server_steps_build_no_statement(loads: load_db.LoadDb, built_once: None) -> None:
    row, row_id = loads.get_or_insert(_row("t1", "11111111"))
    assert row is None and row_id is not None
    again, none = loads.get_or_insert(_row("t1", "11111111"))
    assert again is not None and again["id"] == row_id and none is None
    with pytest.raises(kit_db.DuplicateError):     # a replayed S1 under a new transaction
        loads.get_or_insert(_row("t2", "11111111"))
    assert not loads.advance(row_id, "authorized", state="loaded")   # not in that state
    assert loads.advance(row_id, "received", state="authorized", s2="22222222")
    assert not loads.advance(row_id, "received", state="refused")    # lost the race
    assert loads.advance(row_id, "authorized", state="loaded", s3="33333333")
    got = loads.get("0102030405060708", "t1")
    assert got is not None and (got["state"], got["s2"], got["s3"]) == \
        ("loaded", "22222222", "33333333")
    assert got["updated"] >= got["created"]
    assert loads.get("0102030405060708", "t9") is None


def test_a_name_that_is_not_a_column_is_refused(loads: load_db.LoadDb) -> None:
    _, row_id = loads.get_or_insert(_row("t1", "11111111"))
    assert row_id is not None
    with pytest.raises(TypeError, match="stat"):
        loads.advance(row_id, "received", stat="authorized")
    with pytest.raises(TypeError, match="id"):
        loads.advance(row_id, "received", id=5)
    with pytest.raises(TypeError, match="bogus"):
        loads.get_or_insert({**_row("t2", "44444444"), "bogus": 1})
    got = loads.get("0102030405060708", "t1")
    assert got is not None and got["state"] == "received" and got["id"] == row_id
    assert loads.get("0102030405060708", "t2") is None


def test_a_stale_fence_changes_nothing(loads: load_db.LoadDb) -> None:
    store = LeaseStore(loads.engine)
    store.ensure(["hsm0"])
    taken = store.take("hsm0", "node-a", 60_000)
    assert taken is not None
    token = taken[0]
    fence = load_db.Fence("hsm0", "node-a", token)
    _, first = loads.get_or_insert(_row("t1", "11111111"))
    _, second = loads.get_or_insert(_row("t2", "55555555"))
    assert first is not None and second is not None
    assert loads.advance(first, "received", fence, state="authorized", s2="22222222")
    stale = load_db.Fence("hsm0", "node-a", token + 1)
    assert not loads.advance(second, "received", stale, state="authorized", s2="66666666")
    got = loads.get("0102030405060708", "t2")
    assert got is not None and (got["state"], got["s2"]) == ("received", None)


def test_racing_registrations_refund_once(bank: bank_db.BankDb) -> None:
    """Eight confirmations of one load at once ("not loaded", each a refund): one registers,
    the others are told it already was; the account is credited once."""
    from concurrent.futures import ThreadPoolExecutor

    bank.debit_for_load("alice", "dd" * 16, 250, "1234", "race", "")
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: bank_steps.register_confirmed(
            bank, "dd" * 16, 250, "1234", False, "card said no"), range(8)))
    assert sorted(g.outcome for g in got) == ["already"] * 7 + ["registered"]
    assert {g.state for g in got if g.outcome == "already"} == {"refunded"}
    assert _balance(bank) == 1_000
    load = bank.load("dd" * 16)
    assert load is not None and (load["state"], load["reason"]) == ("refunded", "card said no")

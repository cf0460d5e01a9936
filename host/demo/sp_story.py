"""The service provider's part of ``svcard demo`` (seed 001, FIG. 2 and 3A): the SP pays the
demo merchant from its own purse pool for a customer who has no card, refuses customers it
cannot bill, and bills the one it paid for. Its purse payments are ordinary card payments of
the same payment server, so the demo's clearing and audit take them in like any other."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from ..sp import records
from ..sp.billing import bill_text, close_now
from ..sp.customers import set_blocked
from .system import System

SP_ACCOUNT = "sp"


def purse_balance(path: Path) -> int:
    return int(json.loads(path.read_text())["app"]["ep"]["balance"])


def run_sp(system: System, lines: list[str], money: Callable[[int], str],
           http: httpx.Client) -> dict[str, Any]:
    """Start the SP on ``system``, order through it, refuse two customers, bill the first;
    the SP is closed again before returning (its purses are ``system.sp_purses``)."""
    system.start_sp(account=SP_ACCOUNT)
    try:
        return _story(system, lines, money, http)
    finally:
        system.close_sp()


def _bank_balance(system: System) -> int:
    account = system.load.bank_server.db.account(SP_ACCOUNT)
    assert account is not None
    return int(account["balance"])


def _story(system: System, lines: list[str], money: Callable[[int], str],
           http: httpx.Client) -> dict[str, Any]:
    sp = system.sp
    assert sp is not None
    purses = system.sp_purses
    bank_before = _bank_balance(system)
    lines.append(
        f"SERVICE PROVIDER (seed 001) at {sp.url}: customers without a card order through "
        f"it; it pays from a pool of {len(purses)} purse cards (each "
        f"{money(purse_balance(purses[0]))}, personalised from the demo fixtures) that top up "
        f"from its bank account '{SP_ACCOUNT}' ({money(bank_before)}) through the load flow.")
    alice = sp.customer("alice", credit_limit=5_000)
    lines.append(f"SP customer 'alice' added: credit limit {money(5_000)}; she signs her "
                 f"orders with an Ed25519 key (the SP keeps only the public one)")
    merchant_paid = _merchant_paid(system)
    started = time.perf_counter()
    answer = sp.order(http, alice, "song")
    ms = (time.perf_counter() - started) * 1000
    answer.raise_for_status()
    body = answer.json()
    [order] = records.orders(sp.config.db_url)
    after = [purse_balance(p) for p in purses]
    bank_after = _bank_balance(system)
    ln = body["line"]
    lines.append(
        f"SP ORDER alice -> {body['item']} at {order['merchant']}: purse "
        f"{order['purse_serial']} topped up {money(bank_before - bank_after)} from the bank, "
        f"then paid the merchant {money(ln['wholesale'])} as an ordinary card payment "
        f"(merchant txn {order['merchant_txn']}); goods relayed: {body['goods']}; billed "
        f"{money(ln['billed'])} (retail {money(ln['retail'])} + fee {money(ln['fee'])} - "
        f"discount {money(ln['discount'])}); {ms:.0f} ms")
    refused = _refusals(system, lines, money, http)
    if _merchant_paid(system) != merchant_paid + 1:
        raise RuntimeError("the SP's refused orders reached the merchant")
    bill_id = close_now(sp.engine, "alice", sp.config.billing.due_days)
    [bill] = records.bills(sp.config.db_url, "alice")
    text = bill_text(bill, bill["items"], sp.config.currency_exponent)
    lines.append(f"SP BILL {bill_id} for alice (closed now by hand; else at the month's end or "
                 f"at the billing maximum):")
    lines += [f"  {row}" if row else "" for row in text.splitlines()]
    return {"url": sp.url, "db_url": sp.config.db_url, "purses": [{"path": p.name, "balance": b}
                                      for p, b in zip(purses, after, strict=True)],
            "bank_before": bank_before, "bank_after": bank_after, "topped_up":
            bank_before - bank_after, "order": {**body, "ms": round(ms, 1)},
            "purse_serial": order["purse_serial"], "refused": refused,
            "bill": {k: v for k, v in bill.items() if k != "items"}, "bill_lines": bill["items"]}


def _merchant_paid(system: System) -> int:
    from ..pay.merchant import db as MD

    return int(system.pay.merchant_server.db.counts().get(MD.PAID, 0))


def _refusals(system: System, lines: list[str], money: Callable[[int], str],
              http: httpx.Client) -> list[dict[str, Any]]:
    """A blocked customer and one over its credit limit: refused, nothing paid."""
    sp = system.sp
    assert sp is not None
    before = [purse_balance(p) for p in system.sp_purses]
    bob = sp.customer("bob")
    set_blocked(sp.engine, "bob", True, "unpaid bills")
    carol = sp.customer("carol", credit_limit=100)
    out = []
    for who in (bob, carol):
        answer = sp.order(http, who, "song")
        reply = answer.json()
        if answer.status_code != 402:
            raise RuntimeError(f"the SP did not refuse {who.id}: {answer.status_code}")
        out.append({"customer": who.id, "status": answer.status_code,
                    "kind": reply["kind"], "reason": reply["reason"]})
    if [purse_balance(p) for p in system.sp_purses] != before:
        raise RuntimeError("a refused SP order moved a purse's balance")
    lines.append(
        f"SP REFUSED, nothing paid: bob ({out[0]['kind']}: {out[0]['reason']}); carol, "
        f"credit limit {money(100)} ({out[1]['kind']}: {out[1]['reason']}); purse balances "
        f"unchanged")
    return out

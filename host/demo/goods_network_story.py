"""The network goods part of ``svcard demo`` (seed 000, claims 1 and 23), beside the local
composite purchase of :mod:`.goods_story`: the five goods servers on loopback
(:mod:`svcard.host.goods.stack`: merchant, payment, authentication, financial institution,
fulfilment; each its own database and key), a communication device registered with the
authentication server, and a card of its own (the goods servers' issuer and goods key, TEST
KEYS). The customer orders a prepaid airtime voucher naming the device; the device gets the
signed first message, shows it, reads the card's id and a challenge, sends the authorisation
with the PIN sealed for the institution; the institution debits the bank account; the
fulfilment server's write comes back as an UPDATE RECORD by secure messaging (``04 DC``, MAC
under the card's goods key) that the card checks and stores; the card's status word goes
back. Then the card's goods are listed and the goods system is audited (bank debits = goods
paid, every good written or refunded, none twice, the card's goods included)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from ...protocols import goods as G
from ...protocols import purse as P
from ..goods.stack import make_card, start_goods
from ..settle.audit import audit
from ..settle.goods_books import card_goods
from ..terminal.capp import good_line, read_goods
from ..terminal.reader_specs import open_reader

CARD_SERIAL = 70_000_001
ACCOUNT, PIN, OPENING = "demo-account", "123456", 20_000
SKU = "airtime"


def run_goods_network(folder: Path, lines: list[str],
                      money: Callable[[int], str]) -> dict[str, Any]:
    """Buy the demo's airtime voucher over the goods servers, paid from a bank account and
    written onto a fresh card; list its goods and audit; the servers stopped again."""
    started = time.perf_counter()
    stack = start_goods(folder / "servers")
    try:
        card_path = make_card(folder, CARD_SERIAL)
        stack.account(ACCOUNT, CARD_SERIAL, PIN, balance=OPENING)
        device = stack.device()
        with httpx.Client(timeout=30) as http:
            ordered = stack.order(http, SKU, device)
        if ordered.status_code != 200:
            raise RuntimeError(f"the goods merchant refused the order: {ordered.text[:200]}")
        firsts = device.poll(wait=10)
        if len(firsts) != 1:
            raise RuntimeError("the device got no first message for the order")
        first = firsts[0]
        bought = time.perf_counter()
        with open_reader(f"virtual:{card_path}") as card:
            outcome = device.authorise(card, first, PIN)
            paid_ms = (time.perf_counter() - bought) * 1000
            if not (outcome.paid and outcome.written):
                raise RuntimeError(f"the good was not written: {outcome}")
            listed = read_goods(card)
            on_cards = card_goods([card], P.DEFAULT_IEP_AID)
        report = audit({}, goods_dbs=tuple(c.db_url for c in stack.configs.values()),
                       card_goods=on_cards)
        bank_left = OPENING - int(first.fields["amount"])
        total_ms = (time.perf_counter() - started) * 1000
        cur = int(first.fields["currency"])
        lines += [
            f"GOODS OVER THE NETWORK (seed 000): merchant, payment, authentication, "
            f"institution and fulfilment servers on loopback ({stack.url('merchant')} ...), "
            f"each its own SQLite database and Ed25519 key; device {device.id[:12]}... "
            f"registered with the authentication server; card {CARD_SERIAL:020d} (the goods "
            f"servers' issuer, TEST KEYS)",
            f"  first message, signed by the authentication server: {first.show()}",
            f"  the device read the card's id and a challenge, sent the authorisation with the "
            f"PIN sealed for the institution; account '{ACCOUNT}' debited "
            f"{money(int(first.fields['amount']))} (now {money(bank_left)}); the fulfilment "
            f"server's UPDATE RECORD by secure messaging (04 DC, MAC under the card's goods "
            f"key) stored, SW {outcome.sw:04X}; {device.round_trips} round trips after the "
            f"first message, {paid_ms:.0f} ms",
            f"  GOODS ON THAT CARD: {len(listed)}"]
        lines += [f"    SFI {g.sfi:02X} record {g.record_number}: {good_line(g.to_json())}"
                  for g in listed]
        fig = {k: report.figures[f"goods {cur:03d}: {k}"] for k in (
            "bank debits", "goods written", "goods open")}
        verdict = "clean" if report.clean else "DISCREPANCIES: " + "; ".join(
            report.discrepancies)
        lines.append(
            f"  GOODS BOOKS (svcard audit --goods-db): bank debits "
            f"{money(fig['bank debits'])} = goods written {money(fig['goods written'])} + "
            f"open {money(fig['goods open'])}; the card's goods checked: {verdict} "
            f"({total_ms:.0f} ms for this part)")
        return {"order": first.order, "amount": int(first.fields["amount"]),
                "currency": cur, "sw": outcome.sw, "round_trips": device.round_trips,
                "goods": [g.to_json() for g in listed],
                "kinds": [G.KIND_OF_TAG[g.record[0]] for g in listed],
                "audit": report.to_json(), "ms": round(total_ms, 1)}
    finally:
        stack.close()

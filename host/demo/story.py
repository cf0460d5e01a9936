"""``svcard demo``: the main job on embedded defaults, as a readable story and as data: a card
loaded and paying at a local terminal, goods bought onto it by a composite purchase, listed
and one ride used (seed 000), and a good bought on a device from a bank account and written by
secure messaging through the five goods servers, listed and audited (seed 000); then over
the network (bank, load server, payment server, merchant), loyalty points earned and spent on
the card's programme and audited in points (seed 002 FIG. 16), the service provider paying for
a customer without a card (seed 001), cleared, and audited; and a trading session's
micropayments, cleared (seed 004); and a wallet's anonymous virtual card issued, charged and
paying at a mall, with its daily statement (seed 003)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ...card.image import save_new_image
from ...card.personalise import image_from_profile
from ...fixtures import fixture_path
from ..load.client import load
from ..pay.client import pay
from ..terminal import purse as T
from ..terminal.journal import Journal
from ..terminal.reader_specs import open_reader
from .goods_network_story import run_goods_network
from .goods_story import goods_issuer, run_goods
from .points_story import run_points
from .sp_story import run_sp
from .system import card_image, start_system
from .trade_story import run_trade
from .wallet_story import run_wallet

DEMO_LOAD_TERMINAL = bytes.fromhex("000000000099")


@dataclass
class Story:
    text: str
    data: dict[str, Any]


def run_demo(folder: Path | None, load_amount: int, purchase_amount: int) -> Story:
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="svcard-demo-") as tmp:
            return _run(Path(tmp), load_amount, purchase_amount)
    folder.mkdir(parents=True, exist_ok=True)
    return _run(folder, load_amount, purchase_amount)


def _run(folder: Path, load_amount: int, purchase_amount: int) -> Story:
    paths = {}
    for kind in ("iep", "psam", "hsm"):
        paths[kind] = folder / f"{kind}.json"
        extra = ({"issuer": str(goods_issuer(folder, fixture_path("demo-issuer.toml")))}
                 if kind == "iep" else {})   # the card with the demo's goods key
        save_new_image(paths[kind], image_from_profile(fixture_path(f"{kind}-demo.toml"),
                                                       **extra), overwrite=True)
    lines = [f"Personalised a purse card, a PSAM and a load HSM in {folder} "
             "(demo issuer, TEST KEYS ONLY; a temporary folder unless --keep names one)."]
    with open_reader(f"virtual:{paths['iep']}") as card, \
            open_reader(f"virtual:{paths['hsm']}") as hsm:
        loaded = T.load(card, hsm, load_amount, terminal_id=DEMO_LOAD_TERMINAL)
    money = loaded.money  # minor units in the card's currency: "CNY 12.34"

    lines += [
        f"Load {money(load_amount)}: card balance {money(loaded.balance_before)} -> "
        f"{money(loaded.balance_after)}",
        f"  card S1 {loaded.s1} verified by the HSM; HSM S2 {loaded.s2} accepted by the card; "
        f"card S3 (TAC) {loaded.s3} verified by the HSM",
    ]
    with open_reader(f"virtual:{paths['iep']}") as card, \
            open_reader(f"virtual:{paths['psam']}") as psam:
        bought = T.purchase(card, psam, purchase_amount)
    lines += [
        f"Purchase {money(purchase_amount)} at terminal {bought.terminal_id}: balance "
        f"{money(bought.balance_before)} -> {money(bought.balance_after)}",
        f"  PSAM MAC1 {bought.mac1} (TTN {bought.terminal_txn_number}) accepted by the card; "
        f"card MAC2 {bought.mac2} verified by the PSAM; card TAC {bought.tac}",
    ]
    with open_reader(f"virtual:{paths['iep']}") as card:
        _, balance = T.read_balance(card)
        log = T.read_log(card)
    lines.append(f"Card balance now {money(balance)}; log, newest first:")
    lines += [f"  {e.date} {e.time}  {e.type_name:<12} {money(e.amount):>10}  counter "
              f"{e.counter}" for e in log]
    goods = run_goods(paths["iep"], paths["psam"], lines, money)
    goods_network = run_goods_network(folder / "goods-network", lines, money)
    network = _network(folder, lines, money, load_amount)
    trade_lines, trade = run_trade(folder / "trade")
    lines += trade_lines
    wallet_lines, wallet = run_wallet(folder / "wallet")
    lines += wallet_lines
    return Story("\n".join(lines), {
        "folder": str(folder), "load": loaded.to_json(), "purchase": bought.to_json(),
        "balance": balance, "log": [e.__dict__ for e in log], "goods": goods,
        "goods_network": goods_network,
        "network": network, "trade": trade, "wallet": wallet})


def _network(folder: Path, lines: list[str], money: Callable[[int], str],
             load_amount: int) -> dict[str, Any]:
    """Seed FIG. 4-9 and 17-18 on loopback: a second card is loaded from a bank account, pays
    in each variant, the PSAM batches are cleared, and the audit balances."""
    system = start_system(folder / "network", psams=2)
    card_path = card_image(folder, "network-card.json", ep=0, profile="iep-miles-demo.toml")
    secret = system.load.account("demo", 100_000, "demo-secret")
    lines.append(
        f"Network: bank {system.load.bank.url} and load server {system.load.load.url} (a "
        f"software HSM); payment server {system.pay.payment.url} (2 PSAMs) and merchant "
        f"{system.pay.merchant.url}; SQLite everywhere; FIG. 9 encryption on every message.")
    out: dict[str, Any] = {"purchases": []}
    try:
        journal = Journal(folder / "journal.jsonl")
        with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card_path}") as card:
            started = time.perf_counter()
            loaded = load(system.load.bank_url, card, account="demo", secret=secret,
                          amount=load_amount, journal=journal, http=http)
            ms = (time.perf_counter() - started) * 1000
            lines.append(
                f"LOAD over the network: {money(loaded.amount)} from account 'demo' "
                f"(bank balance now {money(loaded.bank['account_balance'])}); card "
                f"{money(loaded.balance_before)} -> {money(loaded.balance_after)}; S1 checked "
                f"and S2 made by the HSM, S3 verified; the bank registered the load server's "
                f"sealed confirmation; {loaded.round_trips} round trips, {ms:.0f} ms")
            out["load"] = {**loaded.to_json(), "ms": round(ms, 1)}
            for sku, variant, what in (
                    ("ticket", "fig5", "the PSAM compares the card's MAC2"),
                    ("song", "fig6", "the PSAM is released early; the server compares"),
                    ("article", "fig7", "one round trip; a registered client terminal compares "
                                        "and signs; released unproven until the card's proof"),
                    ("ticket", "fig8", "one round trip; the merchant compares"),
                    ("login", "fig6", "zero-amount draw: card authentication")):
                started = time.perf_counter()
                outcome = pay(system.pay.checkout_url(sku, variant), card, journal=journal,
                              http=http, terminal=system.pay.client_terminal)
                ms = (time.perf_counter() - started) * 1000
                lines.append(
                    f"{variant.upper()} ({what}): {outcome.item}, {money(outcome.amount)}; "
                    f"balance {money(outcome.balance_before)} -> "
                    f"{money(outcome.balance_after)}; {outcome.round_trips} round trips, "
                    f"{ms:.0f} ms; goods: {outcome.goods}")
                out["purchases"].append({**outcome.to_json(), "ms": round(ms, 1)})
            out["points"] = run_points(folder / "points", card, lines, http, journal)
            out["sp"] = run_sp(system, lines, money, http)
        batches = system.close_batches()
        report = system.run_clearing()
        lines.append(
            f"CLEARING: {len(batches)} PSAM batches (MACs checked), {report.records_cleared} "
            f"card TACs checked and cleared, {money(report.total_paid)} paid to the merchant "
            f"through its acquirer, {money(report.total_loaded)} moved from the bank to the "
            f"issuer's float; settlement file {Path(report.settlement_file).name} (+ .jsonl)")
        result = system.audit([card_path, *system.sp_purses], sp_dbs=(out["sp"]["db_url"],))
        f = result.figures
        lines.append(
            f"AUDIT: cards (ours and the SP's purses) {money(f['card balances'])} + unsettled "
            f"{money(f['purchases unsettled'])} + settled {money(f['purchases settled'])} = "
            f"loaded {money(f['loads confirmed'])}; float {money(f['float (ledger)'])}; bank "
            f"debits {money(f.get('bank accounts debited', 0))}: "
            + ("clean" if result.clean else "DISCREPANCIES: " + "; ".join(
                result.discrepancies)))
        out["clearing"] = report.to_json()
        out["audit"] = result.to_json()
    finally:
        system.close()
    return out

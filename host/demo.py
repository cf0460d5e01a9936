"""``svcard demo``: the main job on embedded defaults, as a readable story and as data."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from svcard.card.image import save_new_image
from svcard.card.personalise import image_from_profile
from svcard.fixtures import fixture_path
from svcard.host import terminal as T
from svcard.host.client import pay
from svcard.host.journal import Journal
from svcard.host.specs import open_reader
from svcard.host.stack import start_stack

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
        save_new_image(paths[kind], image_from_profile(fixture_path(f"{kind}-demo.toml")),
                       overwrite=True)
    lines = [f"Personalised a purse card, a PSAM and a load HSM in {folder} "
             "(demo issuer, TEST KEYS ONLY; a temporary folder unless --keep names one)."]
    with open_reader(f"virtual:{paths['iep']}") as card, \
            open_reader(f"virtual:{paths['hsm']}") as hsm:
        loaded = T.load(card, hsm, load_amount, terminal_id=DEMO_LOAD_TERMINAL)
    exp = loaded.currency_exponent

    def money(value: int) -> str:
        return T.format_amount(value, exp)

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
    network = _network(folder, paths["iep"], lines, money)
    with open_reader(f"virtual:{paths['iep']}") as card:
        _, final = T.read_balance(card)
    lines.append(f"Card balance at the end: {money(final)}")
    return Story("\n".join(lines), {
        "folder": str(folder), "load": loaded.to_json(), "purchase": bought.to_json(),
        "balance": balance, "log": [e.__dict__ for e in log], "network": network,
        "final_balance": final})


def _network(folder: Path, card_path: Path, lines: list[str],
             money: Callable[[int], str]) -> list[dict[str, Any]]:
    """Seed FIG. 4-9: merchant and payment servers on loopback, a purchase in each variant."""
    stack = start_stack(folder / "network", psams=2)
    lines.append(f"Payment server {stack.payment.url} (2 PSAMs, SQLite), merchant "
                 f"{stack.merchant.url}; FIG. 9 encryption on every message.")
    out = []
    try:
        journal = Journal(folder / "journal.jsonl")
        with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card_path}") as card:
            for sku, variant, what in (
                    ("ticket", "fig5", "the PSAM compares the card's MAC2"),
                    ("song", "fig6", "the PSAM is released early; the server compares"),
                    ("article", "fig7", "one round trip; the client compares"),
                    ("ticket", "fig8", "one round trip; the merchant compares"),
                    ("login", "fig6", "zero-amount draw: card authentication")):
                started = time.perf_counter()
                outcome = pay(stack.checkout_url(sku, variant), card, journal=journal,
                              http=http)
                ms = (time.perf_counter() - started) * 1000
                lines.append(
                    f"{variant.upper()} ({what}): {outcome.item}, {money(outcome.amount)}; "
                    f"balance {money(outcome.balance_before)} -> "
                    f"{money(outcome.balance_after)}; {outcome.round_trips} round trips, "
                    f"{ms:.0f} ms; goods: {outcome.goods}")
                out.append({**outcome.to_json(), "ms": round(ms, 1)})
    finally:
        stack.close()
    return out

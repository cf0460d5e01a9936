"""The four breaks the review of issue 13 (R-13) left for others (helper F13b): each test here
failed on the code before its fix."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from test_attack_pay import Attacker, from_address

from svcard.host.demo.system import card_image
from svcard.host.kit.serving import ServerThread
from svcard.host.pay import client as C
from svcard.host.pay.server.app import MerchantAccount, PaymentServer
from svcard.host.pay.stack import DEMO_MERCHANT_ID, Stack, psam_images, start_stack
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import messages as M

# --- 1. FIG. 5 holds on a shared POS (FIG. 4B): counted per PSAM terminal ------------------
TA, TB, TC = (bytes.fromhex(t) for t in ("000000000A01", "000000000B02", "000000000C03"))


def shared_pos(folder: Path) -> tuple[Stack, str]:
    """An acquirer's POS for three merchants: A (the stack's) on terminal TA with 2 PSAMs, B
    on TB with ONE PSAM, C on TC with 5 (8 PSAMs: the old caps, half of all, were 4). The
    checkout URL base of B's commerce server."""
    stack = start_stack(folder, psams=2, terminal_id=TA, hold_timeout=60.0,
                        acquire_timeout=1.0)
    b = stack.add_merchant(b"MERCH00B", terminal_id=TB)
    config = stack.payment_server.config
    a = config.merchants[DEMO_MERCHANT_ID]
    config.merchants[DEMO_MERCHANT_ID] = MerchantAccount(a.merchant_id, a.shared_key,
                                                         a.variants, TA)
    config.merchants[b"MERCH00C"] = MerchantAccount(b"MERCH00C", b"\x01" * 32,
                                                    frozenset(M.VARIANTS.values()), TC)
    readers = [m.reader for m in stack.payment_server.pool.members]
    for tid, count, first in ((TB, 1, 11), (TC, 5, 21)):
        sub = folder / tid.hex()
        sub.mkdir()
        readers += [open_reader(f"virtual:{p}") for p in psam_images(sub, count, tid, first)]
    stack.payment.stop()
    stack.payment_server = PaymentServer(config, readers)
    stack.payment = ServerThread(stack.payment_server.app(), port=stack.payment.port).start()
    return stack, b.url


def test_one_client_cannot_hold_a_merchants_psams_on_a_shared_pos(
        tmp_path: Path, http: httpx.Client) -> None:
    """Before: the FIG. 5 caps were half of ALL the POS's PSAMs (4 of 8), so one client's
    fabricated draws (no card, never answered) held both of merchant A's PSAMs and merchant
    B's only one, for the whole hold timeout: the honest card holders of A and B got no PSAM
    (503 after the acquire timeout). Now the caps count the PSAMs of the merchant's own
    terminal: half of them, and a terminal with one PSAM takes no FIG. 5 hold at all."""
    stack, b_url = shared_pos(tmp_path / "pos")
    try:
        pool = stack.payment_server.pool
        with from_address("127.0.0.2") as far:
            on_a = [Attacker(stack, far, "fig5") for _ in range(2)]
            codes_a = [o.post("/v1/draw", o.fabricated_draw()).status_code for o in on_a]
            on_b = Attacker(None, far, params=C.fetch_checkout(
                far, f"{b_url}/v1/checkout/ticket?variant=fig5"))
            code_b = on_b.post("/v1/draw", on_b.fabricated_draw()).status_code
        free = {t: pool._queues[t].qsize() for t in (TA, TB)}
        print("attacker's draws: A", codes_a, "B", code_b, "free PSAMs", free)
        assert free[TA] >= 1, f"one client holds all of merchant A's PSAMs ({codes_a})"
        assert free[TB] == 1, f"one client holds merchant B's only PSAM ({code_b})"
        assert codes_a[0] == 200 and codes_a[1] == 429, codes_a
        assert code_b == 409
        for o in (on_a[1], on_b):   # nothing recorded for a refused draw
            assert stack.payment_server.db.get(o.params["merchant_id"],
                                               o.params["txn_id"]) is None
        card = card_image(tmp_path, "card.json")
        for url in (stack.checkout_url("ticket", "fig6"), f"{b_url}/v1/checkout/ticket"
                                                          "?variant=fig6"):
            with from_address("127.0.0.3") as near, \
                    open_reader(f"virtual:{card}") as reader:
                started = time.monotonic()
                outcome = C.pay(url, reader, journal=Journal(tmp_path / "j"), http=near)
            assert outcome.goods == "TICKET-MUSEUM-0042"
            assert time.monotonic() - started < 5
    finally:
        stack.close()

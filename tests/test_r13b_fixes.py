"""The four breaks the review of issue 13 (R-13) left for others (helper F13b): each test here
failed on the code before its fix."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from test_attack_pay import Attacker, from_address

from svcard.host.demo.system import card_image
from svcard.host.kit.serving import ServerThread
from svcard.host.pay import client as C
from svcard.host.pay.server.app import MerchantAccount, PaymentServer
from svcard.host.pay.stack import DEMO_MERCHANT_ID, Stack, psam_images, start_stack
from svcard.host.sp import db as D
from svcard.host.sp import signing as S
from svcard.host.sp.customers import add_customer
from svcard.host.sp.server.pon import set_merchant_key
from svcard.host.sp.stack import SpStack, demo_config, start_sp
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


def test_a_pos_of_one_terminal_keeps_its_fig5_caps(tmp_path: Path) -> None:
    """A payment server whose one merchant names its terminal (not shared) counts its caps as
    before, over all its PSAMs: with one PSAM, FIG. 5 is still offered (one hold)."""
    stack = start_stack(tmp_path / "one", psams=1, terminal_id=TA)
    try:
        config = stack.payment_server.config
        a = config.merchants[DEMO_MERCHANT_ID]
        config.merchants[DEMO_MERCHANT_ID] = MerchantAccount(a.merchant_id, a.shared_key,
                                                             a.variants, TA)
        stack.restart_payment()
        with httpx.Client(timeout=30) as http:
            first, second = Attacker(stack, http, "fig5"), Attacker(stack, http, "fig5")
            assert first.post("/v1/draw", first.fabricated_draw()).status_code == 200
            assert second.post("/v1/draw", second.fabricated_draw()).status_code == 429
    finally:
        stack.close()


# --- 2. a customer's signature names the SP it is for ------------------------------------------
class NeverPays:
    def pay(self, *_a: Any, **_k: Any) -> Any:
        raise AssertionError("an order signed for another SP reached the payment")


def orders_at(sp: SpStack) -> int:
    with sp.server.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(D.orders)).scalar_one())


@pytest.fixture
def two_sps(tmp_path: Path) -> Any:
    """Two SPs, "sp-a" and "sp-b", where ivy has an account with ONE key at both; sp-b holds
    merchant SHOP's key (the copy) and pays nothing (any payment is the break)."""
    sps = []
    for name in ("sp-a", "sp-b"):
        config = demo_config(tmp_path / name, "http://127.0.0.1:9",
                             merchants={"SHOP": "http://127.0.0.1:9"})
        config.name = name
        sps.append(start_sp(config, NeverPays()))
    private, public = S.new_key()
    merchant_private, merchant_public = S.new_key()
    for sp in sps:
        add_customer(sp.server.engine, "ivy", public, 10_000, sp.config.currency_code)
        set_merchant_key(sp.server.engine, "SHOP", merchant_public, 0)
    try:
        yield sps, private, merchant_private
    finally:
        for sp in sps:
            sp.close()


def test_an_order_signed_for_one_sp_is_refused_at_another(
        two_sps: Any, http: httpx.Client) -> None:
    """ivy's order, PON order, order placed at a merchant and lookup, each signed for sp-a and
    sent (by whoever saw it: sp-a, the merchant, the path) to sp-b within the 300 s: before,
    sp-b took each as ivy's (the signed bytes named no SP; the order key is unique per SP
    only) and went on to pay; now each is 401 and sp-b records nothing."""
    (_sp_a, sp_b), key, merchant_key = two_sps
    url = sp_b.url
    order, h1 = S.signed_order(key, "ivy", "MERCH001", "song", sp="sp-a")
    pon, h2 = S.signed_pon_order(key, "ivy", "SHOP", "ab" * 16, max_amount=500, sp="sp-a")
    look, h3 = S.signed_lookup(key, "ivy", "cd" * 16, sp="sp-a")
    at_merchant, customer_sig = S.signed_merchant_order(key, "ivy", "SHOP", "song",
                                                        sp="sp-a")
    copy = json.dumps({"merchant": "SHOP", "pon": "ef" * 16, "sku": "song", "item": "song",
                       "amount": 99, "currency_code": 156, "created": int(time.time()),
                       "order": at_merchant.decode(), "customer_signature": customer_sig},
                      separators=(",", ":"), sort_keys=True).encode()
    merchant_sig = S.sign(merchant_key, copy, S.COPY_DOMAIN)
    answers = {
        "order": http.post(f"{url}/v1/orders", content=order, headers=h1),
        "pon": http.post(f"{url}/v1/orders/pon", content=pon, headers=h2),
        "lookup": http.post(f"{url}/v1/orders/lookup", content=look, headers=h3),
        "copy": http.post(f"{url}/v1/orders/copy", content=copy,
                          headers={S.MERCHANT_HEADER: merchant_sig})}
    got = {k: (a.status_code, a.json().get("reason", "")[:80]) for k, a in answers.items()}
    print("sp-b's answers to requests signed for sp-a:", got)
    assert {k: c for k, (c, _r) in got.items()} == dict.fromkeys(answers, 401), got
    assert all("sp-a" in reason for _c, reason in got.values()), got
    assert orders_at(sp_b) == 0
    # the same requests signed for sp-b are taken (and reach the payment: NeverPays)
    order, h1 = S.signed_order(key, "ivy", "MERCH001", "song", sp="sp-b")
    assert http.post(f"{url}/v1/orders", content=order, headers=h1).status_code != 401
    assert orders_at(sp_b) == 1


def test_a_version_1_signature_is_refused(two_sps: Any, http: httpx.Client) -> None:
    """The labels are version 2 (they cover the SP's name): an order in the version 1 form
    (no ``sp``) is 400, and a version 2 body signed under the version 1 label is 401; either
    way nothing is recorded."""
    (sp_a, _sp_b), key, _merchant_key = two_sps
    old = json.dumps({"customer": "ivy", "merchant": "MERCH001", "sku": "song",
                      "order_key": "12" * 16, "created": int(time.time())},
                     separators=(",", ":"), sort_keys=True).encode()
    old_sig = S.sign(key, old, b"svcard-sp-order/1\n")
    r = http.post(f"{sp_a.url}/v1/orders", content=old, headers={S.HEADER: old_sig})
    assert r.status_code == 400 and "sp" in r.json()["reason"], r.text
    new, _h = S.signed_order(key, "ivy", "MERCH001", "song", sp="sp-a")
    r = http.post(f"{sp_a.url}/v1/orders", content=new,
                  headers={S.HEADER: S.sign(key, new, b"svcard-sp-order/1\n")})
    assert r.status_code == 401, r.text
    assert orders_at(sp_a) == 0


# --- 4. svcard sp pon: the customer names its cap --------------------------------------------
def test_sp_pon_without_a_cap_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    """Before: without ``--max-amount`` the command signed ``max_amount: null``, and the SP
    billed whatever the merchant's answer asked (an amount the customer had not seen at that
    point): here it went on to send the order. Now the cap is required: one line naming the
    option, the input exit code, nothing sent."""
    from click.testing import CliRunner

    from svcard.host.cli.main import main
    from svcard.host.kit.command_line import EXIT_INPUT

    key_file = tmp_path / "ivy.key"
    S.write_private_key(key_file, S.new_key()[0])
    got = CliRunner().invoke(main, ["sp", "pon", "http://127.0.0.1:9", "--customer", "ivy",
                                    "--key", str(key_file), "--merchant", "SHOP",
                                    "--pon", "ab" * 16], prog_name="svcard")
    print(got.exit_code, got.output)
    assert got.exit_code == EXIT_INPUT and "--max-amount" in got.output, got.output
    assert "no answer" not in got.output   # (nothing was sent)
    assert "--max-amount" in CliRunner().invoke(main, ["sp", "pon", "--help"]).output


# --- 3. answers read at most a bound, within a deadline -----------------------------------------
def endless(path: str, method: str) -> tuple[ServerThread, list[int], list[bool]]:
    """A server answering ``method path`` with a JSON body that never ends (up to 32 MiB):
    the thread, the bytes it sent, and a flag that stops it."""
    import asyncio
    from collections.abc import AsyncIterator

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    sent, stop = [0], [False]

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"amount": 1, "pad": "'
        while not stop[0] and sent[0] < 32 << 20:
            sent[0] += 65536
            yield b"x" * 65536
            await asyncio.sleep(0.005)

    async def answer(_request: Request) -> StreamingResponse:
        return StreamingResponse(chunks(), media_type="application/json")

    return ServerThread(Starlette(routes=[Route(path, answer, methods=[method])])).start(), \
        sent, stop


def test_a_checkout_answer_without_end_is_not_read_whole(tmp_path: Path) -> None:
    """A merchant (or anyone on the path) answering the checkout with a body that never ends:
    before, the client read it whole (32 MiB here, held in memory) before looking at it; now it
    stops past 16 KiB and says why, nothing paid."""
    from svcard.host.terminal.purse import TerminalCheckFailed

    fake, sent, stop = endless("/v1/checkout/ticket", "POST")
    try:
        started = time.monotonic()
        with httpx.Client(timeout=10) as http, pytest.raises(TerminalCheckFailed) as refused:
            C.fetch_checkout(http, f"{fake.url}/v1/checkout/ticket")
        print(refused.value, f"after {sent[0]} bytes sent")
        assert "longer than 16384 bytes" in str(refused.value)
        assert sent[0] <= 1 << 20 and time.monotonic() - started < 8
    finally:
        stop[0] = True
        fake.stop()


def test_an_sp_answer_without_end_is_not_read_whole(tmp_path: Path) -> None:
    """The merchant's copy of a customer's order (``/v1/pon/via-sp``) to an SP answering
    without end: before, the merchant read the SP's answer whole (then dropped it past 8 KiB);
    now it stops past 8 KiB and answers the customer 502 with the reason, the PON unpaid."""
    import os

    from svcard.host.pay.merchant import pon as MP
    from svcard.host.pay.merchant.server import MerchantConfig, MerchantServer

    fake, sent, stop = endless("/v1/orders/copy", "POST")
    private, _public = S.new_key()
    server = MerchantServer(MerchantConfig(
        b"R13BSHOP", os.urandom(32), "http://127.0.0.1:9", b"\x00\x00\x00\x00\x0a\x02",
        db_url=f"sqlite:///{tmp_path / 'merchant.db'}",
        pon=MP.PonSettings(private, "SHOP", sp_url=fake.url)))
    thread = ServerThread(server.app()).start()
    try:
        key = S.new_key()[0]
        old = json.dumps({"customer": "ivy", "merchant": "SHOP", "sku": "song",
                          "max_amount": None, "order_key": "12" * 16,
                          "created": int(time.time())}).encode()   # version 1: no SP named
        refused = httpx.post(f"{thread.url}/v1/pon/via-sp", headers={"X-Svcard-Client": "1"},
                             json={"order": old.decode(), "signature": "00" * 64})
        assert refused.status_code == 400 and "sp" in refused.json()["reason"], refused.text
        assert sent[0] == 0   # no PON made, no copy sent
        order, signature = S.signed_merchant_order(key, "ivy", "SHOP", "song")
        started = time.monotonic()
        got = httpx.post(f"{thread.url}/v1/pon/via-sp", headers={"X-Svcard-Client": "1"},
                         json={"order": order.decode(), "signature": signature}, timeout=10)
        print(got.status_code, got.text[:300], f"after {sent[0]} bytes sent")
        assert got.status_code == 502, got.text
        assert "longer than 8192 bytes" in got.json()["sp"]["reason"]
        assert got.json()["paid"] is False
        assert sent[0] <= 1 << 20 and time.monotonic() - started < 8
    finally:
        stop[0] = True
        thread.stop()
        server.close()
        fake.stop()


def test_the_sp_name_setting(tmp_path: Path) -> None:
    """``name`` in the SP's TOML is the name its customers sign for (default svcard-sp); a
    bad one is refused with one line naming the file and the field."""
    from svcard.host.kit.config import ConfigError
    from svcard.host.sp.config import sp_config

    text = ('[[merchant]]\nname = "M1"\ncheckout_url = "http://127.0.0.1:1/v1/checkout"\n'
            '[[merchant.item]]\nsku = "song"\nretail = 100\n')
    plain = tmp_path / "plain.toml"
    plain.write_text(text)
    assert sp_config(plain).name == S.DEFAULT_SP
    good = tmp_path / "sp.toml"
    good.write_text('name = "sp-north"\n' + text)
    assert sp_config(good).name == "sp-north"
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "sp north!"\n' + text)
    with pytest.raises(ConfigError, match=r"bad\.toml: name"):
        sp_config(bad)

"""Seed 001 FIG. 4A and 4B over loopback with real servers: the merchant's point of sale (a
payment server with its PSAMs) apart from its commerce server.

FIG. 4A: the merchant's remote POS is a ``svcard serve payment`` PROCESS of its own (its own
port and database); the commerce server (``MerchantServer``) enables only FIG. 5 and 6, the
variants in which the POS itself checks the card's MAC2 before it issues "debit result M", the
payment acknowledgement (sealed under the key only the POS and the merchant share). The SP's
purse pays the POS; the acknowledgement, carried to the commerce server, releases the goods.
Anything else is refused and releases nothing: a forged acknowledgement, a genuine one moved to
another order, a POS saying the card did not pay, an altered copy, a variant where the POS
does not compare, and a payment while the POS is down (nothing paid)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select

from svcard.host.demo.system import card_image
from svcard.host.kit.serving import ServerThread, free_port
from svcard.host.load.stack import LoadStack, start_load_stack
from svcard.host.pay import client as PC
from svcard.host.pay.merchant import db as MD
from svcard.host.pay.merchant.server import MerchantConfig, MerchantServer
from svcard.host.pay.server.db import payments
from svcard.host.pay.stack import psam_images
from svcard.host.sp.purses.pool import PursePoolConfig
from svcard.host.sp.stack import SpStack, demo_config, purse_images, start_sp
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import messages as M
from svcard.protocols import secure

SVCARD = str(Path(sys.executable).parent / "svcard")
TERMINAL = bytes.fromhex("000000000001")      # psam-demo.toml's terminal id
MERCH_A = b"MERCH4A1"


class PosProcess:
    """A payment server run as its own process (``svcard serve payment``): a merchant's remote
    POS (FIG. 4A) or an acquirer's shared one (FIG. 4B)."""

    def __init__(self, folder: Path, merchants: dict[bytes, bytes], psams: list[Path],
                 variants: tuple[str, ...] = ("fig5", "fig6"),
                 terminals: dict[bytes, bytes] | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.port = folder, free_port()
        self.db = f"sqlite:///{folder / 'pos.db'}"
        self.token = os.urandom(16).hex()
        lines = [f'db = "{self.db}"', f'admin_token = "{self.token}"',
                 f'concentration_dir = "{folder / "concentration"}"']
        for mid, key in merchants.items():
            lines += ["[[merchant]]", f'id = "{mid.hex()}"', f'shared_key = "{key.hex()}"',
                      f"variants = {json.dumps(list(variants))}"]
            if terminals:     # the PSAM terminal this merchant's payments are made on
                lines.append(f'terminal_id = "{terminals[mid].hex()}"')
        self.config = folder / "pos.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.psams = psams
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [SVCARD, "serve", "payment", "--config", str(self.config), "--port",
                str(self.port), "--log-level", "warning"]
        for p in self.psams:
            args += ["--psam", f"virtual:{p}"]
        errors = self.folder / "stderr.txt"
        with errors.open("wb") as err:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the POS exited: {errors.read_text()[-600:]}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the POS did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def rows(self) -> list[dict[str, Any]]:
        engine = create_engine(self.db)
        try:
            with engine.connect() as conn:
                return [dict(r._mapping) for r in conn.execute(select(payments))]
        finally:
            engine.dispose()


@dataclass
class Shop:
    """A merchant's commerce server (its own port and database), in this process."""

    merchant_id: bytes
    key: bytes
    server: MerchantServer
    thread: ServerThread

    @property
    def url(self) -> str:
        return self.thread.url

    def close(self) -> None:
        self.thread.stop()
        self.server.close()


def open_shop(folder: Path, merchant_id: bytes, key: bytes, pos_url: str,
              terminal_id: bytes = TERMINAL) -> Shop:
    port = free_port()
    server = MerchantServer(MerchantConfig(
        merchant_id, key, pos_url, terminal_id, public_url=f"http://127.0.0.1:{port}",
        variants=frozenset({"fig5", "fig6"}), max_open_per_client=10_000,
        db_url=f"sqlite:///{folder / f'shop-{merchant_id.hex()}.db'}"))
    return Shop(merchant_id, key, server, ServerThread(server.app(), port=port).start())


def open_sp(folder: Path, load: LoadStack, merchants: dict[str, str],
            payment_servers: list[str], purses: int = 1) -> SpStack:
    """The SP selling the demo items of ``merchants`` (name -> commerce server URL), paying
    from ``purses`` pool purses that top up from its bank, only at ``payment_servers``."""
    load.account("sp", 100_000, "sp-pw")
    images = purse_images(folder / "purses", purses, ep=0)
    pool = PursePoolConfig(readers=[f"virtual:{p}" for p in images], bank_url=load.bank_url,
                           account="sp", secret="sp-pw", currency_code=156,
                           topup_threshold=1_000, topup_amount=5_000,
                           payment_servers=payment_servers)
    (name, url), *more = merchants.items()
    return start_sp(demo_config(folder, url, purses=pool, merchants=dict(more),
                                merchant_name=name))


def capture_confirmations(log: list[bytes]) -> httpx.Client:
    """An HTTP client that keeps every confirmation it posts to a status URL."""
    def keep(request: httpx.Request) -> None:
        if "/v1/status/" in request.url.path:
            log.append(request.content)
    return httpx.Client(timeout=30, event_hooks={"request": [keep]})


def open_order(shop: Shop, http: httpx.Client, sku: str = "song") -> dict[str, Any]:
    """A checkout at ``shop`` (an open order nobody has paid)."""
    answer = http.post(f"{shop.url}/v1/checkout/{sku}", headers={"X-Svcard-Client": "1"})
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def confirmation(txn_id: bytes, result_m: bytes, variant: int = M.FIG6_SERVER_COMPARES) -> bytes:
    return M.build(M.Confirmation, {"version": M.VERSION, "variant": variant, "txn_id": txn_id,
                                    "result_m": result_m, "card_mac2": bytes(4),
                                    "sealed_expected_mac2": b""})


def result_m(key: bytes, mid: bytes, txn_id: bytes, amount: int, status: int) -> bytes:
    """A debit result M sealed under ``key`` (the shared key, or an attacker's guess)."""
    plain = M.build(M.DebitResult, {
        "version": M.VERSION, "status": status, "variant": M.FIG6_SERVER_COMPARES,
        "merchant_id": mid, "txn_id": txn_id, "amount": amount, "currency_code": 156,
        "psam_id": bytes(10), "terminal_txn_number": 1, "card_serial": bytes(10),
        "card_counter": 1, "tac": bytes(4), "reason": ""})
    dk = secure.derive_key(key, mid, txn_id)
    return secure.seal(dk, plain, M.result_m_aad(mid, txn_id))


def order_state(shop: Shop, txn_hex: str) -> str:
    row = shop.server.db.get(txn_hex)
    assert row is not None
    return str(row["state"])


@pytest.fixture
def load(tmp_path: Path) -> Iterator[LoadStack]:
    stack = start_load_stack(tmp_path / "load")
    yield stack
    stack.close()


def test_fig4a_the_remote_pos_acknowledgement_releases_the_goods(
        load: LoadStack, tmp_path: Path) -> None:
    key = secure.new_key()
    pos = PosProcess(tmp_path / "pos", {MERCH_A: key}, psam_images(tmp_path, 1))
    pos.start()
    shop = open_shop(tmp_path, MERCH_A, key, pos.url)
    sp = open_sp(tmp_path / "sp", load, {"SHOP-A": shop.url}, [pos.url])
    seen: list[bytes] = []
    try:
        with capture_confirmations(seen) as http:
            # the SP pays the remote POS; its acknowledgement releases the goods
            alice = sp.customer("alice")
            answer = sp.order(http, alice, "song", merchant="SHOP-A")
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert (body["state"], body["line"]["wholesale"]) == ("billed", 99)
            [row] = pos.rows()                       # in the POS's own database
            assert (row["state"], row["variant"], row["merchant_id"]) == (
                "confirmed", M.FIG6_SERVER_COMPARES, MERCH_A.hex())
            receipt = body["receipt"]                # the POS's PSAM and TTN, as it said
            assert (receipt["psam_id"].lower(), receipt["terminal_txn_number"]) == (
                row["psam_id"], row["ttn"])
            assert order_state(shop, row["txn_id"]) == MD.PAID
            assert not pos.db.endswith("shop.db") and shop.server.config.db_url != pos.db

            # FIG. 5 too (the PSAM compares): a card holder paying the same remote POS
            card = card_image(tmp_path, "bob.json", ep=5_000)
            with open_reader(f"virtual:{card}") as reader:
                paid = PC.pay(f"{shop.url}/v1/checkout/song?variant=fig5", reader,
                              journal=Journal(tmp_path / "bob.jsonl"), http=http)
            assert (paid.variant, paid.amount) == ("fig5", 99)
            genuine = seen[-1]
            genuine_txn = bytes.fromhex(paid.txn_id)

            # an open order nobody paid: nothing but the POS's acknowledgement releases it
            order = open_order(shop, http)
            txn = bytes.fromhex(order["txn_id"])
            status_url = order["status_url"]
            forged = result_m(secure.new_key(), MERCH_A, txn, 99, M.STATUS_OK)
            tries = [
                (confirmation(txn, forged), 400),                      # not under the key
                (genuine, 400),                                        # another order's
                (confirmation(txn, M.parse(M.Confirmation, genuine, "c").result_m), 400),
                (confirmation(txn, result_m(key, MERCH_A, txn, 99, 2)), 402),   # "not paid"
                (confirmation(txn, result_m(key, MERCH_A, txn, 1, M.STATUS_OK)), 400),
                (confirmation(txn, b"\x00" * 40), 400),                # truncated garbage
                (b"SC", 400),
            ]
            for data, status in tries:
                answer = http.post(status_url, content=data)
                assert answer.status_code == status, (answer.status_code, answer.text)
                assert answer.json()["released"] is False
            assert order_state(shop, order["txn_id"]) == MD.OPEN
            # the genuine acknowledgement again: the same answer (a lost reply), an altered
            # copy of it: refused
            again = http.post(f"{shop.url}/v1/status/{paid.txn_id}", content=genuine)
            assert again.status_code == 200 and again.json()["goods"] == paid.goods
            altered = genuine[:-1] + bytes([genuine[-1] ^ 1])
            again = http.post(f"{shop.url}/v1/status/{genuine_txn.hex()}", content=altered)
            assert again.status_code in (400, 409) and again.json()["released"] is False

            # a variant where the POS does not compare is not taken by this commerce server
            bad = http.post(f"{shop.url}/v1/checkout/song?variant=fig8",
                            headers={"X-Svcard-Client": "1"})
            assert bad.status_code == 400

            # the POS down: the SP's order fails with nothing paid, no goods
            pos.stop()
            paid_orders = shop.server.db.counts().get(MD.PAID, 0)
            answer = sp.order(http, alice, "article", merchant="SHOP-A")
            assert answer.status_code == 503, answer.text
            assert answer.json()["state"] == "failed"
            assert shop.server.db.counts().get(MD.PAID, 0) == paid_orders
    finally:
        sp.close()
        shop.close()
        pos.stop()


# --- FIG. 4B: one payment server (the acquirer's shared POS) for several merchants ----------

MERCH_B = b"MERCH4B2"
ACQUIRER = "4143515530303031"          # "ACQU0001"
TERMINALS = {MERCH_A: bytes.fromhex("000000000A01"), MERCH_B: bytes.fromhex("000000000B02")}
BATCH_KEY = "311B7052A40A83B818D99E9EC07821C9"   # psam-demo.toml's (test key)


@dataclass
class Shared:
    pos: PosProcess
    shops: dict[bytes, Shop]
    sp: SpStack
    keys: dict[bytes, bytes]

    def close(self) -> None:
        self.sp.close()
        for shop in self.shops.values():
            shop.close()
        self.pos.stop()


def open_shared(folder: Path, load: LoadStack, *, own_terminals: bool) -> Shared:
    """A shared POS process for merchants A and B (each its own key and commerce server);
    ``own_terminals``: each merchant's payments are made on a PSAM terminal of its own."""
    keys = {MERCH_A: secure.new_key(), MERCH_B: secure.new_key()}
    for mid in keys:
        (folder / f"psams-{mid.hex()}").mkdir(parents=True, exist_ok=True)
    if own_terminals:
        psams = [p for i, (mid, tid) in enumerate(TERMINALS.items())
                 for p in psam_images(folder / f"psams-{mid.hex()}", 1, tid, first_serial=i + 1)]
    else:
        psams = psam_images(folder / f"psams-{MERCH_A.hex()}", 2)
    pos = PosProcess(folder / "pos", keys, psams, ("fig5", "fig6", "fig8"),
                     terminals=TERMINALS if own_terminals else None)
    pos.start()
    shops: dict[bytes, Shop] = {}
    try:
        for mid, key in keys.items():
            shops[mid] = open_shop(folder, mid, key, pos.url,
                                   TERMINALS[mid] if own_terminals else TERMINAL)
        sp = open_sp(folder / "sp", load, {"SHOP-A": shops[MERCH_A].url,
                                           "SHOP-B": shops[MERCH_B].url}, [pos.url])
    except Exception:
        for shop in shops.values():
            shop.close()
        pos.stop()
        raise
    return Shared(pos, shops, sp, keys)


class SwapMerchant(httpx.HTTPTransport):
    """A man in the middle: the draw request's merchant id changed to ``to`` in transit."""

    def __init__(self, to: bytes) -> None:
        super().__init__()
        self.to, self.swapped = to, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/v1/draw"):
            body = request.read()
            body = body[:4] + self.to + body[12:]      # "SV", version, type, merchant id 8
            self.swapped += 1
            request = httpx.Request(request.method, request.url, content=body,
                                    headers={k: v for k, v in request.headers.items()
                                             if k.lower() != "content-length"})
        return super().handle_request(request)


def released_txns(shop: Shop) -> set[str]:
    return {t.hex() for t in shop.server.orders
            if shop.server.orders[t].state == MD.PAID}


def test_fig4b_a_shared_pos_routes_each_payment_to_its_merchant(
        load: LoadStack, tmp_path: Path) -> None:
    shared = open_shared(tmp_path, load, own_terminals=False)
    shop_a, shop_b = shared.shops[MERCH_A], shared.shops[MERCH_B]
    seen: list[bytes] = []
    try:
        with capture_confirmations(seen) as http:
            alice = shared.sp.customer("alice")
            for merchant, sku in (("SHOP-A", "song"), ("SHOP-B", "ticket"),
                                  ("SHOP-A", "article"), ("SHOP-B", "song")):
                answer = shared.sp.order(http, alice, sku, merchant=merchant)
                assert answer.status_code == 200, answer.text
            rows = shared.pos.rows()                 # one payment server, both merchants
            by_merchant = {mid: {r["txn_id"] for r in rows if r["merchant_id"] == mid.hex()}
                           for mid in (MERCH_A, MERCH_B)}
            assert {m: len(t) for m, t in by_merchant.items()} == {MERCH_A: 2, MERCH_B: 2}
            assert all(r["state"] == "confirmed" for r in rows)
            # each confirmation went to its own merchant's server only
            assert released_txns(shop_a) == by_merchant[MERCH_A]
            assert released_txns(shop_b) == by_merchant[MERCH_B]
            assert not set(shop_b.server.orders) & {bytes.fromhex(t)
                                                     for t in by_merchant[MERCH_A]}

            # a card holder at A: its genuine acknowledgement, presented at B's server
            card = card_image(tmp_path, "bob.json", ep=5_000)
            with open_reader(f"virtual:{card}") as reader:
                paid = PC.pay(f"{shop_a.url}/v1/checkout/song", reader,
                              journal=Journal(tmp_path / "bob.jsonl"), http=http)
            genuine = seen[-1]
            order_b = open_order(shop_b, http)
            txn_b = bytes.fromhex(order_b["txn_id"])
            result_a = M.parse(M.Confirmation, genuine, "c").result_m
            for url, data, status in (
                    (f"{shop_b.url}/v1/status/{paid.txn_id}", genuine, 404),   # no such order
                    (order_b["status_url"], genuine, 400),                     # another txn
                    (order_b["status_url"], confirmation(txn_b, result_a), 400)):
                answer = http.post(url, content=data)
                assert answer.status_code == status, (answer.status_code, answer.text)
                assert answer.json()["released"] is False
            assert order_state(shop_b, order_b["txn_id"]) == MD.OPEN

        # the merchant id swapped in transit (A's order presented as B's): refused, the card
        # is not debited, no payment at either merchant
        before = json.loads(card.read_text())["app"]["ep"]["balance"]
        rows_before = len(shared.pos.rows())
        swap = SwapMerchant(MERCH_B)
        with httpx.Client(timeout=30, transport=swap) as mitm, \
                open_reader(f"virtual:{card}") as reader, \
                pytest.raises(PC.PaymentRefused) as refused:
            PC.pay(f"{shop_a.url}/v1/checkout/song", reader,
                       journal=Journal(tmp_path / "bob2.jsonl"), http=mitm)
        assert swap.swapped == 1 and refused.value.status == 400, refused.value
        assert json.loads(card.read_text())["app"]["ep"]["balance"] == before
        assert [r["state"] for r in shared.pos.rows()][rows_before:] == []
        assert len(released_txns(shop_a)) == 3 and len(released_txns(shop_b)) == 2
    finally:
        shared.close()


def clearing_toml(folder: Path) -> Path:
    from svcard.fixtures import fixture_path

    lines = [f'settlement_key = "{"5C" * 32}"', "currency_code = 156", "[[issuer]]",
             f'profile = "{fixture_path("demo-issuer.toml")}"']
    for mid, tid in TERMINALS.items():
        lines += ["[[terminal]]", f'terminal_id = "{tid.hex()}"', f'batch_key = "{BATCH_KEY}"',
                  f'merchant_id = "{mid.hex()}"', f'acquirer_id = "{ACQUIRER}"']
    path = folder / "clearing.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fig4b_clearing_pays_each_merchant_of_a_shared_pos_its_own_sum(
        load: LoadStack, tmp_path: Path, http: httpx.Client) -> None:
    from svcard.host.settle import clearing as CL
    from svcard.host.settle.config import clearing_config
    from svcard.host.settle.db import make_engine

    shared = open_shared(tmp_path, load, own_terminals=True)
    try:
        alice = shared.sp.customer("alice")
        for merchant, sku in (("SHOP-A", "song"), ("SHOP-B", "ticket"), ("SHOP-A", "song"),
                              ("SHOP-B", "article")):
            answer = shared.sp.order(http, alice, sku, merchant=merchant)
            assert answer.status_code == 200, answer.text
        # merchant A's checkout naming B's terminal (to have its sales paid to B, or a
        # mistake): the shared POS refuses the draw, the card pays nothing
        (tmp_path / "wrong").mkdir()
        wrong = open_shop(tmp_path / "wrong", MERCH_A, shared.keys[MERCH_A], shared.pos.url,
                          TERMINALS[MERCH_B])
        card = card_image(tmp_path, "bob.json", ep=5_000)
        try:
            with open_reader(f"virtual:{card}") as reader, \
                    pytest.raises(PC.PaymentRefused, match="another payment terminal"):
                PC.pay(f"{wrong.url}/v1/checkout/song", reader,
                       journal=Journal(tmp_path / "bob.jsonl"), http=http)
        finally:
            wrong.close()
        assert json.loads(card.read_text())["app"]["ep"]["balance"] == 5_000
        closed = http.post(f"{shared.pos.url}/v1/batches/close",
                           headers={"Authorization": f"Bearer {shared.pos.token}"})
        assert closed.status_code == 200, closed.text
        report = CL.run_clearing(
            clearing_config(clearing_toml(tmp_path)), shared.pos.folder / "concentration",
            make_engine(f"sqlite:///{tmp_path / 'clearing.db'}"), tmp_path / "settlement",
            load_db_urls=(str(load.load_server.config.db_url),))
    finally:
        shared.close()
    assert (report.records_cleared, report.total_paid) == (4, 99 + 1250 + 99 + 25)
    payouts = {ln["payee"]: (ln["count"], ln["amount"]) for ln in report.lines
               if ln["kind"] == 3}
    assert payouts == {MERCH_A.hex().upper(): (2, 198), MERCH_B.hex().upper(): (2, 1275)}


def test_fig4a_merchants_with_remote_poses_of_their_own_are_cleared_apart(
        load: LoadStack, tmp_path: Path, http: httpx.Client) -> None:
    """Several separate payment servers: each merchant's remote POS has its own PSAM terminal;
    the SP pays at both, each POS hands over its own batches, and clearing pays each merchant
    its own sum (the terminal id is in the card's TAC, so the routing is the card's proof)."""
    from svcard.host.settle import clearing as CL
    from svcard.host.settle.config import clearing_config
    from svcard.host.settle.db import make_engine

    keys = {MERCH_A: secure.new_key(), MERCH_B: secure.new_key()}
    poses: dict[bytes, PosProcess] = {}
    shops: dict[bytes, Shop] = {}
    concentration = tmp_path / "concentration"
    try:
        for i, (mid, key) in enumerate(keys.items()):
            folder = tmp_path / f"pos-{mid.hex()}"
            folder.mkdir(parents=True)
            poses[mid] = PosProcess(folder, {mid: key},
                                    psam_images(folder, 1, TERMINALS[mid], first_serial=i + 1))
            poses[mid].start()
            shops[mid] = open_shop(tmp_path, mid, key, poses[mid].url, TERMINALS[mid])
        sp = open_sp(tmp_path / "sp", load, {"SHOP-A": shops[MERCH_A].url,
                                             "SHOP-B": shops[MERCH_B].url},
                     [p.url for p in poses.values()])
        try:
            alice = sp.customer("alice")
            for merchant, sku in (("SHOP-A", "song"), ("SHOP-B", "ticket"),
                                  ("SHOP-A", "article"), ("SHOP-B", "song")):
                answer = sp.order(http, alice, sku, merchant=merchant)
                assert answer.status_code == 200, answer.text
        finally:
            sp.close()
        assert [len(p.rows()) for p in poses.values()] == [2, 2]   # each its own database
        for pos in poses.values():
            closed = http.post(f"{pos.url}/v1/batches/close",
                               headers={"Authorization": f"Bearer {pos.token}"})
            assert closed.status_code == 200, closed.text
            for path in (pos.folder / "concentration").glob("*.json"):
                concentration.mkdir(exist_ok=True)
                path.rename(concentration / path.name)
    finally:
        for shop in shops.values():
            shop.close()
        for pos in poses.values():
            pos.stop()
    report = CL.run_clearing(
        clearing_config(clearing_toml(tmp_path)), concentration,
        make_engine(f"sqlite:///{tmp_path / 'clearing.db'}"), tmp_path / "settlement",
        load_db_urls=(str(load.load_server.config.db_url),))
    assert (report.records_cleared, report.total_paid) == (4, 99 + 1250 + 25 + 99)
    payouts = {ln["payee"]: (ln["count"], ln["amount"]) for ln in report.lines
               if ln["kind"] == 3}
    assert payouts == {MERCH_A.hex().upper(): (2, 124), MERCH_B.hex().upper(): (2, 1349)}


def test_fig4b_a_shared_pos_configuration_is_whole(tmp_path: Path) -> None:
    """Every merchant names its terminal or none does; every PSAM is of a named terminal and
    every named terminal has a PSAM: else one error naming the field or the reader."""
    from svcard.host.kit.config import ConfigError
    from svcard.host.pay.config import payment_config
    from svcard.host.pay.server.psam_pool import PoolError, PsamIdentity, check_pool

    pos = PosProcess(tmp_path, {MERCH_A: bytes(32), MERCH_B: bytes(32)}, [],
                     terminals=TERMINALS)
    config = payment_config(pos.config)
    assert {m: a.terminal_id for m, a in config.merchants.items()} == TERMINALS
    text = pos.config.read_text()
    pos.config.write_text(text.replace(f'terminal_id = "{TERMINALS[MERCH_B].hex()}"\n', ""))
    with pytest.raises(ConfigError, match=r"merchant\[1\]\.terminal_id: give every merchant"):
        payment_config(pos.config)
    psams = [PsamIdentity(f"virtual:p{i}", t, bytes([i]) * 10, 156)
             for i, t in enumerate(TERMINALS.values())]
    check_pool(psams, frozenset(TERMINALS.values()))
    with pytest.raises(PoolError, match="no PSAM has the terminal id 000000000B02"):
        check_pool(psams[:1], frozenset(TERMINALS.values()))
    with pytest.raises(PoolError, match="virtual:p1 has terminal id 000000000B02, which no "):
        check_pool(psams, frozenset(TERMINALS.values()) - {TERMINALS[MERCH_B]})
    with pytest.raises(PoolError, match="differ in terminal id"):
        check_pool(psams)               # no merchant names one: one terminal, as before


def test_fig4b_one_merchants_busy_psams_do_not_hold_up_another(tmp_path: Path) -> None:
    """The shared POS's pool keeps a queue per terminal: a draw for A waits only for A's
    PSAMs, B's are served at once, and each PSAM goes back to its own terminal's queue."""
    import asyncio

    from svcard.host.pay.server.psam_pool import PoolExhausted, PsamPool

    readers = [open_reader(f"virtual:{p}") for i, (mid, tid) in enumerate(TERMINALS.items())
               for p in psam_images(_made(tmp_path / mid.hex()), 1, tid, first_serial=i + 1)]
    a, b = TERMINALS[MERCH_A], TERMINALS[MERCH_B]

    async def run() -> None:
        pool = PsamPool(readers, terminals=frozenset(TERMINALS.values()))
        await pool.start()
        try:
            assert pool.idle == 2 and pool.terminal_ids == {a, b}
            held = await pool.acquire_for(a, 1)
            assert held.terminal_id == a
            with pytest.raises(PoolExhausted, match="terminal 000000000A01"):
                await pool.acquire_for(a, 0.05)        # A's only PSAM is busy
            other = await pool.acquire_for(b, 0.05)    # B is not held up
            assert other.terminal_id == b and pool.idle == 0
            pool.release(held)
            pool.release(other)
            assert [(await pool.acquire_for(t, 0.05)).terminal_id for t in (b, a)] == [b, a]
        finally:
            pool.close()

    asyncio.run(run())


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_fig4b_a_shared_pos_with_a_terminal_per_merchant_is_not_run_as_nodes(
        tmp_path: Path) -> None:
    """A node leases PSAMs of one terminal: a draw could get another merchant's terminal's
    PSAM, so such a configuration is refused at once, naming the field."""
    from svcard.host.pay.config import payment_config
    from svcard.host.pay.server.app import PaymentServer

    pos = PosProcess(tmp_path, {MERCH_A: bytes(32), MERCH_B: bytes(32)}, [],
                     terminals=TERMINALS)
    config = payment_config(pos.config)
    config.node_name = "node1"
    with pytest.raises(ValueError, match="node_name: a shared POS with a PSAM terminal per"):
        PaymentServer(config, [])

"""Seed 001 FIG. 3B over loopback: the customer gets a payment order number (PON) and a pick-up
secret at the merchant, sends the PON to the SP, the SP pays it with a pool purse through the
real payment server and bills it, and the merchant gives the goods to the customer directly.
The attacker's tests: replayed PONs, another customer's or merchant's PON, a forged merchant
answer, an amount above the signed maximum, bad bodies, racing requests for one PON, pick-up
with a wrong secret or before payment, a non-billable customer."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from svcard.host.demo.system import System, start_system
from svcard.host.pay.merchant import db as MD
from svcard.host.pay.merchant import pon as MP
from svcard.host.pay.merchant.server import DEFAULT_CATALOGUE, Item
from svcard.host.pay.stack import MerchantSite
from svcard.host.sp import db as D
from svcard.host.sp.customers import set_blocked
from svcard.host.sp.purses.pool import PursePoolConfig
from svcard.host.sp.server.pon import set_merchant_key
from svcard.host.sp.signing import new_key, signed_pon_order
from svcard.host.sp.stack import Customer, SpStack, demo_config, purse_images, start_sp

SHOP = "PONSHOP"
SHOP_ID = bytes.fromhex("504F4E53484F5031")
CLIENT = {"X-Svcard-Client": "1"}
ALBUM = Item("album", "An album (not in the SP's catalogue)", 500, "ALBUM-DOWNLOAD-42")


@dataclass
class Env:
    system: System
    site: MerchantSite
    sp: SpStack
    purses: list[Path]
    merchant_private: bytes
    merchant_public: bytes

    def balances(self) -> int:
        return sum(int(json.loads(p.read_text())["app"]["ep"]["balance"])
                   for p in self.purses)

    def merchant_paid(self) -> int:
        return int(self.site.server.db.counts().get(MD.PAID, 0))

    def pon_state(self, pon: str) -> str:
        with self.site.server.db.engine.connect() as conn:
            return str(conn.execute(select(MP.pons.c.state).where(
                MP.pons.c.pon == pon)).scalar_one())


def start_env(folder: Path) -> Env:
    system = start_system(folder / "sys")
    try:
        system.load.account("sp-bank", 1_000_000, "sp-pw")
        private, public = new_key()
        site = system.pay.add_merchant(SHOP_ID, pon=MP.PonSettings(private, SHOP),
                                       catalogue=(*DEFAULT_CATALOGUE, ALBUM))
        images = purse_images(folder / "purses", 2, ep=50_000)
        pool = PursePoolConfig(readers=[f"virtual:{p}" for p in images],
                               bank_url=system.load.bank_url, account="sp-bank",
                               secret="sp-pw", currency_code=156)
        config = demo_config(folder / "sp", system.pay.merchant.url,
                             merchants={SHOP: site.url}, purses=pool)
        sp = start_sp(config)
    except BaseException:
        system.close()
        raise
    set_merchant_key(sp.engine, SHOP, public, int(time.time() * 1000))
    assert site.server.config.pon is not None
    site.server.config.pon.sp_url = sp.url   # where the merchant sends its order copies
    return Env(system, site, sp, images, private, public)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = start_env(tmp_path_factory.mktemp("sp-pon"))
    yield e
    e.sp.close()
    e.system.close()


def make_pon(http: httpx.Client, env: Env, customer: str, sku: str = "song") -> dict[str, Any]:
    """The customer's tentative order at the merchant: its PON and pick-up secret."""
    answer = http.post(f"{env.site.url}/v1/pon", json={"sku": sku, "customer": customer},
                       headers=CLIENT)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def pon_order(http: httpx.Client, env: Env, who: Customer, pon: str, merchant: str = SHOP,
              **kwargs: Any) -> httpx.Response:
    body, headers = signed_pon_order(who.key, who.id, merchant, pon, **kwargs)
    return http.post(f"{env.sp.url}/v1/orders/pon", content=body, headers=headers)


def pickup(http: httpx.Client, env: Env, pon: str, secret: str) -> httpx.Response:
    return http.post(f"{env.site.url}/v1/pon/{pon}/pickup", json={"secret": secret})


def test_pon_is_paid_by_the_sp_billed_and_picked_up_at_the_merchant(
        env: Env, http: httpx.Client) -> None:
    alice = env.sp.customer("alice")
    made = make_pon(http, env, "alice")
    assert (made["amount"], made["merchant"]) == (99, SHOP)
    early = pickup(http, env, made["pon"], made["secret"])
    assert early.status_code == 402 and "not paid" in early.json()["reason"]
    before, paid_before = env.balances(), env.merchant_paid()
    answer = pon_order(http, env, alice, made["pon"], max_amount=125)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["state"] == "billed"
    # the SP relays no goods: the merchant gives them to the customer (FIG. 3B 344)
    assert made["pon"] in body["goods"] and "ALBUM" not in body["goods"]
    assert body["line"] == {"retail": 120, "wholesale": 99, "fee": 5, "discount": 10,
                            "billed": 115, "currency_code": 156}
    assert before - env.balances() == 99 and env.merchant_paid() == paid_before + 1
    assert env.pon_state(made["pon"]) == MP.PAID
    wrong = pickup(http, env, made["pon"], "0" * 64)
    assert wrong.status_code == 403 and "goods" not in wrong.json()
    goods = pickup(http, env, made["pon"], made["secret"])
    assert goods.status_code == 200, goods.text
    assert goods.json()["goods"] == DEFAULT_CATALOGUE[0].goods
    assert goods.json()["receipt"]["amount"] == 99
    with env.sp.engine.connect() as conn:
        claim = conn.execute(select(D.merchant_orders)).first()
    assert claim is not None and (claim.merchant_ref, claim.kind) == (made["pon"], "pon")


def test_an_item_the_sp_does_not_list_is_billed_at_the_merchants_amount(
        env: Env, http: httpx.Client) -> None:
    bea = env.sp.customer("bea")
    made = make_pon(http, env, "bea", "album")
    answer = pon_order(http, env, bea, made["pon"])
    assert answer.status_code == 200, answer.text
    assert answer.json()["line"] == {"retail": 500, "wholesale": 500, "fee": 5,
                                     "discount": 0, "billed": 505, "currency_code": 156}
    assert pickup(http, env, made["pon"], made["secret"]).json()["goods"] == ALBUM.goods


def test_a_pon_replayed_is_refused_with_nothing_paid_again(
        env: Env, http: httpx.Client) -> None:
    cleo = env.sp.customer("cleo")
    made = make_pon(http, env, "cleo")
    body, headers = signed_pon_order(cleo.key, cleo.id, SHOP, made["pon"])
    first = http.post(f"{env.sp.url}/v1/orders/pon", content=body, headers=headers)
    assert first.status_code == 200, first.text
    before, paid = env.balances(), env.merchant_paid()
    same = http.post(f"{env.sp.url}/v1/orders/pon", content=body, headers=headers)
    assert same.status_code == 409 and same.json()["order"] == first.json()["order"]
    other_key = pon_order(http, env, cleo, made["pon"])
    assert other_key.status_code == 409, other_key.text   # the merchant: paid already
    # a second checkout of the paid PON at the merchant: refused, no second card payment
    again = http.post(f"{env.site.url}/v1/pon/{made['pon']}/checkout", headers=CLIENT)
    assert again.status_code == 409
    assert (env.balances(), env.merchant_paid()) == (before, paid)


def test_the_sp_refuses_a_pon_it_has_already_claimed_even_if_the_merchant_says_unpaid(
        env: Env, http: httpx.Client) -> None:
    """The SP's own unique key, not only the merchant's word: (merchant, PON) paid once."""
    dora = env.sp.customer("dora")
    made = make_pon(http, env, "dora")
    assert pon_order(http, env, dora, made["pon"]).status_code == 200
    with env.site.server.db.engine.begin() as conn:   # a merchant that forgot it was paid
        conn.execute(update(MP.pons).where(MP.pons.c.pon == made["pon"]).values(
            state=MP.TENTATIVE))
    before = env.balances()
    again = pon_order(http, env, dora, made["pon"])
    assert again.status_code == 409 and again.json()["state"] == "taken", again.text
    assert env.balances() == before


def test_another_customers_or_merchants_pon_is_refused(env: Env, http: httpx.Client) -> None:
    env.sp.customer("erin")
    mallory = env.sp.customer("mallory")
    made = make_pon(http, env, "erin")
    before, paid = env.balances(), env.merchant_paid()
    stolen = pon_order(http, env, mallory, made["pon"])
    assert stolen.status_code == 403 and "another customer" in stolen.json()["reason"]
    no_key = pon_order(http, env, mallory, made["pon"], merchant="MERCH001")
    assert no_key.status_code == 403     # the SP holds no key of MERCH001: no PONs from it
    _, other_public = new_key()
    set_merchant_key(env.sp.engine, "MERCH001", other_public, 0)
    elsewhere = pon_order(http, env, mallory, made["pon"], merchant="MERCH001")
    assert elsewhere.status_code == 404, elsewhere.text   # MERCH001 knows no such PON
    unknown = pon_order(http, env, mallory, made["pon"], merchant="NOSHOP")
    assert unknown.status_code == 404
    assert (env.balances(), env.merchant_paid()) == (before, paid)
    assert env.pon_state(made["pon"]) == MP.TENTATIVE


def test_a_merchant_answer_not_signed_by_its_key_pays_nothing(
        env: Env, http: httpx.Client) -> None:
    fay = env.sp.customer("fay")
    made = make_pon(http, env, "fay")
    before = env.balances()
    _, impostor = new_key()
    set_merchant_key(env.sp.engine, SHOP, impostor, 0)   # the SP expects another key
    try:
        forged = pon_order(http, env, fay, made["pon"])
    finally:
        set_merchant_key(env.sp.engine, SHOP, env.merchant_public, 0)
    assert forged.status_code == 502 and "signed" in forged.json()["reason"]
    assert env.balances() == before and env.pon_state(made["pon"]) == MP.TENTATIVE
    with env.sp.engine.connect() as conn:
        assert conn.execute(select(D.orders).where(D.orders.c.customer == "fay")).first() \
            is None
    assert pon_order(http, env, fay, made["pon"]).status_code == 200   # the real one pays


def test_an_amount_above_the_signed_maximum_is_refused_and_the_pon_stays_payable(
        env: Env, http: httpx.Client) -> None:
    gus = env.sp.customer("gus")
    made = make_pon(http, env, "gus")
    before = env.balances()
    over = pon_order(http, env, gus, made["pon"], max_amount=124)   # billed up to 125
    assert over.status_code == 402 and over.json()["kind"] == "over_max", over.text
    assert env.balances() == before and env.pon_state(made["pon"]) == MP.TENTATIVE
    assert pon_order(http, env, gus, made["pon"], max_amount=125).status_code == 200


def test_a_non_billable_customer_pays_nothing(env: Env, http: httpx.Client) -> None:
    env.sp.customer("hal")
    hal = env.sp.customer("hal2")
    set_blocked(env.sp.engine, "hal2", True, "unpaid bills")
    made = make_pon(http, env, "hal2")
    before, paid = env.balances(), env.merchant_paid()
    answer = pon_order(http, env, hal, made["pon"])
    assert answer.status_code == 402 and answer.json()["kind"] == "blocked"
    assert (env.balances(), env.merchant_paid()) == (before, paid)
    assert env.pon_state(made["pon"]) == MP.TENTATIVE


def test_truncated_oversized_and_malformed_bodies_are_refused(
        env: Env, http: httpx.Client) -> None:
    ivy = env.sp.customer("ivy")
    made = make_pon(http, env, "ivy")
    before = env.balances()
    url = f"{env.sp.url}/v1/orders/pon"
    body, headers = signed_pon_order(ivy.key, ivy.id, SHOP, made["pon"])
    assert http.post(url, content=body[:-7], headers=headers).status_code == 400
    assert http.post(url, content=body + b" " * 3000, headers=headers).status_code == 413
    bad_pon, h2 = signed_pon_order(ivy.key, ivy.id, SHOP, "XYZ")
    assert http.post(url, content=bad_pon, headers=h2).status_code == 400
    bad_max, h3 = signed_pon_order(ivy.key, ivy.id, SHOP, made["pon"], max_amount=-1)
    assert http.post(url, content=bad_max, headers=h3).status_code == 400
    changed = body.replace(b'"max_amount":null', b'"max_amount":99999')
    assert http.post(url, content=changed, headers=headers).status_code == 401
    stale, h4 = signed_pon_order(ivy.key, ivy.id, SHOP, made["pon"],
                                 created=int(time.time()) - 1000)
    assert http.post(url, content=stale, headers=h4).status_code == 401
    m = env.site.url
    assert http.post(f"{m}/v1/pon", content=b"x" * 600, headers=CLIENT).status_code == 413
    assert http.post(f"{m}/v1/pon", json={"sku": "song"}, headers=CLIENT).status_code == 400
    assert http.post(f"{m}/v1/pon", json={"sku": "song", "customer": "ivy"}).status_code == 403
    assert http.post(f"{m}/v1/pon/{made['pon']}/pickup",
                     content=b"{" * 600).status_code == 413
    assert http.get(f"{m}/v1/pon/{made['pon']}").status_code == 400   # no nonce
    assert env.balances() == before and env.pon_state(made["pon"]) == MP.TENTATIVE


def test_concurrent_requests_for_one_pon_pay_exactly_once(
        env: Env, http: httpx.Client) -> None:
    jo = env.sp.customer("jo")
    made = make_pon(http, env, "jo")
    before, paid = env.balances(), env.merchant_paid()

    def one(_i: int) -> int:
        with httpx.Client(timeout=60) as own:
            return pon_order(own, env, jo, made["pon"]).status_code

    with cf.ThreadPoolExecutor(6) as pool:
        codes = sorted(pool.map(one, range(6)))
    assert codes == [200] + [409] * 5, codes
    assert before - env.balances() == 99 and env.merchant_paid() == paid + 1
    with env.sp.engine.connect() as conn:
        paying = conn.execute(select(D.orders.c.state).where(
            D.orders.c.customer == "jo")).scalars().all()
    assert paying == ["billed"]


def test_an_expired_pon_is_refused(env: Env, http: httpx.Client) -> None:
    kai = env.sp.customer("kai")
    made = make_pon(http, env, "kai")
    with env.site.server.db.engine.begin() as conn:
        conn.execute(update(MP.pons).where(MP.pons.c.pon == made["pon"]).values(expires=1))
    before = env.balances()
    assert pon_order(http, env, kai, made["pon"]).status_code == 410
    assert http.post(f"{env.site.url}/v1/pon/{made['pon']}/checkout",
                     headers=CLIENT).status_code == 410
    assert env.balances() == before


def test_a_pon_releases_once_at_the_merchant_whatever_the_payments(env: Env) -> None:
    """Two checkouts of one PON (a payer trying twice): the first confirmation moves the order
    and the PON in one step; the second payment's release is refused and changes nothing."""
    desk = env.site.server.pons
    assert desk is not None
    db = env.site.server.db
    now = int(time.time() * 1000)
    row, _secret = desk._new_pon("song", "lee", now)
    assert desk._insert(row, now)
    txns = []
    for _ in range(2):
        _params, order = env.site.server.new_order("song", "fig6")
        order["client_address"] = "test"
        assert desk._link(row["pon"], order["txn_id"], now) == "ok"
        assert db.create(order, 10_000, 10_000) == "ok"
        txns.append(order["txn_id"])
    assert desk.release(txns[0], MD.PAID, "{}", now, "d1")
    assert not desk.release(txns[1], MD.PAID, "{}", now, "d2")
    assert db.get(txns[1])["state"] == MD.OPEN        # type: ignore[index]
    assert env.pon_state(row["pon"]) == MP.PAID
    assert desk._link(row["pon"], "ab" * 16, now) == "paid"


def test_the_cli_sets_a_merchant_key_and_sends_a_pon(env: Env, http: httpx.Client,
                                                     tmp_path: Path) -> None:
    from click.testing import CliRunner

    from svcard.host.cli.main import main
    from svcard.host.kit.command_line import EXIT_INPUT
    from svcard.host.sp.server.pon import merchant_key
    from svcard.host.sp.signing import write_private_key

    def run(*args: str) -> Any:
        return CliRunner().invoke(main, list(args), prog_name="svcard")

    db = f"sqlite:///{tmp_path / 'keys.db'}"
    bad = run("sp", "merchant-key", SHOP, "--public-key", "12ab", "--db", db)
    assert bad.exit_code == EXIT_INPUT and "--public-key" in bad.output
    done = run("sp", "merchant-key", SHOP, "--public-key", env.merchant_public.hex(),
               "--db", db, "--json")
    assert done.exit_code == 0, done.output
    from svcard.host.sp import db as SD
    engine = SD.make_engine(db)
    assert merchant_key(engine, SHOP) == env.merchant_public
    engine.dispose()
    lou = env.sp.customer("lou")
    key_file = tmp_path / "lou.key"
    write_private_key(key_file, lou.key)
    made = make_pon(http, env, "lou")
    wrong = run("sp", "pon", env.sp.url, "--customer", "lou", "--key", str(key_file),
                "--merchant", SHOP, "--pon", "NOTAPON")
    assert wrong.exit_code == EXIT_INPUT and "--pon" in wrong.output
    paid = run("sp", "pon", env.sp.url, "--customer", "lou", "--key", str(key_file),
               "--merchant", SHOP, "--pon", made["pon"], "--max-amount", "125", "--json")
    assert paid.exit_code == 0, paid.output
    assert json.loads(paid.output)["state"] == "billed"
    again = run("sp", "pon", env.sp.url, "--customer", "lou", "--key", str(key_file),
                "--merchant", SHOP, "--pon", made["pon"], "--max-amount", "125")
    assert again.exit_code != 0 and "refused (409)" in again.output


def check_pon_admissions(url: str, threads: int = 12) -> None:
    """``threads`` orders for one PON at once, straight at the admitting step: exactly one is
    admitted; once its order failed (nothing paid), the next one takes the PON over."""
    import threading

    from svcard.host.sp.config import Item as SpItem
    from svcard.host.sp.customers import add_customer
    from svcard.host.sp.server import pon as SP

    engine = D.make_engine(url)
    try:
        add_customer(engine, "nia", new_key()[1], 100_000, 156)
        item = SpItem(SHOP, "song", "song", 120, 99, 5, 50, "http://m/v1/pon/x/checkout", 99)
        pon = "cd" * 16
        barrier = threading.Barrier(threads)

        def one(i: int) -> Any:
            barrier.wait()
            return SP.admit(engine, "nia", f"{i:032x}", item, pon, "pon", "d", 156, 1, None)

        with cf.ThreadPoolExecutor(threads) as ex:
            results = list(ex.map(one, range(threads)))
        states = sorted(r.state for r in results)
        assert states == ["paying"] + [SP.TAKEN] * (threads - 1), states
        [winner] = [r.order_ref for r in results if r.state == "paying"]
        assert {r.order_ref for r in results if r.state == SP.TAKEN} == {winner}
        with engine.begin() as conn:
            conn.execute(update(D.orders).where(D.orders.c.order_ref == winner).values(
                state=D.FAILED))
        barrier = threading.Barrier(threads)   # the take-over raced too

        def retake(i: int) -> Any:
            barrier.wait()
            return SP.admit(engine, "nia", f"{i + 1000:032x}", item, pon, "pon", "d", 156, 2,
                            None)

        with cf.ThreadPoolExecutor(threads) as ex:
            retaken = list(ex.map(retake, range(threads)))
        assert sorted(r.state for r in retaken) == ["paying"] + [SP.TAKEN] * (threads - 1)
        [again] = [r for r in retaken if r.state == "paying"]
        assert again.order_ref != winner
        with engine.connect() as conn:
            holder = conn.execute(select(D.merchant_orders.c.order_ref)).scalar_one()
        assert holder == again.order_ref
    finally:
        engine.dispose()


def test_one_pon_is_admitted_once_when_raced_sqlite(tmp_path: Path) -> None:
    check_pon_admissions(f"sqlite:///{tmp_path / 'race.db'}")


def test_one_pon_is_admitted_once_when_raced_postgresql() -> None:
    from pg_env import start_cluster

    cluster = start_cluster()
    try:
        check_pon_admissions(cluster.new_database(), threads=16)
    finally:
        cluster.stop()


class LosesTheAnswer:
    """The pool pays, then the SP loses the answer (as if it died after the card's debit)."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def pay(self, *args: Any, **kwargs: Any) -> Any:
        self.real.pay(*args, **kwargs)
        raise ConnectionError("the answer was lost after the card paid")


def test_a_pon_paid_whose_answer_was_lost_is_billed_once_by_recovery(
        env: Env, http: httpx.Client) -> None:
    from svcard.host.sp.signing import signed_lookup

    mo = env.sp.customer("mo")
    made = make_pon(http, env, "mo")
    before, paid = env.balances(), env.merchant_paid()
    real = env.sp.server.payer
    env.sp.server.payer = LosesTheAnswer(real)
    try:
        body, headers = signed_pon_order(mo.key, mo.id, SHOP, made["pon"])
        lost = http.post(f"{env.sp.url}/v1/orders/pon", content=body, headers=headers)
    finally:
        env.sp.server.payer = real
    assert lost.status_code == 502 and lost.json()["state"] == "in_doubt", lost.text
    assert pon_order(http, env, mo, made["pon"]).status_code == 409   # still held: no 2nd
    done = env.sp.server.recover()
    assert done["paid"] >= 1 and done["billed"] >= 1, done
    assert before - env.balances() == 99 and env.merchant_paid() == paid + 1
    key = json.loads(body)["order_key"]
    look_body, look_headers = signed_lookup(mo.key, mo.id, key)
    looked = http.post(f"{env.sp.url}/v1/orders/lookup", content=look_body,
                       headers=look_headers).json()
    assert looked["state"] == "billed" and looked["line"]["billed"] == 115
    assert pickup(http, env, made["pon"], made["secret"]).json()["goods"] == \
        DEFAULT_CATALOGUE[0].goods


class NeverPays:
    def pay(self, *_a: Any, **_k: Any) -> Any:
        raise AssertionError("a bad merchant answer reached the payment")


def test_a_signed_but_malformed_merchant_answer_pays_nothing(tmp_path: Path,
                                                             http: httpx.Client) -> None:
    """A merchant with a valid key that answers nonsense (a bug, or a merchant gone bad):
    every answer is refused with a reason, never a 5xx of the SP's own, nothing paid."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from svcard.host.kit.serving import ServerThread
    from svcard.host.sp.signing import MERCHANT_HEADER, MERCHANT_PON_DOMAIN, sign

    private, public = new_key()
    answers: list[Any] = []

    async def quote(request: Request) -> Response:
        change = answers[0]
        fields = {"merchant": "FAKE", "pon": request.path_params["pon"], "sku": "song",
                  "item": "x", "amount": 99, "currency_code": 156, "customer": "oz",
                  "state": "tentative", "expires": int(time.time()) + 600,
                  "nonce": request.query_params["nonce"]}
        body = change(fields) if callable(change) else change
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        return Response(body, headers={MERCHANT_HEADER: sign(private, body,
                                                             MERCHANT_PON_DOMAIN)})

    fake = ServerThread(Starlette(routes=[Route("/v1/pon/{pon}", quote)])).start()
    sp = start_sp(demo_config(tmp_path / "sp", "http://127.0.0.1:9",
                              merchants={"FAKE": fake.url}), NeverPays())
    try:
        set_merchant_key(sp.engine, "FAKE", public, 0)
        oz = sp.customer("oz")
        cases: list[tuple[Any, int]] = [
            (lambda f: {**f, "expires": "soon"}, 502),
            (lambda f: {**f, "nonce": "00" * 16}, 502),
            (lambda f: {**f, "extra": 1}, 502),
            (lambda f: [f], 502),
            (b"{not json", 502),
            (b"[" * 5000, 502),
            (lambda f: {**f, "state": "paid"}, 409),
            (lambda f: {**f, "expires": 5}, 410),
            (lambda f: {**f, "customer": "someone"}, 403),
            (lambda f: {**f, "customer": 7}, 502),
            (lambda f: {**f, "amount": 0}, 502),
            (lambda f: {**f, "amount": 2**40}, 502),
            (lambda f: {**f, "amount": "99"}, 502),
            (lambda f: {**f, "sku": "../x"}, 502),
            (lambda f: {**f, "currency_code": 840}, 409),
        ]
        for change, status in cases:
            answers[:] = [change]
            body, headers = signed_pon_order(oz.key, "oz", "FAKE", "ef" * 16)
            got = http.post(f"{sp.url}/v1/orders/pon", content=body, headers=headers)
            assert got.status_code == status, (change, got.text)
            assert got.json()["reason"]
        with sp.engine.connect() as conn:
            assert conn.execute(select(D.merchant_orders)).first() is None
    finally:
        sp.close()
        fake.stop()


def test_open_pons_are_bounded_per_client_address(env: Env) -> None:
    desk = env.site.server.pons
    assert desk is not None
    config = env.site.server.config
    saved = config.max_open_per_client
    now = int(time.time() * 1000)
    config.max_open_per_client = 3
    try:
        made = [desk._insert(desk._new_pon("song", "flood", now, "10.9.9.9")[0], now)
                for _ in range(5)]
        other = desk._insert(desk._new_pon("song", "fair", now, "10.9.9.8")[0], now)
    finally:
        config.max_open_per_client = saved
    assert made == [True, True, True, False, False] and other
    later = now + 2 * 3600 * 1000   # expired PONs no longer count
    config.max_open_per_client = 3
    try:
        assert desk._insert(desk._new_pon("song", "flood", later, "10.9.9.9")[0], later)
    finally:
        config.max_open_per_client = saved


def test_tentative_pons_no_payment_can_reach_are_swept_paid_ones_kept(env: Env) -> None:
    desk = env.site.server.pons
    assert desk is not None
    now = int(time.time() * 1000)
    long_ago = now - 10 * 3600 * 1000          # expired 9 hours ago (lifetime 1 hour)
    old, _ = desk._new_pon("song", "old", long_ago, "10.1.1.1")
    kept, _ = desk._new_pon("song", "old", long_ago, "10.1.1.1")
    assert desk._insert(old, long_ago) and desk._insert(kept, long_ago)
    assert desk._link(old["pon"], "aa" * 16, long_ago) == "ok"
    with env.site.server.db.engine.begin() as conn:
        conn.execute(update(MP.pons).where(MP.pons.c.pon == kept["pon"]).values(
            state=MP.PAID))
    fresh, _ = desk._new_pon("song", "new", now, "10.1.1.1")
    assert desk._insert(fresh, now)
    with env.site.server.db.engine.connect() as conn:
        left = set(conn.execute(select(MP.pons.c.pon)).scalars())
        links = set(conn.execute(select(MP.pon_txns.c.txn_id)).scalars())
    assert old["pon"] not in left and {kept["pon"], fresh["pon"]} <= left
    assert "aa" * 16 not in links

"""FIG. 4 as a fair exchange (issue 15 point 6, review R-trade2): a product bought with
``buyer.buy_product`` sends the merchant the signed order but not the PayWord link; the link
travels inside the customer's signed acceptance to the trusted party, which releases K2 (to
the customer) and the link (to the merchant) in ONE step. The customer reaches the trusted
party directly (its URL signed in ``opened``), so a merchant that keeps the answer does not
keep K2. The attacker's tests: a merchant claiming the link without a release, a customer
asking for K2 without paying, replayed and raced acceptances, a crash after the release."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from svcard.host.kit.db import first_row
from svcard.host.kit.http import Refused
from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade import signing as S
from svcard.host.trade.payword import link_at
from svcard.host.trade.stack import TradeStack, start_trade
from svcard.host.trade.trust import buyer, party, shop
from svcard.host.trade.trust import delivery as V

SONG = b"la la la, three minutes of it " * 300


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[TradeStack]:
    s = start_trade(tmp_path / "trade", merchants={"shop": "JPY"})
    (tmp_path / "song.bin").write_bytes(SONG)
    s.merchants["shop"].config.products = {
        "song": (tmp_path / "song.bin", "Song 7, three minutes, 44.1 kHz")}
    yield s
    s.close()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def held(stack: TradeStack, s: C.Session) -> int:
    row = first_row(stack.merchants["shop"].engine, D.ma_sessions, session=s.session)
    assert row is not None
    return int(row["held_index"])


def count(engine: Any, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def opened(stack: TradeStack, http: httpx.Client, who: str = "alice") -> C.Session:
    return stack.open(http, stack.customer(who, 50_00), 2_00, merchant="shop", unit=10)


def offer_and_acceptance(http: httpx.Client, s: C.Session, link: bytes | None = None
                         ) -> tuple[V.Offer, bytes, bytes, str]:
    """The pending product's offer, an acceptance paying it (``link``: the one given, else
    the right one), its K1 private half and the order digest."""
    index = s.pending["index"]
    got = http.get(f"{s.merchant_url}/v1/sessions/{s.session}/purchases/{index}/offer",
                   params={"pseudonym": s.pseudonym})
    assert got.status_code == 200, got.text
    d = got.json()
    offer = V.Offer(d["description"].encode(), d["signature"],
                    base64.b64decode(d["ciphertext"]))
    k1, k1_pub = V.new_exchange_key()
    pay = link_at(s.seed, s.length, index) if link is None else link
    acceptance = V.accept(s.session_key, offer, k1_pub, int(time.time()), pay)
    return offer, acceptance, k1, json.loads(offer.description)["order"]


def to_party(http: httpx.Client, s: C.Session, order: str, acceptance: bytes
             ) -> httpx.Response:
    return http.post(f"{s.opened['acquirer_url']}/v1/deliveries/release",
                     content=S.canonical({"session": s.session, "order": order,
                                          "acceptance": acceptance.decode()}))


def test_the_product_is_paid_by_its_release_and_cleared(stack: TradeStack,
                                                        http: httpx.Client) -> None:
    s = opened(stack, http)
    C.buy(http, s, "tea", 1)                       # an ordinary purchase: paid at once
    got = buyer.buy_product(http, s, "song", 2)
    assert got["state"] == shop.PENDING and got["index"] == 3
    assert held(stack, s) == 1 and s.spent == 1 and s.pending["index"] == 3
    # nothing else is taken while the product waits (a later link would pay it): the
    # library refuses, and so does the merchant
    with pytest.raises(C.TradeError, match="awaits"):
        C.buy(http, s, "tea", 1)
    other = C.Session.from_json({**s.to_json(), "pending": {}})
    with pytest.raises(C.TradeError, match="409"):
        C.buy(http, other, "tea", 2)
    assert held(stack, s) == 1 and s.spent == 1
    with pytest.raises(C.TradeError, match="awaits"):
        buyer.buy_product(http, s, "song", 1)
    delivered = buyer.fetch(http, s)
    assert delivered.plaintext == SONG and delivered.index == 3
    assert held(stack, s) == 3 and s.spent == 3 and not s.pending
    a = stack.merchants["shop"].engine
    bought = first_row(a, D.ma_purchases, session=s.session, link_index=3)
    assert bought is not None and bought["link"] == link_at(s.seed, s.length, 3).hex()
    assert count(a, D.ma_pending) == 0
    link = first_row(stack.acquirer.engine, D.acq_links, session=s.session)
    assert link is not None and link["link"] == bought["link"]
    c = C.close(http, s)["clearing"]
    assert c["outcome"] == "agreed" and c["paid"] == 30, c


def test_a_merchant_cannot_take_the_products_link_without_a_release(
        stack: TradeStack, http: httpx.Client) -> None:
    s = opened(stack, http)
    C.buy(http, s, "tea", 1)
    buyer.buy_product(http, s, "song", 2)
    _offer, acceptance, _, order = offer_and_acceptance(http, s)
    m = stack.merchants["shop"]
    # it asks the trusted party for the link: nothing released, nothing given
    body, headers = S.signed(m.config.private_key, "shop", party.LINK_ASK, {
        "session": s.session, "order": order, "created": int(time.time()),
        "close": False})
    ask = http.post(f"{s.opened['acquirer_url']}/v1/deliveries/link", content=body,
                    headers=headers)
    assert ask.status_code == 409
    # a link it made up does not move its held link (hashes only)
    assert shop.apply_link(m.engine, s.session, 3, "ab" * 32, m.now_ms()) is None
    # the link already paid (index 1) is no payment for the product either
    assert shop.apply_link(m.engine, s.session, 3, link_at(s.seed, s.length, 1).hex(),
                           m.now_ms()) is None
    assert held(stack, s) == 1
    # asking as another party (the customer's session key is no merchant's)
    body, headers = S.signed(s.session_key, "shop", party.LINK_ASK, {
        "session": s.session, "order": order, "created": int(time.time()),
        "close": False})
    assert http.post(f"{s.opened['acquirer_url']}/v1/deliveries/link", content=body,
                     headers=headers).status_code == 401
    # the customer walks away: the session clears paying only the tea
    c = C.close(http, s)["clearing"]
    assert c["paid"] == 10 and c["outcome"] == "agreed", c
    # and after clearing the acceptance no longer releases K2 (nothing could pay for it)
    assert to_party(http, s, order, acceptance).status_code == 409


def test_no_k2_after_the_merchant_ended_without_it(stack: TradeStack,
                                                   http: httpx.Client) -> None:
    """The customer terminates (the merchant's record is made without the unpaid product),
    then accepts at the trusted party before clearing: the merchant's terminate closed the
    order there in ONE step, so K2 never goes out for a link the record does not hold."""
    s = opened(stack, http)
    C.buy(http, s, "tea", 1)
    buyer.buy_product(http, s, "song", 2)
    _, acceptance, _, order = offer_and_acceptance(http, s)
    C.terminate(http, s)
    got = to_party(http, s, order, acceptance)
    assert got.status_code == 409 and "closed" in got.json()["reason"]
    row = first_row(stack.acquirer.engine, D.acq_deliveries, session=s.session)
    assert row is not None and row["answer"] is None
    assert held(stack, s) == 1
    c = C.close(http, s)["clearing"]
    assert c["paid"] == 10 and c["outcome"] == "agreed", c


def test_terminate_waits_for_the_party_to_close_the_order(
        stack: TradeStack, http: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the trusted party out of reach the merchant cannot close the unpaid order, so it
    does not end the session (503, nothing changed); asked again, it does."""
    s = opened(stack, http)
    buyer.buy_product(http, s, "song", 1)
    offer_and_acceptance(http, s)                  # lodged
    m = stack.merchants["shop"]

    async def down(path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        raise Refused(503, 503, "the trusted party did not answer; ask again")
    monkeypatch.setattr(m.shop, "_post", down)
    with pytest.raises(C.TradeError, match="503"):
        C.terminate(http, s)
    row = first_row(m.engine, D.ma_sessions, session=s.session)
    assert row is not None and row["state"] == D.OPEN
    monkeypatch.undo()
    assert C.terminate(http, s)["state"] == D.TERMINATED
    _, acceptance, _, order = offer_and_acceptance(http, s)
    assert to_party(http, s, order, acceptance).status_code == 409   # closed there


def test_a_link_released_before_expiry_reaches_the_merchants_record(
        stack: TradeStack, http: httpx.Client) -> None:
    """Accepted at the party directly; the session then ends at its expiry: the merchant's
    end collects the released link first, so its record holds it. After expiry nothing
    more is released."""
    s = opened(stack, http)
    buyer.buy_product(http, s, "song", 2)
    _offer, acceptance, _, order = offer_and_acceptance(http, s)
    assert to_party(http, s, order, acceptance).status_code == 200
    assert held(stack, s) == 0
    m = stack.merchants["shop"]
    got = asyncio.run(m.shop.collect(s.session, close=True))
    assert got == 1 and held(stack, s) == 2


def test_no_k2_without_the_link(stack: TradeStack, http: httpx.Client) -> None:
    s = opened(stack, http)
    C.buy(http, s, "tea", 1)
    buyer.buy_product(http, s, "song", 2)
    for wrong in (b"", link_at(s.seed, s.length, 1), link_at(s.seed, s.length, 2),
                  link_at(s.seed, s.length, 4), bytes(32)):
        _, acceptance, _, order = offer_and_acceptance(http, s, wrong)
        got = to_party(http, s, order, acceptance)
        assert got.status_code in (400, 402), (wrong.hex(), got.text)
        assert first_row(stack.acquirer.engine, D.acq_deliveries,
                         session=s.session)["accepted"] is None
    assert held(stack, s) == 1
    # the honest one releases both
    offer, acceptance, k1, order = offer_and_acceptance(http, s)
    got = to_party(http, s, order, acceptance)
    assert got.status_code == 200 and got.json()["link"] == link_at(s.seed, s.length, 3).hex()
    assert V.decrypt(offer, V.open_key(k1, bytes.fromhex(got.json()["sealed"]), acceptance,
                                       offer)) == SONG


def test_a_replayed_acceptance_pays_once(stack: TradeStack, http: httpx.Client) -> None:
    s = opened(stack, http)
    buyer.buy_product(http, s, "song", 2)
    _offer, acceptance, _, order = offer_and_acceptance(http, s)
    url = f"{s.merchant_url}/v1/sessions/{s.session}/purchases/2/accept"
    first = http.post(url, content=acceptance)
    assert first.status_code == 200 and held(stack, s) == 2
    for _ in range(3):      # replayed to the merchant and to the party: the same answer
        assert http.post(url, content=acceptance).content == first.content
        again = to_party(http, s, order, acceptance)
        assert again.status_code == 200 and again.json()["sealed"] == first.json()["sealed"]
    m = stack.merchants["shop"]
    assert count(m.engine, D.ma_purchases) == 1 and held(stack, s) == 2
    assert shop.apply_link(m.engine, s.session, 2, link_at(s.seed, s.length, 2).hex(),
                           m.now_ms()) is None          # applied once: nothing pending
    # another acceptance of the order: refused, nothing moves
    _, other, _, _ = offer_and_acceptance(http, s)
    assert http.post(url, content=other).status_code == 409
    assert to_party(http, s, order, other).status_code == 409


def test_raced_acceptances_release_and_pay_once(stack: TradeStack,
                                                http: httpx.Client) -> None:
    s = opened(stack, http)
    buyer.buy_product(http, s, "song", 1)
    made = [offer_and_acceptance(http, s) for _ in range(8)]
    url = f"{s.merchant_url}/v1/sessions/{s.session}/purchases/1/accept"
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def send(i: int) -> None:
        with httpx.Client(timeout=30) as c:
            _, acceptance, _, order = made[i]
            got = c.post(url, content=acceptance) if i % 2 else \
                to_party(c, s, order, acceptance)
        with lock:
            answers.append(got)
    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    ok = [a for a in answers if a.status_code == 200]
    assert len(ok) == 1 and all(a.status_code == 409 for a in answers if a not in ok)
    if not held(stack, s):                  # released at the party: the merchant collects
        http.post(f"{s.merchant_url}/v1/sessions/{s.session}/collect")
    assert held(stack, s) == 1 and count(stack.merchants["shop"].engine, D.ma_purchases) == 1


def test_a_merchant_that_drops_the_answer_does_not_keep_k2(
        stack: TradeStack, http: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    s = opened(stack, http)
    C.buy(http, s, "tea", 1)
    buyer.buy_product(http, s, "song", 1)
    real_post = httpx.Client.post

    def dropping(self: httpx.Client, url: Any, *args: Any, **kwargs: Any) -> httpx.Response:
        if str(url).endswith("/accept"):       # the merchant keeps the acceptance
            real_post(self, url, *args, **kwargs)
            return httpx.Response(502, json={"reason": "try later"})
        return real_post(self, url, *args, **kwargs)
    monkeypatch.setattr(httpx.Client, "post", dropping)
    got = buyer.fetch(http, s)
    assert got.plaintext == SONG and s.spent == 2
    # a merchant that never relays at all: the customer goes to the party alone
    buyer.buy_product(http, s, "song", 1)

    def silent(self: httpx.Client, url: Any, *args: Any, **kwargs: Any) -> httpx.Response:
        if str(url).endswith("/accept"):
            raise httpx.ReadTimeout("the merchant never answers")
        return real_post(self, url, *args, **kwargs)
    monkeypatch.setattr(httpx.Client, "post", silent)
    got = buyer.fetch(http, s)
    assert got.plaintext == SONG and s.spent == 3
    monkeypatch.setattr(httpx.Client, "post", real_post)
    assert held(stack, s) == 2                 # the second link is at the party, not here
    c = C.close(http, s)["clearing"]           # terminate collects it: the records agree
    assert c["outcome"] == "agreed" and c["paid"] == 30, c
    assert held(stack, s) == 3


def test_the_party_stopped_after_the_release_step(stack: TradeStack,
                                                  http: httpx.Client) -> None:
    """The release's step committed and the party stopped before answering anyone (as if
    SIGKILLed there): both sides still get what the step gave, from its database."""
    s = opened(stack, http)
    buyer.buy_product(http, s, "song", 2)
    _offer, acceptance, _k1, order = offer_and_acceptance(http, s)
    body = json.loads(acceptance)["acceptance"]
    stored = party.release(stack.acquirer.engine, s.session, order, body["unique"],
                           acceptance.decode(), "00" * 92, stack.acquirer.now_ms(),
                           body["link"])
    assert stored == "00" * 92 and held(stack, s) == 0
    # the merchant fetches the link from the party (its terminate or collect does)
    assert http.post(f"{s.merchant_url}/v1/sessions/{s.session}/collect"
                     ).json()["collected"] == 1
    assert held(stack, s) == 2
    # the same acceptance again gets the stored answer, byte for byte
    again = to_party(http, s, order, acceptance)
    assert again.status_code == 200 and again.json()["sealed"] == "00" * 92
    assert again.json()["link"] == link_at(s.seed, s.length, 2).hex()


def test_on_the_command_line(stack: TradeStack, http: httpx.Client, tmp_path: Path) -> None:
    """``svcard session product-buy`` orders without the link (the session file keeps the
    pending order: ``buy`` refuses meanwhile); ``svcard session product`` accepts, opens the
    product and saves the session with the product paid."""
    from click.testing import CliRunner

    from svcard.host.cli.main import main as svcard_main
    s = opened(stack, http)
    state = tmp_path / "session.json"
    C.save(state, s)
    run = CliRunner()
    r = run.invoke(svcard_main, ["session", "product-buy", "song", "--units", "2",
                                 "--state", str(state), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["state"] == shop.PENDING, r.output
    assert C.load(state).pending["index"] == 2 and held(stack, s) == 0
    r = run.invoke(svcard_main, ["session", "buy", "tea", "--state", str(state)])
    assert r.exit_code == 1 and "awaits" in r.output, r.output
    out = tmp_path / "song.out"
    r = run.invoke(svcard_main, ["session", "product", "--state", str(state), "--out",
                                 str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == SONG and held(stack, s) == 2
    after = C.load(state)
    assert not after.pending and after.spent == 2 and after.orders[-1]["item"] == "song"
    r = run.invoke(svcard_main, ["session", "buy", "tea", "--state", str(state)])
    assert r.exit_code == 0 and held(stack, s) == 3, r.output


def test_no_release_after_the_sessions_expiry(stack: TradeStack, http: httpx.Client) -> None:
    """The agent ends a session at its expiry without asking the customer: a link released
    after that could reach no record, so the release step refuses it (and K2 stays)."""
    s = opened(stack, http)
    buyer.buy_product(http, s, "song", 1)
    _, acceptance, _, order = offer_and_acceptance(http, s)
    body = json.loads(acceptance)["acceptance"]
    with pytest.raises(Refused) as got:
        party.release(stack.acquirer.engine, s.session, order, body["unique"],
                      acceptance.decode(), "00" * 92, s.expires + 1, body["link"])
    assert got.value.status == 409 and "ended" in got.value.reason
    row = first_row(stack.acquirer.engine, D.acq_deliveries, session=s.session)
    assert row is not None and row["answer"] is None
    # before the expiry the same acceptance releases
    assert party.release(stack.acquirer.engine, s.session, order, body["unique"],
                         acceptance.decode(), "00" * 92, s.expires - 1, body["link"]) \
        == "00" * 92

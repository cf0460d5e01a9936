"""FIG. 4 secure delivery carried by the trading-session servers (issue 15 point 6): the
merchant agent offers the product under K2 with a signed description, lodges K2 with the
trusted party (the mediating agent, its state in the acquirer's database), and the customer's
signed acceptance releases K2 sealed to the customer's K1; a dispute package is judged with
public keys only. The attacker's tests: forged, replayed, raced, aimed at another order or by
the wrong party."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, update

from svcard.host.cli.main import main as svcard_main
from svcard.host.kit.db import first_row
from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade import messages as M
from svcard.host.trade import signing as S
from svcard.host.trade.money import Amount
from svcard.host.trade.stack import Customer, TradeStack, start_trade
from svcard.host.trade.trust import buyer, party
from svcard.host.trade.trust import delivery as V

SONG = b"la la la, three minutes of it " * 300
FILM = b"a short film " * 1000


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[TradeStack]:
    s = start_trade(tmp_path / "trade", merchants={"shop": "JPY", "kiosk": "KWD"})
    (tmp_path / "song.bin").write_bytes(SONG)
    (tmp_path / "film.bin").write_bytes(FILM)
    s.merchants["shop"].config.products = {
        "song": (tmp_path / "song.bin", "Song 7, three minutes, 44.1 kHz"),
        "film": (tmp_path / "film.bin", "A short film")}
    s.merchants["kiosk"].config.products = {"song": (tmp_path / "song.bin", "A song")}
    yield s
    s.close()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def count(engine: Any, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def opened(stack: TradeStack, http: httpx.Client, who: str = "alice",
           merchant: str = "shop") -> tuple[Customer, C.Session]:
    c = stack.customer(who, 50_00)
    return c, stack.open(http, c, 2_00, merchant=merchant, unit=10)


def offer_of(http: httpx.Client, s: C.Session, index: int) -> tuple[V.Offer, bytes]:
    """The offer for purchase ``index`` and the customer's signed order it names."""
    got = http.get(f"{s.merchant_url}/v1/sessions/{s.session}/purchases/{index}/offer",
                   params={"pseudonym": s.pseudonym})
    assert got.status_code == 200, got.text
    data = got.json()
    entry = next(e for e in s.orders if e["index"] == index)
    order = S.canonical({"session": s.session, "index": index, "item": entry["item"],
                         "units": entry["units"]})
    return (V.Offer(data["description"].encode(), data["signature"],
                    base64.b64decode(data["ciphertext"])),
            V.signed_order(order, entry["signature"]))


def accept_url(s: C.Session, index: int) -> str:
    return f"{s.merchant_url}/v1/sessions/{s.session}/purchases/{index}/accept"


def test_a_product_delivered_through_the_servers(stack: TradeStack, http: httpx.Client,
                                                 tmp_path: Path) -> None:
    _, s = opened(stack, http)
    C.buy(http, s, "tea", 1)                   # not a digital product
    C.buy(http, s, "song", 2)
    got = buyer.fetch(http, s)
    assert got.plaintext == SONG and got.index == 3 and got.item == "song"
    assert got.merchant_key == stack.parties["shop"].public
    # the trusted party's state is in the acquirer's database: lodged once, released once
    row = first_row(stack.acquirer.engine, D.acq_deliveries, session=s.session)
    assert row is not None and row["accepted"] and row["answer"] and row["merchant"] == "shop"
    assert count(stack.acquirer.engine, D.acq_deliveries) == 1
    # ... and it holds K2 only sealed to its own key: no key in the clear in any column
    k2 = bytes.fromhex(json.loads(got.package)["key"])
    assert k2.hex() not in json.dumps(row)
    offer = first_row(stack.merchants["shop"].engine, D.ma_offers, session=s.session)
    assert offer is not None and offer["acceptance"] and offer["lodged"] == 1   # evidence
    assert k2.hex() not in json.dumps({k: v for k, v in offer.items() if k != "ciphertext"})
    # the dispute package: a third party, public keys only, on the command line
    path = tmp_path / "dispute.json"
    path.write_bytes(got.package)
    runner = CliRunner()
    keys = ["--merchant-key", got.merchant_key.hex(), "--session-key", got.session_key.hex()]
    r = runner.invoke(svcard_main, ["session", "dispute-verify", str(path), *keys, "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["outcome"] == "matches", r.output
    tampered = json.loads(got.package)
    tampered["description"]["text"] = "Song 8, a better one"
    path.write_bytes(S.canonical(tampered))
    r = runner.invoke(svcard_main, ["session", "dispute-verify", str(path), *keys])
    assert r.exit_code == 3 and "invalid" in r.output
    path.write_bytes(got.package)
    wrong = ["--merchant-key", stack.parties["kiosk"].public.hex(), "--session-key",
             got.session_key.hex()]
    assert runner.invoke(svcard_main, ["session", "dispute-verify", str(path),
                                       *wrong]).exit_code == 3
    # tea has no product: no offer; another's pseudonym sees nothing
    base = f"{s.merchant_url}/v1/sessions/{s.session}/purchases"
    assert http.get(f"{base}/1/offer", params={"pseudonym": s.pseudonym}).status_code == 404
    assert http.get(f"{base}/3/offer", params={"pseudonym": "p0"}).status_code == 404
    assert http.get(f"{base}/9/offer", params={"pseudonym": s.pseudonym}).status_code == 404


def test_the_product_command(stack: TradeStack, http: httpx.Client, tmp_path: Path) -> None:
    _, s = opened(stack, http)
    C.buy(http, s, "film", 1)
    state = tmp_path / "session.json"
    C.save(state, s)
    out = tmp_path / "film.out"
    r = CliRunner().invoke(svcard_main, ["session", "product", "--state", str(state),
                                         "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.output)
    assert out.read_bytes() == FILM and shown["matches"] is True
    assert (out.stat().st_mode & 0o777) == 0o600
    package = Path(shown["dispute"]).read_bytes()
    assert V.verify_dispute(package, bytes.fromhex(shown["merchant_key"]),
                            bytes.fromhex(shown["session_key"])).outcome == "matches"
    # never over an existing file; the second fetch gets the same key (the same acceptance
    # is not kept by the command: a new one for an order already accepted is refused)
    r = CliRunner().invoke(svcard_main, ["session", "product", "--state", str(state),
                                         "--out", str(out)])
    assert r.exit_code == 3 and "exists" in r.output
    # a product damaged after the merchant signed its description: refused before accepting
    C.buy(http, s, "film", 1)
    C.save(state, s)
    offer_of(http, s, 2)
    engine = stack.merchants["shop"].engine
    with engine.begin() as conn:
        conn.execute(update(D.ma_offers).where(D.ma_offers.c.link_index == 2).values(
            ciphertext=b"\x00" + FILM))
    r = CliRunner().invoke(svcard_main, ["session", "product", "--state", str(state),
                                         "--out", str(tmp_path / "film2.out")])
    assert r.exit_code == 1 and "ciphertext is not the one described" in r.output
    assert not (tmp_path / "film2.out").exists()
    rows = [r for r in (first_row(stack.acquirer.engine, D.acq_deliveries, session=s.session,
                                  order_digest=json.loads(offer_of(http, s, 2)[0].description)
                                  ["order"]),) if r is not None]
    assert rows and rows[0]["accepted"] is None           # no key released for it


def test_acceptances_forged_replayed_or_aimed_elsewhere(stack: TradeStack,
                                                        http: httpx.Client) -> None:
    _, s = opened(stack, http)
    _, other = opened(stack, http, "bob")
    C.buy(http, s, "song", 1)
    C.buy(http, s, "film", 1)
    C.buy(http, other, "song", 1)
    # reordered: an acceptance before any offer was made for the purchase
    early = {"acceptance": {}, "sig": "00" * 64}
    assert http.post(accept_url(s, 1), content=S.canonical(early)).status_code == 404
    offer, _ = offer_of(http, s, 1)
    film, _ = offer_of(http, s, 2)
    theirs, _ = offer_of(http, other, 1)
    k1, k1_pub = V.new_exchange_key()
    now = int(time.time())
    rogue, _ = S.new_key()
    # forged: signed by a key that is not the session's (the merchant's, another customer's)
    for key in (rogue, stack.parties["shop"].key, other.session_key):
        forged = V.accept(key, offer, k1_pub, now)
        assert http.post(accept_url(s, 1), content=forged).status_code == 401
    # an acceptance of another order (the film's) sent for the song, or the song's for film
    assert http.post(accept_url(s, 1), content=V.accept(s.session_key, film, k1_pub,
                                                        now)).status_code == 403
    honest = V.accept(s.session_key, offer, k1_pub, now)
    assert http.post(accept_url(s, 2), content=honest).status_code == 403
    # another customer's acceptance of its own order, aimed at this session
    assert http.post(accept_url(s, 1), content=V.accept(other.session_key, theirs, k1_pub,
                                                        now)).status_code == 401
    # too old
    assert http.post(accept_url(s, 1), content=V.accept(s.session_key, offer, k1_pub,
                                                        now - 400)).status_code == 401
    # truncated, or not JSON at all
    assert http.post(accept_url(s, 1), content=honest[:-20]).status_code == 401
    assert http.post(accept_url(s, 1), content=b"\x00" * 10).status_code == 401
    # altered after signing
    body = json.loads(honest)
    body["acceptance"]["k1"] = "00" * 32
    assert http.post(accept_url(s, 1), content=S.canonical(body)).status_code == 401
    assert first_row(stack.acquirer.engine, D.acq_deliveries,
                     session=s.session)["accepted"] is None   # nothing released so far
    # the honest one, then replayed: the same answer, byte for byte
    first = http.post(accept_url(s, 1), content=honest)
    assert first.status_code == 200
    assert http.post(accept_url(s, 1), content=honest).content == first.content
    k2 = V.open_key(k1, bytes.fromhex(first.json()["sealed"]), honest, offer)
    assert V.decrypt(offer, k2) == SONG
    # a second, different acceptance of the same order: refused (released once)
    again = V.accept(s.session_key, offer, k1_pub, now)
    assert http.post(accept_url(s, 1), content=again).status_code == 409
    # its unique id reused for another order
    d = json.loads(film.description)
    body = {"v": 1, "session": s.session, "order": d["order"],
            "description": M.digest(film.description), "k1": k1_pub.hex(),
            "unique": json.loads(honest)["acceptance"]["unique"], "created": now,
            "link": ""}
    reused = S.canonical({"acceptance": body, "sig": S.sign(s.session_key, V.ACCEPTANCE,
                                                            S.canonical(body))})
    assert http.post(accept_url(s, 2), content=reused).status_code == 409


def test_k2_asked_for_by_the_merchant_or_another_customer(stack: TradeStack,
                                                          http: httpx.Client) -> None:
    _, s = opened(stack, http)
    _, other = opened(stack, http, "bob")
    C.buy(http, s, "song", 1)
    offer, _ = offer_of(http, s, 1)
    order = json.loads(offer.description)["order"]
    url = f"{stack.url('acq1')}/v1/deliveries/release"
    _, k1_pub = V.new_exchange_key()
    now = int(time.time())

    def release(acceptance: bytes) -> httpx.Response:
        return http.post(url, content=S.canonical({"session": s.session, "order": order,
                                                   "acceptance": acceptance.decode()}))
    # the merchant, signing an acceptance itself; another customer with its session key
    assert release(V.accept(stack.parties["shop"].key, offer, k1_pub, now)).status_code == 401
    assert release(V.accept(other.session_key, offer, k1_pub, now)).status_code == 401
    # a malformed or oversized body
    assert http.post(url, content=b"{}").status_code == 400
    assert http.post(url, content=b"x" * 20_000).status_code == 413
    assert first_row(stack.acquirer.engine, D.acq_deliveries,
                     session=s.session)["accepted"] is None
    # the customer's own acceptance, relayed by anyone: K2 only under the customer's K1
    honest = V.accept(s.session_key, offer, k1_pub, now)
    got = release(honest)
    assert got.status_code == 200
    assert S.verify(stack.parties["acq1"].public, party.RELEASED, got.content,
                    got.headers[S.SIGNATURE])
    with pytest.raises(V.DeliveryError):      # the merchant cannot open it
        V._unseal(stack.parties["shop"].key, bytes.fromhex(got.json()["sealed"]),
                  V.K2_TO_CUSTOMER + honest)


def test_lodging_attacks(stack: TradeStack, http: httpx.Client) -> None:
    _, s = opened(stack, http)
    _, k = opened(stack, http, "bob", merchant="kiosk")
    C.buy(http, s, "song", 1)
    C.buy(http, k, "song", 1)
    offer_of(http, s, 1)
    url = f"{stack.url('acq1')}/v1/deliveries"
    party_pub = party.exchange_key(stack.parties["acq1"].key)[1]
    order = V.signed_order(b'{"x":1}', "00" * 64)

    def lodge(signer: str, key: bytes, session: str, merchant: str = "shop",
              signing_key: bytes | None = None) -> int:
        o, sealed = V.offer(key, merchant, session, order, "song", "a song",
                            Amount(10, "JPY"), b"x", party_pub)
        body, headers = S.signed(signing_key or key, signer, party.LODGE, {
            "description": o.description.decode(), "signature": o.signature,
            "sealed": sealed.hex(), "held": "", "units": 0})
        return http.post(url, content=body, headers=headers).status_code
    shop, kiosk = stack.parties["shop"], stack.parties["kiosk"]
    rogue, _ = S.new_key()
    assert lodge("shop", shop.key, k.session) == 403         # kiosk's session, not shop's
    assert lodge("kiosk", kiosk.key, s.session, "kiosk") == 403   # shop's session
    assert lodge("shop", kiosk.key, s.session) == 401        # the signature is not shop's
    assert lodge("rogue", rogue, s.session, "rogue") == 403  # no merchant of this agent
    assert lodge("kiosk", kiosk.key, s.session, "shop") == 400   # described as shop's
    assert lodge("shop", shop.key, "am1.999") == 403         # no such session
    assert lodge("shop", shop.key, s.session) == 200         # an honest second order
    # another description (a new K2) for an order already lodged: refused
    assert lodge("shop", shop.key, s.session) == 409
    assert count(stack.acquirer.engine, D.acq_deliveries) == 2
    # the merchant's own offer again: the same one, lodged once
    offer_of(http, s, 1)
    assert count(stack.acquirer.engine, D.acq_deliveries) == 2
    assert count(stack.merchants["shop"].engine, D.ma_offers) == 1
    body = {"description": "x", "signature": "00" * 64, "sealed": "00" * 92}
    b, h = S.signed(shop.key, "shop", party.LODGE, body)
    assert http.post(url, content=b, headers=h).status_code == 400   # not a description


def test_raced_acceptances_release_once(stack: TradeStack, http: httpx.Client) -> None:
    _, s = opened(stack, http)
    C.buy(http, s, "song", 1)
    offer, _ = offer_of(http, s, 1)
    now = int(time.time())
    pairs = [V.new_exchange_key() for _ in range(8)]
    bodies = [V.accept(s.session_key, offer, pub, now) for _, pub in pairs]
    bodies += [bodies[0]] * 4          # the same acceptance raced with itself too
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def go(body: bytes) -> None:
        with httpx.Client(timeout=30) as own:
            r = own.post(accept_url(s, 1), content=body)
        with lock:
            results.append(r)
    threads = [threading.Thread(target=go, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r.status_code == 200]
    assert all(r.status_code in (200, 409) for r in results)
    assert len({r.json()["sealed"] for r in ok}) == 1     # one K2 answer, for one K1
    row = first_row(stack.acquirer.engine, D.acq_deliveries, session=s.session)
    assert row is not None and row["answer"] == ok[0].json()["sealed"]
    winner = next(i for i, b in enumerate(bodies) if b.decode() == row["acceptance"])
    k1 = pairs[winner][0] if winner < 8 else pairs[0][0]
    assert V.decrypt(offer, V.open_key(k1, bytes.fromhex(row["answer"]), bodies[winner],
                                       offer)) == SONG

"""An attacker's client against the SP server: captured orders raced, re-addressed to another
customer's bill, fields of every wrong type, signatures of every wrong shape. Nothing is paid
for any of them, and a captured honest order is paid once however often it is sent."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_sp_server import Sp, open_sp

from svcard.host.demo.system import System
from svcard.host.sp import records
from svcard.host.sp.signing import HEADER, LOOKUP_DOMAIN, sign, signed_order


@pytest.fixture
def sp(system: System, tmp_path: Path) -> Iterator[Sp]:
    s = open_sp(system, tmp_path / "sp", purses=2)
    yield s
    s.stack.close()


def test_a_captured_order_raced_ten_times_is_paid_once(sp: Sp) -> None:
    olga = sp.stack.customer("olga")
    body, headers = signed_order(olga.key, "olga", "MERCH001", "ticket")
    barrier = threading.Barrier(10)

    def send(_i: int) -> httpx.Response:
        with httpx.Client(timeout=60) as http:
            barrier.wait()
            return http.post(f"{sp.stack.url}/v1/orders", content=body, headers=headers)

    before = sp.balances()
    with cf.ThreadPoolExecutor(10) as ex:
        answers = list(ex.map(send, range(10)))
    assert sorted(a.status_code for a in answers) == [200] + [409] * 9
    assert len({a.json()["order"] for a in answers}) == 1
    assert sum(before) - sum(sp.balances()) == 1250 and sp.merchant_paid() == 1
    assert len(records.bill_lines(sp.stack.config.db_url)) == 1


def test_a_captured_order_cannot_be_billed_to_someone_else(sp: Sp, http: httpx.Client) -> None:
    pia = sp.stack.customer("pia")
    sp.stack.customer("quinn")
    body, headers = signed_order(pia.key, "pia", "MERCH001", "song")
    for victim in (b'"quinn"', b'"pia "', b'"PIA"'):
        moved = body.replace(b'"pia"', victim)
        answer = http.post(f"{sp.stack.url}/v1/orders", content=moved, headers=headers)
        assert answer.status_code in (400, 401, 403), answer.text
    # the lookup label does not make an order either
    answer = http.post(f"{sp.stack.url}/v1/orders", content=body,
                       headers={HEADER: sign(pia.key, body, LOOKUP_DOMAIN)})
    assert answer.status_code == 401
    assert sp.merchant_paid() == 0 and records.orders(sp.stack.config.db_url) == []


@pytest.mark.parametrize("change", [
    {"created": True}, {"created": 1.5}, {"created": "1790000000"}, {"created": -1},
    {"created": 2**63}, {"customer": "rémi"}, {"customer": ""}, {"customer": ["rex"]},
    {"sku": "song/../ticket"}, {"merchant": None}, {"order_key": "zz" * 16},
    {"order_key": "ab"}, {"order_key": "ab" * 40},
])
def test_fields_of_the_wrong_shape_are_refused(sp: Sp, http: httpx.Client,
                                               change: dict[str, object]) -> None:
    rex = sp.stack.customer("rex")
    body, _ = signed_order(rex.key, "rex", "MERCH001", "song")
    raw = json.dumps({**json.loads(body), **change}).encode()
    answer = http.post(f"{sp.stack.url}/v1/orders", content=raw,
                       headers={HEADER: sign(rex.key, raw)})
    assert answer.status_code == 400, answer.text
    assert answer.json()["reason"]
    assert records.orders(sp.stack.config.db_url) == []


def test_bodies_and_signatures_of_every_wrong_shape(sp: Sp, http: httpx.Client) -> None:
    sam = sp.stack.customer("sam")
    body, headers = signed_order(sam.key, "sam", "MERCH001", "song")
    url = f"{sp.stack.url}/v1/orders"
    good = headers[HEADER]
    for signature in ("", "00" * 64, good[:-2], good + "00", "zz" * 64, good[2:] + "00",
                      "é" * 64):
        answer = http.post(url, content=body, headers={HEADER: signature.encode("utf-8")})
        assert answer.status_code == 401, (signature[:10], answer.text)
    deep = b"[" * 50 + b"]" * 50
    for raw in (b"", b"not json", b"null", deep, b'{"customer": "sam"' + b" " * 3000 + b"}"):
        answer = http.post(url, content=raw, headers={HEADER: good})
        assert answer.status_code in (400, 413), (raw[:20], answer.text)
    assert http.post(url, content=body, headers=headers).status_code == 200
    assert sp.merchant_paid() == 1


def test_health(sp: Sp, http: httpx.Client) -> None:
    answer = http.get(f"{sp.stack.url}/v1/health")
    assert answer.status_code == 200 and answer.json()["status"] == "ok"

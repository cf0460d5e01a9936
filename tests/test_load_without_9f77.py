"""A network load onto a purse that does not answer GET DATA 9F77 (issue 11, finding 3).

Real purses do not have svcard's balance-limit GET DATA. The client then sends no limit, and the
bank loads up to the balance limit it has configured for the card's issuer (``[[issuers]]`` in
its TOML); with neither it refuses (400, "no balance limit known for issuer ..."), nothing
debited. When both are known the smaller wins: the card's limit comes from the client,
unauthenticated, so it may only make the bank more restrictive, never less.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from svcard.card.storage import read_image
from svcard.host.demo.system import card_image
from svcard.host.kit.config import ConfigError
from svcard.host.load import client as LC
from svcard.host.load.config import bank_config
from svcard.host.load.stack import LoadStack, start_load_stack
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.online import PaymentRefused
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import purse as P
from svcard.reader import Reader

ISSUER = "1000000000000001"           # the demo issuer (fixtures/demo-issuer.toml)
CARD_LIMIT = 100_000                  # the demo card's GET DATA 9F77 (fixtures/iep-demo.toml)
GET_DATA_9F77 = bytes.fromhex("80CA9F77")


class CardWithoutGetData9F77(Reader):
    """A real purse without svcard's GET DATA 9F77 (balance limit), as most deployed PBOC
    purses are: it answers that command 6A88 (referenced data not found) and passes every other
    APDU to the virtual card it wraps."""

    def __init__(self, inner: Reader) -> None:
        self.inner = inner
        self.name = inner.name
        self.asked = 0

    def connect(self) -> bytes:
        return self.inner.connect()

    def transmit(self, apdu: bytes) -> bytes:
        if apdu[:4] == GET_DATA_9F77:
            self.asked += 1
            return bytes.fromhex("6A88")
        return self.inner.transmit(apdu)

    def disconnect(self) -> None:
        self.inner.disconnect()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LoadStack]:
    s = start_load_stack(tmp_path / "stack")
    s.account("alice", 500_000, "pw")
    yield s
    s.close()


@pytest.fixture
def card(tmp_path: Path) -> Path:
    return card_image(tmp_path, ep=1_000)


def balance(card: Path) -> int:
    return int(read_image(card)["app"]["ep"]["balance"])


def account(stack: LoadStack) -> int:
    row = stack.bank_server.db.account("alice")
    assert row is not None
    return int(row["balance"])


def configure(stack: LoadStack, limit: int | None) -> None:
    stack.bank_server.config.issuer_limits = {} if limit is None else {
        bytes.fromhex(ISSUER): limit}


def load(stack: LoadStack, card: Path, tmp_path: Path, amount: int, *,
         without_9f77: bool = True) -> tuple[LC.LoadOutcome, list[dict[str, Any]]]:
    """A load through the client; also what the client told the bank about the card."""
    sent: list[dict[str, Any]] = []

    def keep(request: httpx.Request) -> None:
        if request.url.path.endswith("/v1/load/start"):
            import json
            sent.append(json.loads(request.content)["card"])

    with httpx.Client(timeout=30, event_hooks={"request": [keep]}) as http, \
            open_reader(f"virtual:{card}") as inner:
        reader = CardWithoutGetData9F77(inner) if without_9f77 else inner
        try:
            out = LC.load(stack.bank_url, reader, account="alice", secret="pw", amount=amount,
                          journal=Journal(tmp_path / "j.jsonl"), http=http)
        finally:
            if without_9f77:
                assert isinstance(reader, CardWithoutGetData9F77) and reader.asked == 1
    return out, sent


def test_the_wrapper_answers_6a88_and_passes_the_rest(card: Path) -> None:
    with open_reader(f"virtual:{card}") as inner:
        reader = CardWithoutGetData9F77(inner)
        assert reader.exchange(bytes.fromhex("00A4040009") + P.DEFAULT_IEP_AID).ok
        assert reader.exchange(bytes.fromhex("80CA9F7700")).sw == 0x6A88
        assert inner.exchange(bytes.fromhex("80CA9F7700")).ok  # the card itself has it


def test_loaded_up_to_the_issuers_configured_limit(stack: LoadStack, card: Path,
                                                   tmp_path: Path) -> None:
    configure(stack, 50_000)
    out, sent = load(stack, card, tmp_path, 5_000)
    assert (out.outcome, out.balance_before, out.balance_after) == ("loaded", 1_000, 6_000)
    assert "limit" not in sent[0] and sent[0]["issuer_id"] == ISSUER
    assert balance(card) == 6_000 and account(stack) == 495_000
    with pytest.raises(PaymentRefused, match=r"at most 44000 more \(balance 6000, limit 50000\)"):
        load(stack, card, tmp_path, 44_001)
    assert balance(card) == 6_000 and account(stack) == 495_000


def test_no_limit_known_is_refused_and_nothing_is_debited(stack: LoadStack, card: Path,
                                                          tmp_path: Path) -> None:
    configure(stack, None)
    with pytest.raises(PaymentRefused) as refused:
        load(stack, card, tmp_path, 5_000)
    assert refused.value.status == 400
    assert refused.value.reason.startswith(f"no balance limit known for issuer {ISSUER}")
    assert balance(card) == 1_000 and account(stack) == 500_000
    assert stack.bank_server.db.totals() == {"accounts": 500_000}
    assert stack.load_server.db.rows() == []
    # another issuer's limit does not apply to this card
    stack.bank_server.config.issuer_limits = {bytes.fromhex("2000000000000002"): 900_000}
    with pytest.raises(PaymentRefused, match=f"no balance limit known for issuer {ISSUER}"):
        load(stack, card, tmp_path, 5_000)
    assert account(stack) == 500_000


@pytest.mark.parametrize(("configured", "limit"), [
    (30_000, 30_000),       # the bank's is smaller: the card's own (100,000) does not widen it
    (400_000, CARD_LIMIT),  # the card's is smaller: it narrows the bank's
])
def test_with_both_the_smaller_limit_wins(stack: LoadStack, card: Path, tmp_path: Path,
                                          configured: int, limit: int) -> None:
    configure(stack, configured)
    room = limit - 1_000
    with pytest.raises(PaymentRefused, match=f"at most {room} more .*limit {limit}"):
        load(stack, card, tmp_path, room + 1, without_9f77=False)
    assert account(stack) == 500_000 and balance(card) == 1_000
    out, sent = load(stack, card, tmp_path, room, without_9f77=False)
    assert sent[-1]["limit"] == CARD_LIMIT and out.outcome == "loaded"
    assert balance(card) == limit


def start_body(**card: Any) -> dict[str, Any]:
    return {"account": "alice", "secret": "pw", "amount": 200_000,
            "card": {"serial": "00" * 10, "issuer_id": ISSUER, "balance": 0,
                     "currency_code": 156, **card}}


def test_a_client_claiming_a_huge_limit_cannot_widen_the_issuers(stack: LoadStack) -> None:
    """The attacker: a client sends a made-up card limit far above its issuer's configured one
    (or drops the issuer): refused, nothing debited."""
    configure(stack, 100_000)
    start = f"{stack.bank.url}/v1/load/start"
    for body in (start_body(limit=0xFFFFFFFF), start_body(limit=None), start_body()):
        r = httpx.post(start, json=body, timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["reason"] == ("the card can take at most 100000 more (balance 0, "
                                      "limit 100000)")
    without_issuer = start_body(limit=0xFFFFFFFF)
    del without_issuer["card"]["issuer_id"]
    r = httpx.post(start, json=without_issuer, timeout=30)
    assert r.status_code == 400 and "card.issuer_id" in r.json()["reason"]
    for bad in ("10", "zz" * 8, 7):
        r = httpx.post(start, json=start_body(limit=1, issuer_id=bad), timeout=30)
        assert r.status_code == 400 and "issuer_id" in r.json()["reason"], r.text
    assert account(stack) == 500_000
    assert stack.bank_server.db.totals() == {"accounts": 500_000}
    # within the issuer's limit the same client is served (the bank is not just refusing all)
    r = httpx.post(start, json=start_body(limit=0xFFFFFFFF) | {"amount": 100_000}, timeout=30)
    assert r.status_code == 200, r.text
    assert account(stack) == 400_000


def test_the_bank_configuration_takes_issuer_limits(tmp_path: Path) -> None:
    from svcard.fixtures import fixture_path

    text = fixture_path("bank-demo.toml").read_text()
    assert bank_config(fixture_path("bank-demo.toml")).issuer_limits == {}
    path = tmp_path / "bank.toml"
    entry = '\n[[issuers]]\nissuer_id = "{}"\nbalance_limit = {}\n'
    path.write_text(text + entry.format(ISSUER, 50_000) + entry.format("20" * 8, 0))
    assert bank_config(path).issuer_limits == {bytes.fromhex(ISSUER): 50_000,
                                               bytes.fromhex("20" * 8): 0}
    for extra, problem in (
            (entry.format(ISSUER, 1) + entry.format(ISSUER.lower(), 2),
             f"issuers[1].issuer_id: {ISSUER} is given twice"),
            (entry.format("1000", 1), "issuers[0].issuer_id"),
            (entry.format(ISSUER, -1), "issuers[0].balance_limit"),
            (entry.format(ISSUER, 2**32), "issuers[0].balance_limit"),
            ('\n[[issuers]]\nissuer_id = "' + ISSUER + '"\nbalance_limt = 5\n',
             "issuers[0].balance_limt: unknown key")):
        path.write_text(text + extra)
        with pytest.raises(ConfigError, match=problem.replace("[", r"\[").replace("]", r"\]")) \
                as caught:
            bank_config(path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)

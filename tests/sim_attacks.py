"""Attacker clients for the whole-system simulation (``tests/test_simulation.py``).

Each attack is what a hostile client would send, built step by step from what anyone can get
(a merchant's checkout hands out order tickets to anyone; a card's serial and counters are
printed on receipts and in logs) or from what a compromised client side holds (the session keys
of its own orders). Each one records in a :class:`Tally` whether the system refused it; an
attack that got anything it should not (goods, a refund, a blocked honest card, a state moved by
unauthenticated data) is a *breach*, named with its details so a failing seed says what broke.

The attacks run between honest operations, on the same servers, cards and databases, so the
audit after the run also proves they left no trace in the money.
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from loadraw import Raw

from svcard.host.load import client as LC
from svcard.host.load.stack import LoadStack
from svcard.host.pay import client as C
from svcard.host.pay.stack import Stack
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.purse import TerminalError, select_purse
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import loadmsg as L
from svcard.protocols import messages as M
from svcard.protocols import secure
from svcard.reader import Reader

OCTETS = {"Content-Type": "application/octet-stream"}


@dataclass
class Tally:
    tried: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    breaches: list[str] = field(default_factory=list)

    def outcome(self, kind: str, refused: bool, detail: str = "") -> None:
        self.tried[kind] += 1
        if refused:
            self.refused[kind] += 1
        else:
            self.breaches.append(f"{kind}: {detail}")

    def table(self) -> dict[str, str]:
        return {k: f"{self.refused[k]}/{n} refused" for k, n in sorted(self.tried.items())}


@dataclass
class Arena:
    """What the attackers can reach: the payment stacks, the honest cards, an HTTP client."""

    rng: random.Random
    stacks: list[Stack]
    cards: list[Path]
    journal: Journal
    http: httpx.Client
    tally: Tally = field(default_factory=Tally)
    load: LoadStack | None = None
    confirmations: list[bytes] = field(default_factory=list)   # honest ones, seen on the wire
    draws: list[tuple[Stack, str, str, bytes]] = field(default_factory=list)


def checkout(arena: Arena, stack: Stack, variant: str | None = None) -> dict[str, Any]:
    sku = arena.rng.choice(["song", "ticket", "article"])
    url = f"{stack.merchant.url}/v1/checkout/{sku}"
    if variant:
        url += f"?variant={variant}"
    return C.fetch_checkout(arena.http, url)


def public_card_data(card: Path) -> tuple[bytes, bytes, bytes, int, int]:
    """(issuer id, serial, expiry, next offline counter, balance) as an observer knows them."""
    app = json.loads(card.read_text())["app"]
    with open_reader(f"virtual:{card}") as reader:
        info = select_purse(reader)
    return (bytes.fromhex(info.issuer_id), info.serial_bytes, bytes.fromhex(info.expiry_date),
            int(app["ep"]["offline_counter"]), int(app["ep"]["balance"]))


def draw_body(params: dict[str, Any], issuer: bytes, serial: bytes, expiry: bytes,
              counter: int, balance: int, random_bytes: bytes) -> bytes:
    return M.build(M.DrawRequest, {
        "issuer_id": issuer, "card_serial": serial, "algorithm_id": 0, "key_version": 1,
        "expiry_date": expiry, "balance": balance, "currency_code": params["currency_code"],
        "currency_exponent": params["currency_exponent"], "purse": 2,
        "offline_counter": counter, "amount": params["amount"], "random": random_bytes,
        "txn_type": 6})


def envelope(params: dict[str, Any], msg_type: int, body: bytes) -> bytes:
    s = C._Session(params)
    return M.seal_envelope(msg_type, s.merchant_id, s.txn_id, s.etsk, s.tsk, body)


def post(arena: Arena, stack: Stack, path: str, data: bytes) -> httpx.Response:
    return arena.http.post(stack.payment.url + path, content=data, headers=OCTETS)


@contextmanager
def card_in_hand(arena: Arena, card: Path) -> Iterator[Reader]:
    """A card as the svcard client takes it: what an interruption left on it is finished first
    (GET TRANSACTION PROVE knows only the card's last transaction, so no client may start a new
    one before resuming)."""
    with open_reader(f"virtual:{card}") as reader:
        with suppress(TerminalError, httpx.HTTPError):
            C.resume(reader, journal=arena.journal, http=arena.http)
            LC.resume_loads(reader, journal=arena.journal, http=arena.http)
        yield reader


BUSY = (429, 503)   # a pool or a bound busy for a moment: retried later, never a breach


def honest_payment(arena: Arena, stack: Stack, card: Path, variant: str,
                   http: httpx.Client | None = None) -> C.PaymentOutcome | None:
    """An honest card's payment; None when the card cannot pay now (its balance, or a busy
    server that asks it to retry), which is no breach."""
    with card_in_hand(arena, card) as reader:
        try:
            return C.pay(f"{stack.merchant.url}/v1/checkout/article?variant={variant}", reader,
                         journal=arena.journal, http=http or arena.http)
        except C.PaymentRefused as exc:
            if exc.status in BUSY:
                return None
            raise
        except TerminalError as exc:
            if "9401" in str(exc) or "balance" in str(exc):
                return None
            raise


# --- the attacks ----------------------------------------------------------------------------

def fabricated_draw_on_an_honest_card(arena: Arena) -> None:
    """P1/P4: a draw with a victim's serial and next counter (no card), then a "card refused"
    report; the victim must still pay."""
    stack, victim = arena.rng.choice(arena.stacks), arena.rng.choice(arena.cards)
    params = checkout(arena, stack, arena.rng.choice(["fig5", "fig6", "fig8"]))
    issuer, serial, expiry, counter, balance = public_card_data(victim)
    r = post(arena, stack, "/v1/draw", envelope(params, M.DRAW_REQUEST,
                                                draw_body(params, issuer, serial, expiry,
                                                          counter, balance,
                                                          arena.rng.randbytes(4))))
    if r.status_code == 200:
        post(arena, stack, "/v1/debit-response", envelope(params, M.DEBIT_RESPONSE, M.build(
            M.DebitResponse, {"card_sw": 0x6985, "tac": bytes(4), "mac2": bytes(4)})))
    try:
        honest_payment(arena, stack, victim, arena.rng.choice(["fig6", "fig8"]))
    except C.PaymentRefused as exc:
        arena.tally.outcome("fabricated draw on an honest card", False,
                            f"the victim's payment was refused: {exc}")
        return
    arena.tally.outcome("fabricated draw on an honest card", True)


class RacingHttp(httpx.Client):
    """An honest client's link with an attacker on it: it learns the order's keys from the
    checkout it relays, and races forged debit responses (or copies of the confirmation)
    against the genuine request."""

    def __init__(self, arena: Arena, stack: Stack, race: str, copies: int) -> None:
        super().__init__(timeout=30)
        self.arena, self.stack, self.race, self.copies = arena, stack, race, copies
        self.order: dict[str, Any] | None = None
        self.released = 0
        self.forged_answers: list[int] = []

    def request(self, method: str, url: Any,  # type: ignore[override]
                **kwargs: Any) -> httpx.Response:
        response = super().request(method, url, **kwargs)
        if "/v1/checkout/" in str(url) and response.status_code == 200:
            self.order = response.json()
        return response

    @contextmanager
    def stream(self, method: str, url: Any,  # type: ignore[override]
               **kwargs: Any) -> Iterator[httpx.Response]:
        """The pay client reads the checkout capped, through ``stream``: on this link it is
        read whole by :meth:`request` (which learns the order's keys) and handed over."""
        yield self.request(method, url, **kwargs)

    def _parallel(self, sends: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
        out: list[httpx.Response | None] = [None] * len(sends)

        def run(i: int) -> None:
            out[i] = sends[i]()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sends))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [r for r in out if r is not None]

    def post(self, url: Any, **kwargs: Any) -> httpx.Response:  # type: ignore[override]
        url_s = str(url)
        if url_s.endswith("/v1/draw") and self.order:
            response = super().post(url, **kwargs)
            if response.status_code == 200:  # a draw the server took: replayed later
                self.arena.draws.append((self.stack, self.order["merchant_id"],
                                         self.order["txn_id"], kwargs["content"]))
            return response
        if self.race == "debit" and url_s.endswith("/v1/debit-response") and self.order:
            forged = [self._forged_response() for _ in range(self.copies)]
            genuine_at = self.arena.rng.randrange(self.copies + 1)
            bodies = [*forged[:genuine_at], kwargs["content"], *forged[genuine_at:]]
            answers = self._parallel([
                (lambda b=b: super(RacingHttp, self).post(url, content=b, headers=OCTETS))
                for b in bodies])
            self.forged_answers = [a.status_code for i, a in enumerate(answers)
                                   if i != genuine_at]
            return answers[genuine_at]
        if self.race == "confirmation" and "/v1/status/" in url_s:
            body = kwargs["content"]
            self.arena.confirmations.append(body)
            answers = self._parallel([
                (lambda: super(RacingHttp, self).post(url, content=body, headers=OCTETS))
                for _ in range(self.copies + 1)])
            # released once: every 200 is the one release's answer (the merchant gives an
            # exact repeat of the releasing confirmation the same goods and receipt)
            self.released = len({(a.json().get("goods"),
                                  json.dumps(a.json().get("receipt"), sort_keys=True))
                                 for a in answers if a.status_code == 200
                                 and a.json().get("released")})
            winners = [a for a in answers if a.status_code == 200]
            return winners[0] if winners else answers[0]
        return super().post(url, **kwargs)

    def _forged_response(self) -> bytes:
        assert self.order is not None
        kind = self.arena.rng.randrange(3)
        rng = self.arena.rng
        body = {"card_sw": 0x9000, "tac": rng.randbytes(4), "mac2": rng.randbytes(4)}
        if kind == 1:
            body["card_sw"] = self.arena.rng.choice([0x6985, 0x9302, 0x9401])
        data = envelope(self.order, M.DEBIT_RESPONSE, M.build(M.DebitResponse, body))
        if kind == 2:  # truncated in transit
            data = data[: self.arena.rng.randrange(1, len(data))]
        return data


def raced_payment(arena: Arena, kind: str, race: str, copies: int, variants: list[str],
                  ) -> tuple[Stack, RacingHttp, C.PaymentOutcome] | None:
    """An honest payment over a link where an attacker races ``race`` messages; None when
    the card could not pay, or the genuine payment was refused (a breach, tallied here)."""
    stack, card = arena.rng.choice(arena.stacks), arena.rng.choice(arena.cards)
    link = RacingHttp(arena, stack, race, copies=copies)
    try:
        outcome = honest_payment(arena, stack, card, arena.rng.choice(variants), http=link)
    except C.PaymentRefused as exc:
        arena.tally.outcome(kind, False, f"the genuine payment was refused: {exc}")
        return None
    finally:
        link.close()
    return None if outcome is None else (stack, link, outcome)


def forged_debit_responses_raced(arena: Arena) -> None:
    """C3: forged debit responses raced with the genuine one (FIG. 5 and 6)."""
    kind = "forged debit responses raced"
    raced = raced_payment(arena, kind, "debit", arena.rng.randrange(2, 9), ["fig5", "fig6"])
    if raced is None:
        return
    stack, link, outcome = raced
    assert link.order is not None
    row = stack.payment_server.db.get(link.order["merchant_id"], outcome.txn_id)
    ok = row is not None and row["state"] == "confirmed"
    arena.tally.outcome(kind, ok, f"row {row and row['state']} after the race")


def confirmation_copies_raced(arena: Arena) -> None:
    """M1: one valid confirmation posted many times at once releases the goods once."""
    kind = "confirmation copies raced"
    raced = raced_payment(arena, kind, "confirmation", arena.rng.randrange(4, 12),
                          ["fig5", "fig6", "fig8"])
    if raced is not None:
        link = raced[1]
        arena.tally.outcome(kind, link.released == 1, f"goods released {link.released} times")


def confirmation_for_another_order(arena: Arena) -> None:
    """A genuine confirmation of one order, posted to another order's status URL."""
    if not arena.confirmations:
        return
    stack = arena.rng.choice(arena.stacks)
    params = checkout(arena, stack)
    r = arena.http.post(params["status_url"], content=arena.rng.choice(arena.confirmations),
                        headers=OCTETS)
    arena.tally.outcome("confirmation for another order", r.status_code >= 400,
                        f"{r.status_code} {r.text[:120]}")


def fig7_without_a_card(arena: Arena) -> None:
    """P2: ask for FIG. 7 (the client compares) and confirm a draw made of invented card data."""
    stack = arena.rng.choice(arena.stacks)
    try:
        params = checkout(arena, stack, "fig7")
    except C.PaymentRefused:
        arena.tally.outcome("FIG. 7 without a card", True)
        return
    if params["variant"] != "fig7":
        arena.tally.outcome("FIG. 7 without a card", True)
        return
    serial = arena.rng.randbytes(10)
    r = post(arena, stack, "/v1/draw", envelope(params, M.DRAW_REQUEST, draw_body(
        params, bytes.fromhex("D156000015CCCCCC"), serial, bytes.fromhex("20991231"), 0,
        100_000, arena.rng.randbytes(4))))
    if r.status_code != 200:
        arena.tally.outcome("FIG. 7 without a card", True)
        return
    env, header = M.split_envelope(r.content)
    s = C._Session(params)
    cmd = M.parse(M.DebitCommand, secure.open_sealed(s.tsk, env.body, header, "debit"), "d")
    confirmation = M.build(M.Confirmation, {
        **confirmation_defaults(), "variant": M.FIG7_CLIENT_COMPARES, "txn_id": s.txn_id,
        "result_m": cmd.result_m, "card_mac2": cmd.expected_mac2})
    answer = arena.http.post(params["status_url"], content=confirmation, headers=OCTETS)
    released = answer.status_code == 200 and answer.json().get("released")
    arena.tally.outcome("FIG. 7 without a card", not released, "goods released with no card")


def confirmation_defaults() -> dict[str, Any]:
    """Every field of a Confirmation an attacker leaves empty (the layout grows over time)."""
    out: dict[str, Any] = {"version": M.VERSION, "card_mac2": bytes(4),
                           "sealed_expected_mac2": b""}
    names = {sc.name for sc in M.Confirmation.subcons}
    if "terminal_id" in names:
        out["terminal_id"] = bytes(8)
    if "tac" in names:
        out["tac"] = bytes(4)
    if "signature" in names:
        out["signature"] = b""
    return out


def tampered_or_truncated_draw(arena: Arena) -> None:
    """A sealed draw changed in one byte, or cut short, in transit."""
    stack, card = arena.rng.choice(arena.stacks), arena.rng.choice(arena.cards)
    params = checkout(arena, stack)
    issuer, serial, expiry, counter, balance = public_card_data(card)
    data = bytearray(envelope(params, M.DRAW_REQUEST, draw_body(params, issuer, serial, expiry,
                                                                counter, balance,
                                                                arena.rng.randbytes(4))))
    if arena.rng.random() < 0.5:
        data[arena.rng.randrange(len(data))] ^= 1 << arena.rng.randrange(8)
    else:
        data = data[: arena.rng.randrange(len(data))]
    r = post(arena, stack, "/v1/draw", bytes(data))
    arena.tally.outcome("tampered or truncated draw", 400 <= r.status_code < 500,
                        f"answered {r.status_code}")


def replayed_finished_draw(arena: Arena) -> None:
    """The draw of a finished honest payment, sent again: nothing may move."""
    if not arena.draws:
        return
    stack, merchant, txn, data = arena.rng.choice(arena.draws)
    before = stack.payment_server.db.get(merchant, txn)
    if before is None or before["state"] not in ("confirmed", "released"):
        return  # not finished (yet): a retried draw is the client's right
    r = post(arena, stack, "/v1/draw", data)
    after = stack.payment_server.db.get(merchant, txn)
    same = after is not None and before["state"] == after["state"]
    arena.tally.outcome("replayed finished draw", same and r.status_code in (200, 409, *BUSY),
                        f"answered {r.status_code}, state {before and before['state']} -> "
                        f"{after and after['state']}")


def debit_response_before_any_draw(arena: Arena) -> None:
    """Messages out of order: a debit response, and a proof, for an order never drawn."""
    stack = arena.rng.choice(arena.stacks)
    params = checkout(arena, stack)
    body = M.build(M.DebitResponse, {"card_sw": 0x9000, "tac": arena.rng.randbytes(4),
                                     "mac2": arena.rng.randbytes(4)})
    r1 = post(arena, stack, "/v1/debit-response", envelope(params, M.DEBIT_RESPONSE, body))
    r2 = post(arena, stack, "/v1/proof", envelope(params, M.DEBIT_PROOF, body))
    arena.tally.outcome("debit response before any draw",
                        r1.status_code == 404 and r2.status_code == 404,
                        f"answered {r1.status_code}/{r2.status_code}")


PAYMENT_ATTACKS: list[Callable[[Arena], None]] = [
    fabricated_draw_on_an_honest_card, forged_debit_responses_raced, confirmation_copies_raced,
    confirmation_for_another_order, fig7_without_a_card, tampered_or_truncated_draw,
    replayed_finished_draw, debit_response_before_any_draw,
]


# --- the load side ----------------------------------------------------------------------------

ATTACKER_ACCOUNT, ATTACKER_SECRET = "mallory", "mallory-pw"


def _raw(arena: Arena, reader: Reader, amount: int) -> Raw | None:
    """A bank order on the attacker's own account for one of the cards (the card holder turned
    attacker); None when the bank will not sell it (the card's limit), which is no attack."""
    assert arena.load is not None
    try:
        return Raw(arena.load, reader, arena.http, amount, ATTACKER_ACCOUNT, ATTACKER_SECRET)
    except C.PaymentRefused:
        return None


def _bank_state(arena: Arena, raw: Raw) -> str:
    assert arena.load is not None
    row = arena.load.bank_server.db.load(raw.txn_hex)
    return str(row["state"]) if row else "none"


def _refused(call: Callable[[], object]) -> bool:
    try:
        call()
    except (C.PaymentRefused, TerminalError, AssertionError):
        return True
    return False


def zero_s1_kept_from_before_the_load(arena: Arena) -> None:
    """A1: a zero-value S1 made before the load, shown as "not loaded" after the card loaded."""
    card = arena.rng.choice(arena.cards)
    with card_in_hand(arena, card) as reader:
        r = _raw(arena, reader, arena.rng.randrange(100, 500))
        if r is None:
            return
        kept = r.init(0)
        command = r.send_request(r.request(r.init()))
        s3 = r.credit(command).data
        msg_type, body = r.post_result(r.result_body(L.RESULT_NOT_LOADED, zero=kept))
        if msg_type == L.LOAD_ANSWER:  # decided on the old S1: take it to the bank
            r.to_bank(M.parse(L.LoadAnswer, body, "answer").confirmation)
        elif msg_type == L.LOAD_PROBE:  # the card cannot run a probe for its old counter
            probe = M.parse(L.LoadCommand, body, "probe")
            r.init(0)
            r.credit(probe)
            _refused(lambda: r.probe_result(s3))
        state = _bank_state(arena, r)
        # the card holder finally tells the truth, so the books close
        answer = r.result(L.RESULT_LOADED, s3=s3)
        r.to_bank(answer.confirmation)
    arena.tally.outcome("zero-value S1 kept from before the load", state == "debited",
                        f"bank order {r.txn_hex} {state}")


def two_loads_on_one_counter(arena: Arena) -> None:
    """A2: INITIALIZE for B then A, A's request then B's, the card credited with A's S2, A
    reported "not loaded": A must never be refunded; B only once the card proves it."""
    card = arena.rng.choice(arena.cards)
    with card_in_hand(arena, card) as reader:
        a = _raw(arena, reader, arena.rng.randrange(100, 500))
        b = _raw(arena, reader, arena.rng.randrange(100, 500)) if a else None
        if a is None or b is None:
            if a is not None:  # the bank sold only one: close it as a client would
                a.to_bank(a.result(L.RESULT_NOT_LOADED).confirmation)
            return
        init_b, init_a = b.init(), a.init()
        command_a = a.send_request(a.request(init_a))
        _refused(lambda: b.send_request(b.request(init_b)))
        s3_a = a.credit(command_a).data
        _refused(lambda: a.not_loaded())       # probes past counter n: undecided
        a_state = _bank_state(arena, a)
        answer = a.result(L.RESULT_LOADED, s3=s3_a)
        a.to_bank(answer.confirmation)
        refund = b.not_loaded()                # B's counter was A's: proven, refunded
        b.to_bank(refund.confirmation)
        b_state = _bank_state(arena, b)
    arena.tally.outcome("two loads on one counter",
                        a_state == "debited" and b_state == "refunded",
                        f"A {a.txn_hex} {a_state}, B {b.txn_hex} {b_state}")


def forged_or_replayed_probe_answer(arena: Arena) -> None:
    """A "not loaded" whose probe answer is forged, or another load's real one."""
    card = arena.rng.choice(arena.cards)
    with card_in_hand(arena, card) as reader:
        r = _raw(arena, reader, arena.rng.randrange(100, 500))
        if r is None:
            return
        command = r.send_request(r.request(r.init()))
        s3 = r.credit(command).data
        probe = r.probe(r.init(0))
        tac = r.credit(probe).data
        forged = arena.rng.choice([s3, bytes(4), bytes(x ^ 1 for x in tac), arena.rng.randbytes(4)])
        refused = _refused(lambda: r.probe_result(forged))
        state = _bank_state(arena, r)
        answer = r.result(L.RESULT_LOADED, s3=s3)
        r.to_bank(answer.confirmation)
    arena.tally.outcome("forged probe answer", refused and state == "debited",
                        f"bank order {r.txn_hex} {state}")


def wrong_account_secrets(arena: Arena) -> None:
    """Guessing an account's secret: every guess refused (403 or 429), none accepted."""
    assert arena.load is not None
    accepted = 0
    for _ in range(arena.rng.randrange(3, 12)):
        response = arena.http.post(f"{arena.load.bank.url}/v1/load/start", json={
            "account": "victim", "secret": arena.rng.randbytes(6).hex(), "amount": 100,
            "card": {"serial": "00" * 10, "issuer_id": "00" * 8, "balance": 0,
                     "limit": 100_000, "currency_code": 156, "currency_exponent": 2}})
        accepted += response.status_code == 200
    arena.tally.outcome("wrong account secrets", accepted == 0, f"{accepted} accepted")


LOAD_ATTACKS: list[Callable[[Arena], None]] = [
    zero_s1_kept_from_before_the_load, two_loads_on_one_counter,
    forged_or_replayed_probe_answer, wrong_account_secrets,
]
ATTACKS: list[Callable[[Arena], None]] = [*PAYMENT_ATTACKS, *LOAD_ATTACKS]

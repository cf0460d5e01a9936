"""Loading a card over the network (seed FIG. 17-18), from the client terminal.

Read the card at its purse AID (balance, limit if it answers GET DATA 9F77, currency, expiry),
ask the bank to debit the account (step 872-875), INITIALIZE FOR LOAD while emulating the HSM's
side and pack one load request (876-878), pass the load server's command to the card (881),
return S3 (883), and carry the load server's confirmation to the bank (891).

On "not loaded" the client runs a zero-value *probe load* end to end: INITIALIZE FOR LOAD for 0,
the "not loaded" result with that S1, the load server's probe command (S2 for amount 0) to the
card, which credits 0 and moves its counter, and the card's TAC back to the load server, which
only then decides (a load for which no S2 was ever issued is decided at once).

Every step is in the local journal before the next exchange; :func:`resume_loads` (its body in
:mod:`svcard.host.load.resume`) finishes what an interruption left, asking the card itself (GET
TRANSACTION PROVE for the load or the probe) what happened. A load the load server cannot decide
stays open ("still open: ...").
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass, field
from typing import Any

import httpx

from ...protocols import loadmsg as L
from ...protocols import messages as M
from ...protocols import purse as P
from ...protocols import secure
from ...protocols import sw as SW
from ...reader import Reader
from ..terminal import apdus
from ..terminal.journal import Journal
from ..terminal.online import RETRY_SAFE, PaymentRefused
from ..terminal.purse import (
    CardInfo,
    TerminalCheckFailed,
    call,
    read_balance_limit,
    select_purse,
)

KIND = "load"


@dataclass
class LoadOutcome:
    txn_id: str
    outcome: str                  # "loaded" | "not loaded"
    amount: int
    currency_exponent: int
    balance_before: int
    balance_after: int
    reason: str
    bank: dict[str, Any]
    round_trips: int
    resumed: bool = False
    steps: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _LoadSession:
    def __init__(self, params: dict[str, Any], aid: bytes = P.DEFAULT_IEP_AID) -> None:
        self.params = params
        self.aid = aid  # the purse the load was started with
        self.bank_id = bytes.fromhex(params["bank_id"])
        self.txn_id = bytes.fromhex(params["txn_id"])
        self.tsk = bytes.fromhex(params["tsk"])
        self.etsk = bytes.fromhex(params["etsk"])
        self.load_url = str(params["load_url"]).rstrip("/")
        self.terminal_id = bytes.fromhex(params["terminal_id"])
        self.amount = int(params["amount"])
        self.round_trips = 0

    def post(self, http: httpx.Client, path: str, msg_type: int, body: bytes,
             retry: bool = True) -> bytes:
        return self.exchange(http, path, msg_type, body, retry)[1]

    def exchange(self, http: httpx.Client, path: str, msg_type: int, body: bytes,
                 retry: bool = True) -> tuple[int, bytes]:
        """Post one sealed message: (the answer's message type, its opened body). ``retry``:
        a busy answer may be asked again (the same result or probe gets the same answer)."""
        request = M.seal_envelope(msg_type, self.bank_id, self.txn_id, self.etsk, self.tsk,
                                  body)
        self.round_trips += 1
        response = http.post(self.load_url + path, content=request,
                             headers={"Content-Type": "application/octet-stream"},
                             extensions=RETRY_SAFE if retry else None)
        if response.status_code != 200:
            raise PaymentRefused.answer("load server", response)
        env, header = M.split_envelope(response.content)
        if (env.merchant_id, env.txn_id) != (self.bank_id, self.txn_id):
            raise PaymentRefused("load server", 200, "answer for another transaction")
        return env.msg_type, secure.open_sealed(self.tsk, env.body, header,
                                                "load server answer")


def start_load(http: httpx.Client, bank_url: str, card: Reader, *, account: str, secret: str,
               amount: int, when: dt.datetime | None = None,
               request_id: str | None = None,
               lookup_only: bool = False, info: CardInfo | None = None,
               aid: bytes = P.DEFAULT_IEP_AID) -> tuple[dict[str, Any], int]:
    """Steps 871-874: read the card (the purse at ``aid``; ``info``: already selected), have
    the bank debit the account. (params, card balance). A card that does not answer GET DATA
    9F77 sends no limit: the bank goes by its own for the card's issuer."""
    info = info or select_purse(card, aid)
    currency = info.known_currency("be loaded in a bank's currency")
    info.check_dates((when or dt.datetime.now()).date())
    balance = int.from_bytes(call(card, apdus.get_balance(P.PURSE_EP), "GET BALANCE"), "big")
    limit = read_balance_limit(card)
    page = http.get(bank_url, headers={"Accept": "application/json"}, extensions=RETRY_SAFE)
    if page.status_code != 200:
        raise PaymentRefused.answer("bank", page)
    start_url = str(page.json()["start_url"])
    response = http.post(start_url, json={
        "account": account, "secret": secret, "amount": amount, "request_id": request_id,
        "lookup_only": lookup_only,
        "card": {"serial": info.app_serial, "issuer_id": info.issuer_id, "balance": balance,
                 "currency_code": currency,
                 "currency_exponent": info.currency_exponent or 0,
                 **({} if limit is None else {"limit": limit})}},
        extensions=RETRY_SAFE if request_id else None)  # its request id: the same load again
    if response.status_code != 200:
        raise PaymentRefused.answer("bank", response)
    params: dict[str, Any] = response.json()
    for key in ("amount", "load_url", "txn_id", "bank_id", "terminal_id", "bank_time",
                "status_url", "tsk", "etsk"):
        if key not in params:
            raise TerminalCheckFailed(f"the bank's load parameters lack {key!r}")
    if int(params["amount"]) != amount:
        raise TerminalCheckFailed("the bank changed the amount")
    return params, balance


def load(bank_url: str, card: Reader, *, account: str, secret: str, amount: int,
         journal: Journal, http: httpx.Client, when: dt.datetime | None = None,
         aid: bytes = P.DEFAULT_IEP_AID) -> LoadOutcome:
    """Load ``amount`` onto the purse at ``aid`` (journalled, so that a resume selects it)."""
    if not 0 < amount <= 0xFFFFFFFF:
        raise TerminalCheckFailed("a load is 1..4294967295 minor units")
    info = select_purse(card, aid)
    currency = info.known_currency("be loaded in a bank's currency")
    # the bank's debit comes first: journal an idempotency key before asking for it, so a
    # lost answer can be asked again without a second debit (see resume_loads)
    request_id = secrets.token_hex(16)
    journal.write(f"req-{request_id}", "load-starting", kind=KIND, card_serial=info.app_serial,
                  aid=aid.hex().upper(), bank_url=bank_url, account=account, secret=secret,
                  amount=amount, request_id=request_id)
    try:
        params, balance = start_load(http, bank_url, card, account=account, secret=secret,
                                     amount=amount, when=when, request_id=request_id,
                                     info=info)
    except PaymentRefused:  # the bank refused: it debited nothing
        journal.write(f"req-{request_id}", "load-done", reason="the bank refused")
        raise
    s = _LoadSession(params, aid)
    s.round_trips += 2
    txn = params["txn_id"]
    journal.write(txn, "load-started", kind=KIND, params=params, card_serial=info.app_serial,
                  aid=aid.hex().upper(), balance=balance)
    journal.write(f"req-{request_id}", "load-done", txn=txn)
    # 876: the card's answers to INITIALIZE FOR LOAD, packed into one load request
    answer = card.exchange(apdus.initialize(P.INIT_LOAD, P.PURSE_EP, 1, amount,
                                            s.terminal_id))
    if not answer.ok:  # e.g. the limit: the bank was told otherwise. Nothing can load now.
        journal.write(txn, "card-refused", card_sw=answer.sw)
        return _negative(s, http, journal, card, balance,
                         f"the card refused INITIALIZE FOR LOAD: {answer.sw:04X} "
                         f"({SW.meaning(answer.sw)})")
    init = P.InitForLoadAnswer.parse(answer.data)
    request = M.build(L.LoadRequest, {
        "issuer_id": bytes.fromhex(info.issuer_id), "card_serial": info.serial_bytes,
        "expiry_date": bytes.fromhex(info.expiry_date),
        "currency_code": currency, "amount": amount,
        "txn_type": P.TYPE_EP_LOAD, "algorithm_id": init.algorithm_id,
        "key_version": init.key_version, "online_counter": init.online_counter,
        "balance": init.balance, "random": init.random, "s1": init.mac1,
        "bank_time": int(params["bank_time"])})
    journal.write(txn, "load-requested", counter=init.online_counter)
    # 877-880: one load request, one load command
    try:
        # not asked again when busy: the load server closes a request no HSM took (409 then)
        command_bytes = s.post(http, "/v1/load/request", L.LOAD_REQUEST, request, retry=False)
    except PaymentRefused as exc:
        if exc.status == 503:
            raise
        journal.write(txn, "request-refused", reason=exc.reason)
        return _negative(s, http, journal, card, init.balance,
                         f"the load server refused the request: {exc.reason}")
    command = M.parse(L.LoadCommand, command_bytes, "load command")
    if command.amount != amount:
        journal.write(txn, "command-refused", reason="amount changed in transit")
        return _negative(s, http, journal, card, init.balance,
                         "the load command changed the amount: not passed to the card")
    journal.write(txn, "load-command", s2=command.s2.hex(), date=command.date.hex(),
                  time=command.time.hex())
    # 881-882: the card checks S2, loads itself, answers S3
    answer = card.exchange(apdus.credit_for_load(command.date, command.time, command.s2))
    if not answer.ok:
        journal.write(txn, "card-refused", card_sw=answer.sw)
        return _negative(s, http, journal, card, init.balance,
                         f"the card did not load: {answer.sw:04X} ({SW.meaning(answer.sw)})")
    journal.write(txn, "card-loaded", s3=answer.data.hex())
    return _send_result(s, http, journal, answer.data, init.balance)


def _negative(s: _LoadSession, http: httpx.Client, journal: Journal, card: Reader,
              balance: int, why: str) -> LoadOutcome:
    """Negative result handling: a zero-value probe load, done for real. The load server
    answers the probe (or, if it never issued S2, its decision at once)."""
    txn = s.params["txn_id"]
    journal.write(txn, "negative", why=why)
    select_purse(card, s.aid)
    zero = P.InitForLoadAnswer.parse(call(
        card, apdus.initialize(P.INIT_LOAD, P.PURSE_EP, 1, 0, s.terminal_id),
        "INITIALIZE FOR LOAD (zero value)"))
    journal.write(txn, "probe-requested", probe_counter=zero.online_counter)
    body = M.build(L.LoadResult, {
        "result": L.RESULT_NOT_LOADED, "card_sw": 0x6985, "s3": bytes(4),
        "online_counter": zero.online_counter, "balance": zero.balance,
        "random": zero.random, "s1": zero.mac1})
    msg_type, answer = s.exchange(http, "/v1/load/result", L.LOAD_RESULT, body)
    if msg_type == L.LOAD_ANSWER:  # no S2 was ever issued: decided without a probe
        card.exchange(apdus.select(s.aid))  # end the zero-value session unused
        return _answered(s, http, journal, answer, balance)
    if msg_type != L.LOAD_PROBE:
        raise PaymentRefused("load server", 200, f"unexpected answer type {msg_type}")
    probe = M.parse(L.LoadCommand, answer, "probe command")
    if probe.amount != 0:
        card.exchange(apdus.select(s.aid))
        raise TerminalCheckFailed("the probe is not a zero-value load: not passed to the card")
    journal.write(txn, "probe-command", probe_counter=zero.online_counter,
                  probe_s2=probe.s2.hex(), probe_date=probe.date.hex(),
                  probe_time=probe.time.hex())
    tac = call(card, apdus.credit_for_load(probe.date, probe.time, probe.s2),
               "CREDIT FOR LOAD (zero-value probe)")
    journal.write(txn, "probe-loaded", probe_s3=tac.hex())
    return _send_probe_result(s, http, journal, tac, balance)


def _send_probe_result(s: _LoadSession, http: httpx.Client, journal: Journal, tac: bytes,
                       balance: int) -> LoadOutcome:
    """The card's TAC for the probe: the load server decides. Undecided (409) leaves the load
    open in the journal, and raises."""
    txn = s.params["txn_id"]
    body = M.build(L.LoadProbeResult, {"card_sw": SW.OK, "s3": tac})
    try:
        answer = s.post(http, "/v1/load/probe", L.LOAD_PROBE_RESULT, body)
    except PaymentRefused as exc:
        if exc.status == 409 and "undecided" in exc.reason:
            journal.write(txn, "undecided", reason=exc.reason)
        raise
    return _answered(s, http, journal, answer, balance)


def _send_result(s: _LoadSession, http: httpx.Client, journal: Journal, s3: bytes,
                 balance: int) -> LoadOutcome:
    """The card's S3: the load was loaded."""
    body = M.build(L.LoadResult, {
        "result": L.RESULT_LOADED, "card_sw": SW.OK, "s3": s3, "online_counter": 0,
        "balance": 0, "random": bytes(4), "s1": bytes(4)})
    return _answered(s, http, journal, s.post(http, "/v1/load/result", L.LOAD_RESULT, body),
                     balance)


def _answered(s: _LoadSession, http: httpx.Client, journal: Journal, body: bytes,
              balance: int) -> LoadOutcome:
    answer = M.parse(L.LoadAnswer, body, "load answer")
    journal.write(s.params["txn_id"], "load-confirmed", confirmation=answer.confirmation.hex(),
                  outcome=answer.outcome, reason=answer.reason)
    return _register(s, http, journal, answer.outcome, answer.reason, answer.confirmation,
                     balance)


def _register(s: _LoadSession, http: httpx.Client, journal: Journal, outcome: int, reason: str,
              confirmation: bytes, balance: int) -> LoadOutcome:
    """Step 891: carry the confirmation to the bank's status URL."""
    txn = s.params["txn_id"]
    s.round_trips += 1
    response = http.post(s.params["status_url"], content=M.build(L.BankConfirmation, {
        "version": M.VERSION, "txn_id": s.txn_id, "confirmation": confirmation}),
        headers={"Content-Type": "application/octet-stream"},
        extensions=RETRY_SAFE)  # registered already: 409, taken as done
    try:
        bank = response.json()
    except ValueError:
        bank = {"reason": response.text[:200]}
    if response.status_code not in (200, 409):  # 409: registered before an interruption
        raise PaymentRefused("bank", response.status_code, str(bank.get("reason")),
                             str(response.url))
    journal.write(txn, "load-done", bank=bank)
    loaded = outcome == L.OUTCOME_LOADED
    return LoadOutcome(
        txn_id=txn, outcome="loaded" if loaded else "not loaded", amount=s.amount,
        currency_exponent=int(s.params.get("currency_exponent", 0)), balance_before=balance,
        balance_after=balance + (s.amount if loaded else 0), reason=reason, bank=bank,
        round_trips=s.round_trips)


def resume_loads(card: Reader, *, journal: Journal, http: httpx.Client,
                 aid: bytes = P.DEFAULT_IEP_AID) -> list[dict[str, Any]]:
    """Finish every unfinished load of the card whose purse is at ``aid``, asking the card what
    happened: :func:`svcard.host.load.resume.resume_loads`, kept here for this module's
    callers (another system may import a system's ``client`` only)."""
    from .resume import resume_loads as finish  # resume.py builds on this module
    return finish(card, journal=journal, http=http, aid=aid)

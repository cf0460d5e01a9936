"""The client terminal (seed steps 608-640): pay a merchant's checkout with a purse card.

It reads the card while emulating the PSAM's side, checks currency, expiry and balance before
going online, packs one draw request, checks that the debit command keeps the merchant's
amount, lets the card debit itself, returns the card's answer (FIG. 5/6) or compares its MAC2
(FIG. 7), forwards the confirmation to the merchant and returns the goods. Every step is in the
local journal first; :func:`resume` finishes what an interruption left, or proves with GET
TRANSACTION PROVE that the card was never debited.

The merchant chooses the confirmation variant. FIG. 7 (the client compares the card's MAC2)
trusts the client, so only a registered client terminal may use it: it names itself at
checkout (``?terminal=ID``) and signs its confirmation with its Ed25519 key
(:class:`ClientTerminal`). A client without a key never asks for FIG. 7.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from ...protocols import messages as M
from ...protocols import purse as P
from ...protocols import secure
from ...protocols import sw as SW
from ...reader import Reader
from ..terminal import apdus
from ..terminal.journal import Journal, select_entry_purse
from ..terminal.online import RETRY_SAFE, PaymentRefused
from ..terminal.purse import (
    Declined,
    TerminalCheckFailed,
    call,
    card_uid,
    prove,
    read_log,
    select_purse,
    verify_pin_if_needed,
)
from .client_terminal import ClientTerminal, checkout_request, terminal_named


@dataclass
class PaymentOutcome:
    txn_id: str
    variant: str
    amount: int
    currency_exponent: int
    balance_before: int
    balance_after: int
    goods: str
    item: str
    receipt: dict[str, Any]
    round_trips: int
    steps: list[str] = field(default_factory=list)
    resumed: bool = False
    proof_uploads: int = 0
    proven: bool = True   # False: FIG. 7, the merchant is paid once the card's proof arrives

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Session:
    """One payment's keys and counters, rebuilt from checkout parameters or the journal."""

    def __init__(self, params: dict[str, Any], terminal: ClientTerminal | None = None) -> None:
        self.params = params
        self.terminal = terminal
        self.merchant_id = bytes.fromhex(params["merchant_id"])
        self.txn_id = bytes.fromhex(params["txn_id"])
        self.tsk = bytes.fromhex(params["tsk"])
        self.etsk = bytes.fromhex(params["etsk"])
        self.variant = M.VARIANTS[params["variant"]]
        self.payment_url = params["payment_url"].rstrip("/")
        self.round_trips = 0
        self.proof_uploads = 0     # FIG. 7/8: after the goods, not on the purchase's path

    def post(self, http: httpx.Client, path: str, msg_type: int, body: bytes) -> bytes:
        request = M.seal_envelope(msg_type, self.merchant_id, self.txn_id, self.etsk, self.tsk,
                                  body)
        self.round_trips += 1
        response = http.post(self.payment_url + path, content=request,  # same txn, same answer
                             headers={"Content-Type": "application/octet-stream"},
                             extensions=RETRY_SAFE)
        if response.status_code != 200:
            raise PaymentRefused.answer("payment server", response)
        env, header = M.split_envelope(response.content)
        if (env.merchant_id, env.txn_id) != (self.merchant_id, self.txn_id):
            raise PaymentRefused("payment server", 200, "answer for another transaction")
        return secure.open_sealed(self.tsk, env.body, header, "payment server answer")


# the header the merchant makes an order for (merchant/server.py CLIENT_HEADER): a browser
# cannot send it cross-site without a CORS preflight, so no third-party page can make orders
CLIENT_HEADER = {"X-Svcard-Client": "1"}
MAX_CHECKOUT = 16384        # bytes: a checkout's parameters are a few hundred
CHECKOUT_SECONDS = 30.0     # the merchant's whole answer within this


def read_capped(http: httpx.Client, method: str, url: str, *, who: str, limit: int,
                seconds: float, **kwargs: Any) -> httpx.Response:
    """The answer to a request, read as it comes: at most ``limit`` bytes and ``seconds`` in
    all (:class:`TerminalCheckFailed` naming ``who`` beyond either), never read whole."""
    deadline = time.monotonic() + seconds
    got = bytearray()
    with http.stream(method, url, **kwargs) as response:
        for chunk in response.iter_bytes():
            got += chunk
            if len(got) > limit:
                raise TerminalCheckFailed(f"the {who}'s answer is longer than {limit} bytes: "
                                          "not read further, nothing paid")
            if time.monotonic() > deadline:
                raise TerminalCheckFailed(f"the {who}'s answer did not end within "
                                          f"{seconds:g} s: not read further, nothing paid")
    headers = [(k, v) for k, v in response.headers.multi_items()   # (the bytes are decoded)
               if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
    return httpx.Response(response.status_code, headers=headers, content=bytes(got),
                          request=response.request)


def fetch_checkout(http: httpx.Client, url: str,
                   terminal: ClientTerminal | None = None) -> dict[str, Any]:
    """Ask the merchant for a new order (seed step 606): ``POST`` the checkout URL, the one a
    person opens in a browser to see its page. A busy shop (503: no order made) is asked again.
    The answer is read at most :data:`MAX_CHECKOUT` bytes within :data:`CHECKOUT_SECONDS`."""
    response = read_capped(http, "POST", url, who="merchant", limit=MAX_CHECKOUT,
                           seconds=CHECKOUT_SECONDS, extensions=RETRY_SAFE,
                           headers={"Accept": "application/json", **CLIENT_HEADER})
    if response.status_code != 200:
        raise PaymentRefused.answer("merchant", response)
    params: Any = None
    with contextlib.suppress(ValueError):
        params = response.json()
    if not isinstance(params, dict):
        raise TerminalCheckFailed("the merchant's checkout answer is not a JSON object")
    for key in ("amount", "currency_code", "payment_url", "txn_id", "merchant_id", "status_url",
                "variant", "tsk", "etsk", "terminal_id"):
        if key not in params:
            raise TerminalCheckFailed(f"the checkout parameters lack {key!r}")
    if params["variant"] not in M.VARIANTS:
        raise TerminalCheckFailed(f"unknown confirmation variant {params['variant']!r}")
    if params["variant"] == "fig7" and (terminal is None or str(
            params.get("client_terminal", "")).upper() != terminal.terminal_id.hex().upper()):
        raise TerminalCheckFailed("the merchant chose FIG. 7, which needs this client's "
                                  "registered terminal key: not paying")
    return params


def pay(checkout_url: str, card: Reader, *, journal: Journal, http: httpx.Client,
        pin: str | None = None, purse: int = P.PURSE_EP,
        when: dt.datetime | None = None, terminal: ClientTerminal | None = None,
        aid: bytes = P.DEFAULT_IEP_AID) -> PaymentOutcome:
    """Pay the merchant's checkout with the purse at ``aid`` (journalled, so that a resume
    selects the same purse)."""
    url, terminal = checkout_request(checkout_url, terminal)
    params = fetch_checkout(http, url, terminal)
    s = _Session(params, terminal)
    amount = int(params["amount"])
    txn = params["txn_id"]
    # 608: read the card and check it before going online
    info = select_purse(card, aid)
    info.check_dates((when or dt.datetime.now()).date())
    currency = info.known_currency("pay an order in a currency")
    if currency != params["currency_code"]:
        raise TerminalCheckFailed(f"the card holds currency {currency}, the "
                                  f"merchant asks for {params['currency_code']}")
    verify_pin_if_needed(card, purse, pin)
    uid = card_uid(card)   # before INITIALIZE: any other command would end its session
    terminal_id = bytes.fromhex(params["terminal_id"])
    init = P.InitForPurchaseAnswer.parse(call(
        card, apdus.initialize(P.INIT_PURCHASE, purse, 1, amount, terminal_id),
        "INITIALIZE FOR PURCHASE"))  # the card itself refuses an amount above its balance (9401)
    txn_type = P.TYPE_EP_PURCHASE if purse == P.PURSE_EP else P.TYPE_ED_PURCHASE
    draw = M.build(M.DrawRequest, {
        "issuer_id": bytes.fromhex(info.issuer_id), "card_serial": info.serial_bytes,
        "algorithm_id": init.algorithm_id, "key_version": init.key_version,
        "expiry_date": bytes.fromhex(info.expiry_date), "balance": init.balance,
        "currency_code": currency, "currency_exponent": info.currency_exponent or 0,
        "purse": purse, "offline_counter": init.offline_counter, "amount": amount,
        "random": init.random, "txn_type": txn_type, "uid": uid})
    journal.write(txn, "draw", params=params, card_serial=info.app_serial,
                  aid=aid.hex().upper(), counter=init.offline_counter, txn_type=txn_type,
                  balance=init.balance)
    # 610-616: one draw request, one debit command
    debit_bytes = s.post(http, "/v1/draw", M.DRAW_REQUEST, draw)
    debit = M.parse(M.DebitCommand, debit_bytes, "debit command")
    # 618: the debit must be for the merchant's own amount
    if debit.amount != amount:
        journal.write(txn, "refused", reason="debit command amount changed in transit")
        raise TerminalCheckFailed(f"the debit command asks {debit.amount}, the merchant "
                                  f"asked {amount}: refused, the card was not debited")
    journal.write(txn, "debit-sent", debit=debit_bytes.hex())
    answer = card.exchange(apdus.debit_for_purchase(debit.terminal_txn_number, debit.date,
                                                    debit.time, debit.mac1))
    if not answer.ok:
        journal.write(txn, "card-refused", card_sw=answer.sw)
        if s.variant in (M.FIG5_PSAM_COMPARES, M.FIG6_SERVER_COMPARES):
            s.post(http, "/v1/debit-response", M.DEBIT_RESPONSE, M.build(
                M.DebitResponse, {"card_sw": answer.sw, "tac": bytes(4), "mac2": bytes(4)}))
        journal.write(txn, "refused", reason=f"card answered {answer.sw:04X}")
        raise Declined("DEBIT FOR PURCHASE", answer.sw)
    card_answer = P.DebitForPurchaseAnswer.parse(answer.data)
    journal.write(txn, "debited", tac=card_answer.tac.hex(), mac2=card_answer.mac2.hex())
    outcome = _finish(s, http, journal, debit, card_answer.mac2, card_answer.tac)
    outcome.balance_before = init.balance
    outcome.balance_after = init.balance - amount
    return outcome


def _finish(s: _Session, http: httpx.Client, journal: Journal, debit: Any, mac2: bytes,
            tac: bytes) -> PaymentOutcome:
    """From a debited card to released goods (also the way back in after an interruption)."""
    txn = s.params["txn_id"]
    amount = int(s.params["amount"])
    card_mac2, sealed_expected, card_tac, signature = bytes(4), b"", bytes(4), b""
    terminal_id = bytes(8)
    if s.variant in (M.FIG5_PSAM_COMPARES, M.FIG6_SERVER_COMPARES):
        result = M.parse(M.PaymentResult, s.post(http, "/v1/debit-response", M.DEBIT_RESPONSE,
                                                 M.build(M.DebitResponse, {
                                                     "card_sw": SW.OK, "tac": tac,
                                                     "mac2": mac2})), "payment result")
        c = M.parse(M.DebitResult, secure.open_sealed(
            s.tsk, result.result_c, M.result_c_aad(s.merchant_id, s.txn_id), "debit result C"),
            "debit result C")
        if c.status not in (M.STATUS_OK, M.STATUS_AUTHENTICATED):
            journal.write(txn, "refused", reason=c.reason)
            raise PaymentRefused("payment server", 200, c.reason)
        result_m = result.result_m
    elif s.variant == M.FIG7_CLIENT_COMPARES:
        if mac2 != debit.expected_mac2:  # the client compares (one round trip)
            journal.write(txn, "refused", reason="card MAC2 is not the expected one")
            raise PaymentRefused("client", 0, "the card's MAC2 is not the one the PSAM "
                                              "expected: no confirmation sent")
        if s.terminal is None:
            raise TerminalCheckFailed("FIG. 7 needs this client's registered terminal key")
        result_m, card_mac2, card_tac = debit.result_m, mac2, tac
        terminal_id = s.terminal.terminal_id
        signature = s.terminal.sign_confirmation(s.merchant_id, s.txn_id, result_m, mac2, tac)
    else:  # FIG. 8: the merchant compares
        result_m, card_mac2, sealed_expected = debit.result_m, mac2, debit.sealed_expected_mac2
    journal.write(txn, "confirmed")
    confirmation = M.build(M.Confirmation, {
        "version": M.VERSION, "variant": s.variant, "txn_id": s.txn_id, "result_m": result_m,
        "card_mac2": card_mac2, "sealed_expected_mac2": sealed_expected,
        "terminal_id": terminal_id, "tac": card_tac, "signature": signature})
    s.round_trips += 1
    response = http.post(s.params["status_url"], content=confirmation,
                         headers={"Content-Type": "application/octet-stream"},
                         extensions=RETRY_SAFE)  # the same confirmation again: the same goods
    body = response.json() if response.headers.get("content-type", "").startswith(
        "application/json") else {}
    if response.status_code != 200 or not body.get("released"):
        reason = str(body.get("reason", response.text[:200]))
        if response.status_code < 500:  # a 5xx decided nothing: the payment stays open
            journal.write(txn, "refused", reason=reason)
        raise PaymentRefused("merchant", response.status_code, reason, str(response.url))
    journal.write(txn, "goods", goods=body.get("goods"))
    if s.variant in (M.FIG7_CLIENT_COMPARES, M.FIG8_MERCHANT_COMPARES):
        _send_proof(s, http, mac2, tac)
    journal.write(txn, "done", goods=body.get("goods"), item=body.get("item", ""),
                  receipt=body.get("receipt", {}))
    return PaymentOutcome(
        txn_id=txn, variant=s.params["variant"], amount=amount,
        currency_exponent=int(s.params.get("currency_exponent", 0)), balance_before=0,
        balance_after=0, goods=str(body.get("goods")), item=str(body.get("item", "")),
        receipt=body.get("receipt", {}), round_trips=s.round_trips,
        proof_uploads=s.proof_uploads, proven=bool(body.get("proven", True)))


def _send_proof(s: _Session, http: httpx.Client, mac2: bytes, tac: bytes) -> None:
    """FIG. 7/8, after the goods: the card's MAC2 and TAC to the payment server, for clearing
    (the PSAM was released before the card answered, so only the client has them)."""
    request = M.seal_envelope(M.DEBIT_PROOF, s.merchant_id, s.txn_id, s.etsk, s.tsk,
                              M.build(M.DebitResponse, {"card_sw": SW.OK, "tac": tac,
                                                        "mac2": mac2}))
    s.proof_uploads += 1
    response = http.post(s.payment_url + "/v1/proof", content=request,  # again: 204 again
                         headers={"Content-Type": "application/octet-stream"},
                         extensions=RETRY_SAFE)
    if response.status_code != 204:
        raise PaymentRefused.answer("payment server", response)


def debit_in_log(card: Reader, txn_type: int, counter: int,
                 aid: bytes = P.DEFAULT_IEP_AID) -> bool | None:
    """When GET TRANSACTION PROVE knows nothing of a debit at ``counter`` (it keeps the card's
    last transaction only), the card's log decides: a purchase record at that counter -> True
    (debited; its proof was replaced by a later transaction); the card's counter still at it ->
    False (never debited); the log no longer reaching back that far -> None (unknown)."""
    records = read_log(card, aid)
    log = [e for e in records if e.txn_type == txn_type]
    if any(e.counter == counter for e in log):
        return True
    if (log and max(e.counter for e in log) < counter) or (
            not log and len(records) < P.LOG_RECORDS):
        return False
    return None


def resume(card: Reader, *, journal: Journal, http: httpx.Client,
           terminal: ClientTerminal | None = None,
           aid: bytes = P.DEFAULT_IEP_AID) -> list[dict[str, Any]]:
    """Finish or close every unfinished payment of the card whose purse is at ``aid`` found in
    the journal (a FIG. 7 one is confirmed with ``terminal``, or this process's key for the
    terminal it named). Each is finished on the purse it was started with (its journalled AID)."""
    info = select_purse(card, aid)
    selected = aid
    report = []
    for entry in journal.unfinished(info.app_serial):
        if entry.get("kind") == "load":
            continue  # loads: see svcard.host.load.client.resume_loads
        txn, state = entry["txn_id"], entry["state"]
        named = str(entry["params"].get("client_terminal", ""))
        own = (terminal if terminal is not None
               and terminal.terminal_id.hex().upper() == named.upper()
               else terminal_named(named))
        s = _Session(entry["params"], own)
        if state == "goods":  # paid and released; the proof for clearing did not go out
            _send_proof(s, http, bytes.fromhex(entry["mac2"]), bytes.fromhex(entry["tac"]))
            journal.write(txn, "done")
            report.append({"txn_id": txn, "outcome": "completed (proof sent)"})
            continue
        if state == "draw":  # the card never saw a DEBIT
            journal.write(txn, "abandoned", reason="interrupted before the card was debited")
            report.append({"txn_id": txn, "outcome": "abandoned: never debited"})
            continue
        debit = M.parse(M.DebitCommand, bytes.fromhex(entry["debit"]), "journal debit")
        if state in ("debit-sent", "card-refused"):
            try:
                selected = select_entry_purse(card, entry, selected)
            except (Declined, TerminalCheckFailed) as exc:
                report.append({"txn_id": txn, "outcome": f"not finished: {exc}"})
                continue
            proof = prove(card, entry["txn_type"], entry["counter"])
            if proof is None:
                debited = debit_in_log(card, int(entry["txn_type"]), int(entry["counter"]),
                                       selected)
                if debited is False:
                    journal.write(txn, "abandoned", reason="the card's counter never passed "
                                                           "this debit: not debited")
                    report.append({"txn_id": txn, "outcome": "abandoned: the card proves it "
                                                              "was not debited"})
                    continue
                why = ("the card's log shows this debit, but its proof (MAC2, TAC) was "
                       "replaced by a later transaction" if debited else
                       "the card's counter moved past this debit and its log no longer says "
                       "whether it happened")
                journal.write(txn, "unproven", reason=why)
                report.append({"txn_id": txn, "outcome": f"unproven: {why}; not abandoned: "
                               f"the payment server holds the PSAM record, ask the merchant "
                               f"about transaction {txn}"})
                continue
            mac2, tac = proof
            journal.write(txn, "debited", tac=tac.hex(), mac2=mac2.hex(), proven=True)
        else:
            mac2, tac = bytes.fromhex(entry["mac2"]), bytes.fromhex(entry["tac"])
        try:
            outcome = _finish(s, http, journal, debit, mac2, tac)
        except PaymentRefused as exc:
            if exc.who == "merchant" and exc.status == 409:
                # released to another confirmation (the merchant gives the goods again only
                # to the exact one that released them): paid, the goods not known here
                if s.variant in (M.FIG7_CLIENT_COMPARES, M.FIG8_MERCHANT_COMPARES):
                    _send_proof(s, http, mac2, tac)
                journal.write(txn, "done", reason=exc.reason)
                report.append({"txn_id": txn, "outcome": "completed earlier"})
                continue
            if exc.status >= 500:  # nothing decided: kept for the next resume
                report.append({"txn_id": txn, "outcome": f"still pending: {exc}"})
                continue
            report.append({"txn_id": txn, "outcome": f"refused: {exc.reason}"})
            continue
        except TerminalCheckFailed as exc:  # FIG. 7 without this terminal's key: kept for later
            report.append({"txn_id": txn, "outcome": f"not finished: {exc}"})
            continue
        outcome.resumed = True   # the goods are in the journal's "done" line too
        report.append({"txn_id": txn, "outcome": "completed", "goods": outcome.goods,
                       "item": outcome.item, "receipt": outcome.receipt})
    return report

"""The customer agent's side of the purse desk (issue 15 point 7; the desk is ``purse.py``):
the card pays a session's deposit by one seed-002 purchase and takes the unspent rest back by
one seed-002 load. (It lives beside the desk because ``host/trade/`` is at its module limit.)

The session key of a purse-funded session is derived from the customer's own key and the
initiation's ``txn`` (HKDF-SHA256): a customer agent stopped after the card paid (the account
manager down, an answer lost) makes the same key again from what the payment's journal and
the desk's receipt hold, so :func:`resume` finishes the payment and opens the session that
the card paid for, never a second one. A new ``open`` would be a new order and a new payment:
after an interruption, resume instead.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import click
import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ....reader import Reader, ReaderError
from ...kit.command_line import EXIT_DECLINED, EXIT_NETWORK, emit, fail, json_option
from ...load import client as load_client
from ...pay import client as pay_client
from ...terminal.journal import Journal
from ...terminal.purse import TerminalError
from ...terminal.reader_specs import open_reader
from .. import customer as C
from .. import signing as S
from ..money import Amount
from .purse import load_secret


def session_key(customer_key: bytes, txn: str) -> bytes:
    """The session's Ed25519 private key, made again from the customer's key and ``txn``."""
    return HKDF(hashes.SHA256(), 32, None,
                f"svcard-trade-purse-session/1|{txn}".encode()).derive(customer_key)


def open_session(http: httpx.Client, account_url: str, account_public: bytes,
                 customer: str, customer_key: bytes, merchant: str, merchant_url: str,
                 operator: str, deposit: Amount, card: Reader, journal: Journal,
                 unit: int | None = None) -> C.Session:
    """Open a session whose deposit the card pays: the signed initiation makes a payment
    order at the account manager, seed 002's purchase pays it (journalled), and the desk's
    receipt carries the signed ``opened`` answer."""
    txn = secrets.token_hex(16)
    key = session_key(customer_key, txn)
    body, headers = C.initiation(customer, customer_key, S.public_of(key), merchant, operator,
                                 deposit, "session", 0, txn=txn)
    answer = http.post(f"{account_url}/v1/purse/orders", content=body, headers=headers)
    if answer.status_code != 200:
        raise C.TradeError(f"the account manager refused the purse order (HTTP "
                           f"{answer.status_code}): {C.reason_of(answer)}")
    order = answer.json()
    if order.get("amount") != deposit.minor or order.get("currency") != deposit.code:
        raise C.TradeError("the account manager ordered another amount than the deposit")
    try:
        paid = pay_client.pay(str(order["checkout_url"]), card, journal=journal, http=http)
    except (TerminalError, httpx.HTTPError) as exc:
        raise C.TradeError(f"the card payment of order {order['order']} did not finish: "
                           f"{exc}; if the card was debited, resume (svcard session open "
                           "--purse ... --resume), never open again") from None
    return _opened(http, account_url, account_public, customer_key, merchant, merchant_url,
                   deposit, paid.receipt, unit)


def resume(http: httpx.Client, account_url: str, account_public: bytes, customer_key: bytes,
           merchant: str, merchant_url: str, deposit: Amount, card: Reader,
           journal: Journal, unit: int | None = None) -> C.Session:
    """Finish an interrupted purse payment from the journal and open its session."""
    for report in pay_client.resume(card, journal=journal, http=http):
        if report.get("outcome") == "completed" and "order" in report.get("receipt", {}):
            return _opened(http, account_url, account_public, customer_key, merchant,
                           merchant_url, deposit, report["receipt"], unit)
    raise C.TradeError("no interrupted purse payment of this card in the journal")


def _opened(http: httpx.Client, account_url: str, account_public: bytes,
            customer_key: bytes, merchant: str, merchant_url: str, deposit: Amount,
            receipt: dict[str, Any], unit: int | None) -> C.Session:
    if "opened" not in receipt:
        raise C.TradeError(f"order {receipt.get('order')}: {receipt.get('refused')} "
                           f"({receipt.get('load_due')} due back: svcard session close "
                           "--purse)")
    content = str(receipt["opened"]).encode()
    txn = str(json.loads(content).get("txn", ""))
    return C.opened_session(http, account_url, account_public, content,
                            str(receipt["signature"]), merchant, merchant_url, deposit,
                            session_key(customer_key, txn), unit, str(receipt["order"]))


def rest(http: httpx.Client, s: C.Session) -> int | None:
    """The rest of the deposit due back (the clearing's ``returned``), None: not cleared."""
    answer = http.get(f"{s.account_url}/v1/sessions/{s.session}/clearing",
                      params={"pseudonym": s.pseudonym})
    if answer.status_code == 404:
        return None
    if answer.status_code != 200:
        raise C.TradeError(f"no clearing from the account manager (HTTP "
                           f"{answer.status_code}): {C.reason_of(answer)}")
    return int(json.loads(answer.json()["clearing"])["returned"])


def load_rest(http: httpx.Client, s: C.Session, card: Reader,
              journal: Journal) -> load_client.LoadOutcome | None:
    """Load the rest onto the card that paid the deposit (seed 002's load, the account
    manager in the bank's role); None when nothing is due."""
    amount = rest(http, s)
    if amount is None:
        raise C.TradeError(f"session {s.session} is not cleared yet: load its rest later")
    if amount == 0 or not s.purse_order:
        return None
    try:
        return load_client.load(f"{s.account_url}/v1/purse/bank", card, account=s.purse_order,
                                secret=load_secret(s.session_key, s.purse_order),
                                amount=amount, journal=journal, http=http)
    except TerminalError as exc:
        raise C.TradeError(f"the rest ({amount}) was not loaded: {exc}") from None


# --- the command line: svcard session open --purse, svcard session load-rest --------------

def purse_options(f: Any) -> Any:
    """``--purse SPEC`` (the card that pays the deposit), ``--journal``, ``--resume``."""
    f = click.option("--resume", is_flag=True, help="Finish a purse payment an interruption "
                     "left (from --journal) and open its session; never pays again.")(f)
    f = click.option("--journal", type=click.Path(path_type=Path), default=Path(
        "svcard-journal.jsonl"), show_default=True, help="The card payments' journal.")(f)
    return click.option("--purse", "card_spec", default=None, help="Pay the deposit with "
                        "this purse card (a reader spec, e.g. virtual:card.json).")(f)


def open_any(http: httpx.Client, card_spec: str | None, journal: Path, again: bool,
             account_url: str, account_id: str, account_public: bytes, customer: str,
             customer_key: bytes, merchant: str, merchant_url: str, operator: str,
             deposit: Amount, unit: int | None) -> C.Session:
    """``svcard session open``: on credit, or paid by the card at ``card_spec``."""
    if card_spec is None:
        if again:
            raise C.TradeError("--resume finishes a purse payment: give --purse")
        return C.open_session(http, account_url, account_id, account_public, customer,
                              customer_key, merchant, merchant_url, operator, deposit,
                              unit=unit)
    try:
        with open_reader(card_spec) as card:
            if again:
                return resume(http, account_url, account_public, customer_key, merchant,
                              merchant_url, deposit, card, Journal(journal), unit)
            return open_session(http, account_url, account_public, customer, customer_key,
                                merchant, merchant_url, operator, deposit, card,
                                Journal(journal), unit)
    except (ReaderError, TerminalError) as exc:
        raise C.TradeError(f"{card_spec}: {exc}") from None


def register(session: click.Group) -> None:
    session.add_command(load_rest_cmd)


@click.command("load-rest")
@click.option("--state", required=True, type=click.Path(path_type=Path),
              help="The session file of a purse-funded session.")
@click.option("--purse", "card_spec", required=True, help="The card that paid the deposit.")
@click.option("--journal", type=click.Path(path_type=Path),
              default=Path("svcard-journal.jsonl"), show_default=True)
@json_option
def load_rest_cmd(state: Path, card_spec: str, journal: Path, as_json: bool) -> None:
    """Load the unspent rest of a cleared purse-funded session back onto its card (one load;
    an interrupted one is finished by ``svcard load --resume``)."""
    try:
        s = C.load(state)
        with httpx.Client(timeout=30) as http, open_reader(card_spec) as card:
            out = load_rest(http, s, card, Journal(journal))
    except C.TradeError as exc:
        fail(str(exc), EXIT_DECLINED)
    except (ReaderError, TerminalError) as exc:
        fail(f"{card_spec}: {exc}", EXIT_DECLINED)
    except httpx.HTTPError as exc:
        fail(f"{type(exc).__name__}: {exc}", EXIT_NETWORK)
    if out is None:
        emit(as_json, {"session": s.session, "loaded": 0}, f"session {s.session}: nothing "
                                                           "to load back")
        return
    emit(as_json, out.to_json(), f"session {s.session}: {out.outcome} "
                                 f"{Amount(out.amount, s.currency)} onto the card (balance "
                                 f"{Amount(out.balance_after, s.currency)})")

"""The goods system's part of ``svcard audit`` (seed 000): digital goods paid from a bank
account and written onto cards close to the minor unit, per currency.

Read (only) from the parties' databases (:mod:`svcard.host.goods.records`; which party a
database is comes from its tables): the institution's payments (each a debit of an account;
``refunded``: credited back), the fulfilment server's goods, and when given the payment
server's and the merchant's orders. Per order:

* every bank debit has its good at the fulfilment server, of the same amount, currency and
  card; one the payment server has not handed on yet (it was down, or the debit is still
  ``authorising`` there) is listed, and a finding past the maximum age; one the payment server
  says the fulfilment server *kept* is a finding at once (a paid good vanished);
* every good has a bank debit (no good without payment);
* every good ends written on its card or refunded, never both: ``refunded`` needs the bank's
  credit; a good ``written`` (or still to write) whose payment was credited back is a
  finding; ``written`` needs a write handed out (``writes`` >= 1); a good still ``pending``
  past its pick-up deadline (plus :data:`REFUND_GRACE_MS`, the refund clock's slack) is a
  finding; one ``issued`` past its deadline is listed (only its pick-up completes it, as the
  write may be on the card) and a finding past the deadline plus the maximum age;
* no good twice: one good id per card among the goods, and, with cards read (``card_goods``),
  one record per good id on each card, every one of the merchants' goods on a card paid for
  and not refunded, every good marked ``written`` for a card read found on it, and each as it
  was sold, to the minor unit and the ride (only its status, and a transit token's rides left
  going down, change with use);
* the payment server's and the merchant's ``paid`` / ``refunded`` agree with the institution.

Sums per currency: bank debits = goods kept + paid goods in transit; bank debits - bank
credits = goods written + goods open + paid in transit; bank credits = goods refunded.

Goods the purse paid (one composite purchase: the record and the debit committed by the card
together; the fulfilment server's ``goods_purse_goods``, the payment server's card sessions
``goods_purse_sessions``, read when the databases have them): a good ``written`` needs its
order's debit proved (a session ``committed`` with the card's MAC2, when the payment server's
database is given) and the order ``purse_paid``; a proved debit needs its good ``written`` (one
the fulfilment server was not yet told of is listed, a finding past the maximum age); an order
is debited at most once; a good is never paid both ways; a ``capp`` good still open past its
deadline plus :data:`REFUND_GRACE_MS` is a finding; a card read holding a purse good that is
not ``written`` is a finding (the purse paid, the books do not know it). Sums: purse debits
proved = purse goods written (+ proved, not yet told).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ...protocols import goods as G
from ...reader import Reader
from ..goods import records as goods_records
from ..terminal.capp import read_goods
from ..terminal.purse import select_purse

REFUND_GRACE_MS = 10 * 60 * 1000   # the refund clock ticks every 30 s; a stop may delay it
OPEN = ("pending", "issued", "refunding")
# the purse path's tables (records.py reads them when a party's database has them)
PURSE_TABLES = {"payment": "goods_purse_sessions", "fulfil": "goods_purse_goods"}
SESSIONS = ("goods_purse_sessions", "goods_capp_sessions")   # many per order: keyed by id


@dataclass
class GoodsBooks:
    figures: dict[str, int] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    discrepancies: list[str] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    read: int = 0


def card_goods(readers: list[Reader], aid: bytes) -> dict[str, list[bytes]]:
    """Card serial (upper-case hex) -> the goods records it holds, read through each reader."""
    out = {}
    for reader in readers:
        serial = select_purse(reader, aid).app_serial.upper()
        out[serial] = [e.record for e in read_goods(reader, aid)]
    return out


def _check(name: str, left: int, right: int) -> dict[str, Any]:
    return {"name": name, "left": left, "right": right, "ok": left == right}


def _merged(dbs: tuple[str, ...], out: GoodsBooks) -> dict[str, dict[str, dict[str, Any]]]:
    """Per party's table name, rows by order (accounts by account id; the purse sessions by
    their id)."""
    tables: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for url in dbs:
        _role, found = goods_records.books(url)
        for name, rows in found.items():
            tables.setdefault(name, {})   # read, though empty (no bank payment: purse only)
            for row in rows:
                out.read += 1
                key = str(row["id"]) if name in SESSIONS else \
                    str(row.get("order_ref") or row.get("account") or row.get("device"))
                if key in tables[name]:
                    out.discrepancies.append(f"goods: {key} appears twice in {name}")
                tables[name][key] = row
    return tables


def audit_goods(goods_dbs: tuple[str, ...], *, now: int, max_age_ms: int,
                card_goods: dict[str, list[bytes]] | None = None) -> GoodsBooks:
    """The goods system's books (see the module text); empty when ``goods_dbs`` is."""
    out = GoodsBooks()
    if not goods_dbs:
        return out
    t = _merged(goods_dbs, out)
    bank, goods = t.get("goods_bank_payments"), t.get("goods_goods")
    if bank is None or goods is None:
        out.discrepancies.append("goods: the audit needs the institution's and the "
                                 "fulfilment server's databases (--goods-db, each party's)")
        return out
    accounts = t.get("goods_accounts", {})
    payment = t.get("goods_payment_orders")
    merchant = t.get("goods_merchant_orders")
    sums: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    bad = out.discrepancies

    def listed(text: str, age: int, amount: int, order: str) -> None:
        out.pending.append({"order": order, "amount": amount, "age_ms": age,
                            "text": f"goods: {text}"})
        if age > max_age_ms:
            bad.append(f"goods: {text}: older than the maximum age")

    for order, pay in bank.items():
        cur, amount = int(pay["currency_code"]), int(pay["amount"])
        s = sums[cur]
        s["bank debits"] += amount
        if pay["state"] == "refunded":
            s["bank credits"] += amount
        good = goods.get(order)
        if good is None:
            p = payment.get(order) if payment is not None else None
            age = max(0, now - int(pay["created"]))
            if p is not None and p.get("answered"):
                bad.append(f"goods: payment {order} ({amount}) was handed to the fulfilment "
                           "server, which has no such good (a paid good vanished)")
            elif pay["state"] == "refunded":
                bad.append(f"goods: payment {order} ({amount}) was credited back, but no good "
                           "was ever kept for it")
            else:
                where = f"the payment server has it {p['state']}" if p else "no payment " \
                    "server database given"
                s["paid, in transit"] += amount
                listed(f"payment {order} ({amount}) debited, its good not yet at the "
                       f"fulfilment server ({where})", age, amount, order)
            continue
        _one_good(order, pay, good, accounts, s, now, max_age_ms, bad, listed)
    for order, good in goods.items():
        if order not in bank:
            bad.append(f"goods: good {order} ({good['amount']}, card {good['card']}) has no "
                       "payment at the institution (a good without payment)")
            sums[int(good["currency_code"])]["goods kept"] += int(good["amount"])
    purse_goods = t.get(PURSE_TABLES["fulfil"], {})
    _purse(purse_goods, t.get(PURSE_TABLES["payment"]), payment, goods, sums, now,
           max_age_ms, bad, listed)
    _twice(goods, purse_goods, card_goods, bad)
    if payment is not None:
        _parties_agree("payment server", payment, bank, bad)
    if merchant is not None:
        _parties_agree("merchant", merchant, bank, bad)
    for cur in sorted(sums):
        s = sums[cur]
        for name in ("bank debits", "bank credits", "goods kept", "goods written",
                     "goods open", "goods refunded", "paid, in transit", "purse debits",
                     "purse goods written", "purse debits, in transit"):
            out.figures[f"goods {cur:03d}: {name}"] = s[name]
        out.checks += [
            _check(f"goods {cur:03d}: bank debits = goods kept + paid in transit",
                   s["bank debits"], s["goods kept"] + s["paid, in transit"]),
            _check(f"goods {cur:03d}: bank debits - credits = written + open + in transit",
                   s["bank debits"] - s["bank credits"],
                   s["goods written"] + s["goods open"] + s["paid, in transit"]),
            _check(f"goods {cur:03d}: bank credits = goods refunded", s["bank credits"],
                   s["goods refunded"]),
            _check(f"goods {cur:03d}: purse debits proved = purse goods written + in transit",
                   s["purse debits"], s["purse goods written"] + s["purse debits, in transit"]),
        ]
    bad += [f"check failed: {c['name']} ({c['left']} != {c['right']})"
            for c in out.checks if not c["ok"]]
    return out


def _one_good(order: str, pay: dict[str, Any], good: dict[str, Any],
              accounts: dict[str, dict[str, Any]], s: dict[str, int], now: int,
              max_age_ms: int, bad: list[str], listed: Any) -> None:
    """A good and its bank payment: amounts, card, and how it ended."""
    amount, state, credited = int(good["amount"]), good["state"], pay["state"] == "refunded"
    name = f"good {order} ({amount}, card {good['card']})"
    s["goods kept"] += amount
    if (int(pay["amount"]), int(pay["currency_code"])) != (amount,
                                                           int(good["currency_code"])):
        bad.append(f"goods: {name}: the institution debited {pay['amount']} in currency "
                   f"{pay['currency_code']}")
    account = accounts.get(str(pay["account"]))
    if accounts and (account is None or account["card"] != good["card"]):
        bad.append(f"goods: {name}: paid from account {pay['account']}, which pays for "
                   f"another card")
    if state == "refunded":
        s["goods refunded"] += amount
        if not credited:
            bad.append(f"goods: {name} is refunded, but the institution never credited it "
                       "back (a refund with no bank credit)")
        return
    if state == "refunding":
        if credited:
            s["goods refunded"] += amount
            listed(f"{name}: credited back, the fulfilment server not yet told",
                   max(0, now - int(good["updated"])), amount, order)
        else:
            s["goods open"] += amount
            listed(f"{name}: being refunded", max(0, now - int(good["updated"])), amount,
                   order)
        return
    if credited:
        bad.append(f"goods: {name} is {state}, yet its payment was credited back (written "
                   "and refunded)")
    if state == "written":
        s["goods written"] += amount
        if int(good["writes"]) < 1:
            bad.append(f"goods: {name} is marked written, but no write of it was ever "
                       "handed out")
        return
    s["goods open"] += amount
    late = now - int(good["deadline"])
    if state == "pending" and late > REFUND_GRACE_MS:
        bad.append(f"goods: {name} is neither written nor refunded, {late // 1000} s past "
                   "its pick-up deadline")
    elif state == "issued" and late > 0:
        listed(f"{name}: its write was handed out, not confirmed; past its pick-up deadline "
               "(only its pick-up completes it)", late, amount, order)
    elif state not in OPEN:
        bad.append(f"goods: {name} is in an unknown state {state!r}")


def _purse(purse_goods: dict[str, dict[str, Any]], sessions: dict[str, dict[str, Any]] | None,
           payment: dict[str, dict[str, Any]] | None, goods: dict[str, dict[str, Any]],
           sums: dict[int, dict[str, int]], now: int, max_age_ms: int, bad: list[str],
           listed: Any) -> None:
    """Goods the purse paid: each written one's debit proved once, each proved debit's good
    written (see the module text)."""
    proved: dict[str, dict[str, Any]] = {}
    for session in (sessions or {}).values():
        if session["state"] != "committed":
            continue
        order = str(session["order_ref"])
        if order in proved:
            bad.append(f"goods: order {order} was debited from the purse twice (card "
                       f"{session['card']}, counters {proved[order]['counter']} and "
                       f"{session['counter']})")
            continue
        proved[order] = session
        row = (payment or {}).get(order)
        good = purse_goods.get(order)
        amount = int(row["amount"] if row else good["amount"] if good else 0)
        cur = int(row["currency_code"] if row else good["currency_code"] if good else 0)
        sums[cur]["purse debits"] += amount
        if row is None or row["state"] != "purse_paid":
            bad.append(f"goods: order {order}: its purse debit was proved, but the payment "
                       f"server has it {row['state'] if row else 'nowhere'}")
        if good is None or (session["told"] and good["state"] != "written"):
            bad.append(f"goods: order {order} ({amount}): the purse paid it (debit proved), "
                       f"but its good is {good['state'] if good else 'unknown'} at the "
                       "fulfilment server")
        elif good["state"] != "written":
            sums[cur]["purse debits, in transit"] += amount
            listed(f"order {order} ({amount}): paid by the purse, the fulfilment server not "
                   "yet told", max(0, now - int(session["updated"])), amount, order)
    for order, good in purse_goods.items():
        amount, cur = int(good["amount"]), int(good["currency_code"])
        name = f"purse good {order} ({amount}, card {good['card']})"
        if order in goods:
            bad.append(f"goods: {name} was also paid by the bank (paid twice)")
        if good["state"] == "written":
            sums[cur]["purse goods written"] += amount
            if sessions is None:
                sums[cur]["purse debits"] += amount   # no payment server's books to check
                continue
            proof = proved.get(order)
            if proof is None:
                bad.append(f"goods: {name} is marked written, but no purse debit of it was "
                           "proved (a good without payment)")
            elif str(proof["card"]) != str(good["card"]):
                bad.append(f"goods: {name}: its purse debit was proved on card "
                           f"{proof['card']}")
            row = (payment or {}).get(order)
            if row is not None and int(row["amount"]) != amount:
                bad.append(f"goods: {name}: the payment server's order is {row['amount']}")
        elif good["state"] == "capp" and now - int(good["deadline"]) > REFUND_GRACE_MS:
            bad.append(f"goods: {name} is still open, {(now - int(good['deadline'])) // 1000}"
                       " s past its deadline (never expired)")
        elif good["state"] not in ("capp", "expired"):
            bad.append(f"goods: {name} is in an unknown state {good['state']!r}")


def _twice(goods: dict[str, dict[str, Any]], purse_goods: dict[str, dict[str, Any]],
           card_goods: dict[str, list[bytes]] | None, bad: list[str]) -> None:
    """No good twice: in the books, and (cards read) on each card."""
    by_key: dict[tuple[str, str], str] = {}
    issuers = set()
    for order, good in [*goods.items(), *purse_goods.items()]:
        key = (str(good["card"]).upper(), str(good["record"])[4:36].upper())
        issuers.add(key[1][:16])
        if key in by_key:
            bad.append(f"goods: goods {by_key[key]} and {order} are the same good of card "
                       f"{key[0]}")
        by_key[key] = order
    for serial, records in sorted((card_goods or {}).items()):
        seen: set[str] = set()
        for record in records:
            gk = record[G.GOOD_KEY].hex().upper()
            if gk in seen:
                bad.append(f"goods: card {serial} holds good {gk} twice")
            seen.add(gk)
            bought = by_key.get((serial, gk))
            if gk[:16] not in issuers:
                continue   # another issuer's good (a terminal's composite purchase)
            if bought is None:
                bad.append(f"goods: card {serial} holds good {gk}, which no payment bought")
            elif bought in goods and goods[bought]["state"] in ("refunded", "refunding"):
                bad.append(f"goods: card {serial} holds good {gk}, whose payment is "
                           f"{goods[bought]['state']}")
            elif bought not in goods and purse_goods[bought]["state"] != "written":
                bad.append(f"goods: card {serial} holds good {gk}, paid by its purse, but the "
                           f"books have it {purse_goods[bought]['state']} (no debit proved)")
            if bought is not None:
                sold = (goods[bought] if bought in goods else purse_goods[bought])["record"]
                changed = _not_as_sold(bytes.fromhex(str(sold)), record)
                if changed:
                    bad.append(f"goods: card {serial} holds good {gk} not as it was sold: "
                               f"{changed}")
        for (card, gk), order in by_key.items():
            state = (goods[order] if order in goods else purse_goods[order])["state"]
            if card == serial and state == "written" and gk not in seen:
                bad.append(f"goods: good {order} is marked written, but card {serial} does "
                           "not hold it")


def _not_as_sold(sold: bytes, held: bytes) -> str:
    """How the record a card holds differs from the one sold, beyond what using it does (its
    status; a transit token's rides left going down); "" when it does not."""
    if len(held) != len(sold) or held[0] != sold[0] or held[2:26] != sold[2:26]:
        return "its kind, issuer, id or validity differ"
    if held[1] not in G.STATUS_NAMES:
        return f"status {held[1]:02X}"
    if sold[0] != G.TAG_TRANSIT:
        return "" if held[26:] == sold[26:] else "its value or body differ"
    if held[28:] != sold[28:]:
        return "its rides in total, fare or body differ"
    left, bought = int.from_bytes(held[26:28], "big"), int.from_bytes(sold[26:28], "big")
    return f"{left} rides left, {bought} bought" if left > bought else ""


def _parties_agree(who: str, rows: dict[str, dict[str, Any]],
                   bank: dict[str, dict[str, Any]], bad: list[str]) -> None:
    """The payment server's or merchant's ``paid`` / ``refunded`` orders and the bank's."""
    for order, row in rows.items():
        paid = bank.get(order)
        if row["state"] in ("paid", "refunded") and paid is None:
            bad.append(f"goods: the {who} has order {order} {row['state']}, but the "
                       "institution has no payment for it")
        elif paid is not None and row["state"] == "refunded" and paid["state"] != "refunded":
            bad.append(f"goods: the {who} has order {order} refunded, but the institution "
                       "never credited it back")
        elif paid is not None and row["state"] == "declined":
            bad.append(f"goods: the {who} has order {order} declined, but the institution "
                       "debited it")
        if paid is not None and int(row["amount"]) != int(paid["amount"]):
            bad.append(f"goods: the {who} has order {order} at {row['amount']}, the "
                       f"institution debited {paid['amount']}")

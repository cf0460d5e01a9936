"""The goods part of ``svcard demo`` (seed 000, issue 12): digital goods bought at the local
terminal by ONE composite (CAPP) purchase, the goods records and the purse's debit written by
the card in one step (transaction type 09); the goods the card holds listed (READ RECORD of its
goods files, as ``svcard terminal goods``); then one ride of the transit token used at a
validator (``svcard terminal redeem``): a composite purchase of the fare, 0 for a prepaid ride,
with the record's new ride count."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...card.keys import KeyEntry
from ...protocols import goods as G
from ...protocols import purse as P
from ...protocols import sw as SW
from ..goods.redeem import Choice, RedeemReceipt, redeem
from ..terminal.capp import GoodsWrite, capp_purchase, good_line, read_goods
from ..terminal.goods_key import GoodsKeyService
from ..terminal.purse import Declined
from ..terminal.reader_specs import open_reader

METRO = b"METRO001"          # the transit operator: issuer of the token (8 bytes)
MUSEUM = b"MUSEUM01"         # the museum: issuer of the e-ticket
TOKEN_ID = b"TKN00001"
TICKET_ID = b"TIX00042"
TRANSIT_SFI, TICKET_SFI = 0x13, 0x11
# the demo issuer's goods key (TEST KEY ONLY): the card takes goods records in a composite
# purchase only MAC'd under it (84 DE), so the terminal and the validator hold its key service
GOODS_MASTER = "6A0F3C9E21D84B7755E2A9C01B3D8F64"
GOODS_KEYS = GoodsKeyService(KeyEntry(1, 1, 0, bytes.fromhex(GOODS_MASTER)))


def goods_issuer(folder: Path, demo_issuer: Path) -> Path:
    """The demo issuer file with the demo's ``[goods_key]``, for the demo card's profile."""
    path = folder / "demo-goods-issuer.toml"
    path.write_text(demo_issuer.read_text() + "\n[goods_key]\nindex = 1\nversion = 1\n"
                    f'algorithm = 0\nmaster_key = "{GOODS_MASTER}"\n')
    return path


def demo_goods(today: dt.date) -> list[GoodsWrite]:
    """A 10-ride transit token (fare 2.00 a ride, prepaid) and a museum e-ticket worth 12.50,
    valid from today for a year; written by tag (each into the first empty record)."""
    valid = {"valid_from": P.bcd_date(today),
             "valid_to": P.bcd_date(dt.date(today.year + 1, 12, 31))}
    token = G.build("transit", issuer_id=METRO, good_id=TOKEN_ID, rides_left=10,
                    rides_total=10, fare=200, **valid)
    ticket = G.build("ticket", issuer_id=MUSEUM, good_id=TICKET_ID, value=1250,
                     reference=b"HALL-B07", **valid)
    return [GoodsWrite(TRANSIT_SFI, token), GoodsWrite(TICKET_SFI, ticket)]


def run_goods(card_path: Path, psam_path: Path, lines: list[str],
              money: Callable[[int], str], price: int = 2_500) -> dict[str, Any]:
    """Buy the demo goods for ``price`` on the card at ``card_path`` with the PSAM at
    ``psam_path``, list them, and ride once."""
    when = dt.datetime.now()
    writes = demo_goods(when.date())
    with open_reader(f"virtual:{card_path}") as card, \
            open_reader(f"virtual:{psam_path}") as psam:
        try:
            bought = capp_purchase(card, psam, price, writes, when=when, goods_keys=GOODS_KEYS)
        except Declined as exc:   # a small --load-amount: the card refused, nothing written
            if exc.sw != SW.INSUFFICIENT_FUNDS:
                raise
            lines.append(f"GOODS (seed 000): skipped, the card cannot pay their "
                         f"{money(price)} (a larger --load-amount shows them); nothing written")
            return {"skipped": "insufficient funds", "price": price}
        listed = read_goods(card)
        ride = redeem(card, psam, Choice(good_id=TOKEN_ID, kind="transit"), 0,
                      goods_keys=GOODS_KEYS)
        if not isinstance(ride, RedeemReceipt):   # only a journalled tap finishes an old one
            raise RuntimeError("the validator answered an earlier tap, not this ride")
        after = read_goods(card)
    lines += [
        f"GOODS (seed 000): a composite purchase (type 09) of {money(price)} wrote "
        f"{len(writes)} goods records with the debit, in one card write: balance "
        f"{money(bought.balance_before)} -> {money(bought.balance_after)}; PSAM "
        f"{bought.terminal_id} TTN {bought.terminal_txn_number}, TAC {bought.tac}",
        f"GOODS ON THE CARD (READ RECORD of its goods files, as svcard terminal goods): "
        f"{len(listed)}"]
    lines += [f"  SFI {g.sfi:02X} record {g.record_number}: {good_line(g.to_json())}"
              for g in listed]
    token = G.parse(ride.after)
    lines.append(
        f"RIDE at a validator (svcard terminal redeem): one ride of token "
        f"{TOKEN_ID.decode()} in a composite purchase of the fare {money(ride.fare)} "
        f"(prepaid), the record rewritten with it: {token['rides_left']} of "
        f"{token['rides_total']} rides left; card counter {ride.payment.offline_counter}, "
        f"TAC {ride.payment.tac}")
    return {"purchase": bought.to_json(), "goods": [g.to_json() for g in listed],
            "ride": ride.to_json(), "goods_after_ride": [g.to_json() for g in after]}

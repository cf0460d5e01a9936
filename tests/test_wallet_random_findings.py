"""What the randomised wallet run (tests/test_wallet_random.py) showed, each pinned by a direct
test.

1. Embodiment 3 (VAN): the financial system debited the card, the answer was lost (the
   financial system or the VAN stopped before it reached the mall), and the mall asked again
   once the purchase had expired: the financial system checked the expiry before it looked for
   the debit already made under the purchase's ref, so the mall got 410 "expired" for an order
   whose card WAS debited: a debit without its approval. Asked again, a debit already made is
   answered as made (200, ``repeated``) whatever the time."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator

import httpx
import pytest
from test_wallet_attack import new_purchase
from test_wallet_embodiments import filled, van_pay
from test_wallet_network import issue, member, topup

from svcard.host.wallet.stack import WalletStack, start_wallet


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WalletStack]:
    s = start_wallet(tmp_path_factory.mktemp("wallet-findings"))
    yield s
    s.close()


def van_debits(stack: WalletStack, card: str) -> int:
    db = sqlite3.connect(stack.folder / "wallet-fin.db")
    try:
        return int(db.execute("SELECT count(*) FROM wf_movements WHERE card=? AND "
                              "kind='debit' AND result='done'", (card,)).fetchone()[0])
    finally:
        db.close()


def wait_past(expires_ms: int) -> None:
    deadline = time.monotonic() + 10
    while time.time() * 1000 <= expires_ms:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_van_payment_asked_again_after_expiry_is_still_paid(stack: WalletStack) -> None:
    b = member(stack, "finding-van")
    card = issue(b)
    topup(stack, card["number"], 10_000, "cash-finding-van")
    p = new_purchase(expires_in=2.0)
    form = filled(stack, b, card, p)
    with httpx.Client(timeout=30) as http:
        status, first = van_pay(stack, http, p, form)          # its answer "lost"
        assert status == 200 and first["approved"], first
        wait_past(p["expires"])
        status, again = van_pay(stack, http, p, form)          # the mall asks again, late
        assert status == 200 and again["approved"] and again["repeated"], again
        assert again["approval"] == first["approval"]
        # still no second debit, and a wrong secret is still refused
        status, wrong = van_pay(stack, http, p, {**form, "secret": "0000"})
        assert status == 403, wrong
        # a purchase never paid is refused once it expired
        q = new_purchase(expires_in=2.0)
        late = filled(stack, b, card, q)
        wait_past(q["expires"])
        status, answer = van_pay(stack, http, q, late)
        assert status == 410, answer
    assert van_debits(stack, card["number"]) == 1
    b.close()

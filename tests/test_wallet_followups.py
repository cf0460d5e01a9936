"""Follow-ups to the wallet's review (issue 14): embodiment 2's retry after a lost answer, and
old PostgreSQL financial-system databases widened at open."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from test_wallet_attack import new_purchase
from test_wallet_embodiments import filled, gateway_pay
from test_wallet_network import balance, issue, member, topup

from svcard.host.wallet.stack import WalletStack, start_wallet


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WalletStack]:
    s = start_wallet(tmp_path_factory.mktemp("wallet-followups"))
    yield s
    s.close()


def test_a_card_payment_asked_again_after_a_lost_answer_learns_it_was_paid(
        stack: WalletStack) -> None:
    """Embodiment 2: the mall's exact card payment sent again (its answer lost) got only 409
    "approved already", so the demo mall showed a debited order as unpaid. Now the 409 carries
    ``state`` and ``approval`` for that mall's own identical request (secret included); any
    field changed, another token, or a wrong secret learns nothing; nothing is debited twice."""
    b = member(stack, "w3-retry")
    try:
        card = issue(b)
        topup(stack, card["number"], 10_000, "w3-retry-cash")
        p = new_purchase()
        form = filled(stack, b, card, p)
        with httpx.Client(timeout=30) as http:
            status, first = gateway_pay(stack, http, p, form)
            assert status == 200 and first["approved"], first
            status, again = gateway_pay(stack, http, p, form)
            assert status == 409 and not again["approved"], again
            assert again.get("state") == "approved" and \
                again.get("approval") == first["approval"], again
            mutated: list[tuple[dict[str, Any], dict[str, Any]]] = [
                ({**p, "nonce": "0" * 32}, form),
                ({**p, "expires": p["expires"] - 1}, form),
                ({**p, "customer": "someone-else"}, form),
                (p, {**form, "profile": form["profile"][:-1] + (
                    "0" if form["profile"][-1] != "0" else "1")}),
            ]
            for body, f in mutated:
                status, other = gateway_pay(stack, http, body, f)
                assert status == 409 and "state" not in other and \
                    "approval" not in other, (body, f, other)
            wrong = "0" * len(card["secret"]) if card["secret"] != "0" * len(card["secret"]) \
                else "1" * len(card["secret"])
            status, other = gateway_pay(stack, http, p, {**form, "secret": wrong})
            assert status == 403 and "state" not in other and "approval" not in other, other
        assert balance(b, card["number"]) == 10_000 - p["amount"]       # debited once
    finally:
        b.close()

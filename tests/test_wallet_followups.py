"""Follow-ups to the wallet's review (issue 14): embodiment 2's retry after a lost answer, and
old PostgreSQL financial-system databases widened at open."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from test_wallet_attack import new_purchase
from test_wallet_embodiments import filled, gateway_pay
from test_wallet_network import balance, issue, member, topup

from svcard.host.wallet.links import LinkClient
from svcard.host.wallet.stack import MALL, WalletStack, start_wallet


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
            assert status == 409 and not again.get("approved"), again
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
            # forged (another key): 401 and nothing said; raced exact copies: each the 409
            forged = LinkClient(http, stack.url("gateway"), MALL, secrets.token_bytes(32))
            status, other = forged.post("/v1/card-payments", {"purchase": p, **form})
            assert status == 401 and "state" not in other, other
            with ThreadPoolExecutor(8) as pool:
                raced = list(pool.map(lambda _: gateway_pay(stack, http, p, form), range(8)))
            assert all(st == 409 and a.get("state") == "approved" for st, a in raced), raced
        assert balance(b, card["number"]) == 10_000 - p["amount"]       # debited once
    finally:
        b.close()


@pytest.mark.parametrize("stamped", [True, False], ids=["version-1", "before-stamps"])
def test_an_old_postgresql_fin_database_is_widened_at_open(stamped: bool) -> None:
    """A financial-system database made before ``wf_movements.source`` held 48 characters
    kept varchar(40) on PostgreSQL: every debit for a mall (and top-up by an agent) with a
    36-40 character id failed there (DataError, 500) even after the code was fixed. Its open
    now upgrades it (schema version 2), whether stamped version 1 or made before stamps."""
    from pg_env import start_cluster
    from sqlalchemy import create_engine, text

    from svcard.host.wallet.fin import ledger as L
    from svcard.host.wallet.fin.db import make_engine
    cluster = start_cluster()
    try:
        url = cluster.new_database()
        make_engine(url).dispose()
        raw = create_engine(url)
        try:
            with raw.begin() as conn:    # as an old svcard left it
                conn.execute(text("ALTER TABLE wf_movements ALTER COLUMN source "
                                  "TYPE varchar(40)"))
                if stamped:
                    conn.execute(text("UPDATE svcard_schema SET version = 1 "
                                      "WHERE component = 'wallet-fin'"))
                else:
                    conn.execute(text("DELETE FROM svcard_schema "
                                      "WHERE component = 'wallet-fin'"))
        finally:
            raw.dispose()
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                width = conn.execute(text(
                    "SELECT character_maximum_length FROM information_schema.columns "
                    "WHERE table_name = 'wf_movements' AND column_name = 'source'")).scalar()
                version = conn.execute(text(
                    "SELECT version FROM svcard_schema WHERE component = 'wallet-fin'"
                )).scalar()
            assert (width, version) == (48, 2)
            number, _, _ = L.issue_card(engine, "issue:w3", "virtual", 156, "ab" * 32,
                                        lambda n: "cd" * 32)
            assert number is not None
            top = L.move(engine, "cash:w3", "cash", number, "agent:" + "A" * 40, 500, 156,
                         "d1" * 32, None, 10**9)
            pay = L.move(engine, "pay:w3", "debit", number, "mall:" + "M" * 40, 200, 156,
                         "d2" * 32, None, 10**9, "order-1")
            assert (top.result, pay.result, pay.balance) == ("done", "done", 300)
        finally:
            engine.dispose()
    finally:
        cluster.stop()

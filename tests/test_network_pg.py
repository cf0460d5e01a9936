"""The payment flow with the transaction database on PostgreSQL (a private test cluster)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pg_env import Cluster, start_cluster

from svcard.card.storage import read_image
from svcard.host.demo.system import card_image
from svcard.host.pay import client as C
from svcard.host.pay.stack import start_stack
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    yield c
    c.stop()


@pytest.mark.parametrize("variant", ["fig5", "fig6", "fig7", "fig8"])
def test_variants_on_postgresql(cluster: Cluster, tmp_path: Path, variant: str) -> None:
    stack = start_stack(tmp_path / "stack", psams=2, db_url=cluster.new_database())
    try:
        card = card_image(tmp_path, ep=5_000)
        journal = Journal(tmp_path / "j.jsonl")
        with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
            for _ in range(3):
                outcome = C.pay(stack.checkout_url("song", variant), reader, journal=journal,
                                http=http)
                assert outcome.goods.endswith("song-7f3a")
        assert read_image(card)["app"]["ep"]["balance"] == 5_000 - 3 * 99
        assert stack.payment_server.db.counts() == {"confirmed": 3}
        assert str(stack.payment_server.db.engine.url).startswith("postgresql+psycopg")
    finally:
        stack.close()


def test_card_counter_reuse_on_postgresql(cluster: Cluster, tmp_path: Path) -> None:
    """A draw never debited leaves its card counter free: the unique (card, counter) index
    covers confirmed payments only (a partial index on PostgreSQL too)."""
    stack = start_stack(tmp_path / "stack", psams=1, db_url=cluster.new_database())
    try:
        card = card_image(tmp_path, ep=5_000)
        with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
            params = C.fetch_checkout(http, stack.checkout_url("song", "fig6"))
            session = C._Session(params)
            from svcard.host.terminal import apdus
            from svcard.host.terminal.purse import select_purse
            from svcard.protocols import messages as M
            from svcard.protocols import purse as P
            info = select_purse(reader)
            init = P.InitForPurchaseAnswer.parse(reader.exchange(apdus.initialize(
                P.INIT_PURCHASE, 2, 1, 99, bytes.fromhex(params["terminal_id"]))).data)
            draw = M.build(M.DrawRequest, {
                "issuer_id": bytes.fromhex(info.issuer_id), "card_serial": info.serial_bytes,
                "algorithm_id": 0, "key_version": init.key_version,
                "expiry_date": bytes.fromhex(info.expiry_date), "balance": init.balance,
                "currency_code": 156, "currency_exponent": 2, "purse": 2,
                "offline_counter": init.offline_counter, "amount": 99, "random": init.random,
                "txn_type": 6})
            session.post(http, "/v1/draw", M.DRAW_REQUEST, draw)  # never debited
            C.pay(stack.checkout_url("song", "fig6"), reader, journal=Journal(tmp_path / "j"),
                  http=http)
        assert stack.payment_server.db.counts() == {"issued": 1, "confirmed": 1}
    finally:
        stack.close()


def test_loads_on_postgresql(cluster: Cluster, tmp_path: Path) -> None:
    """Bank and load server databases on PostgreSQL: a load, then a "not loaded" refund."""
    from svcard.host.load import client as LC
    from svcard.host.load.stack import start_load_stack
    from svcard.protocols import purse as P

    stack = start_load_stack(tmp_path / "load", bank_db=cluster.new_database(),
                             load_db=cluster.new_database())
    try:
        stack.account("alice", 10_000, "pw")
        card = card_image(tmp_path, ep=0)
        journal = Journal(tmp_path / "j.jsonl")
        with httpx.Client(timeout=30) as http:
            with open_reader(f"virtual:{card}") as reader:
                out = LC.load(stack.bank_url, reader, account="alice", secret="pw",
                              amount=4_000, journal=journal, http=http)
            assert out.outcome == "loaded"

            class Refusing(Exception):
                pass

            with open_reader(f"virtual:{card}") as reader:
                real = reader.exchange

                def no_credit(apdu: bytes) -> object:
                    if apdu[:2] == bytes([P.CLA_PBOC, P.INS_CREDIT_FOR_LOAD]):
                        raise Refusing()
                    return real(apdu)

                reader.exchange = no_credit  # type: ignore[method-assign,assignment]
                with pytest.raises(Refusing):
                    LC.load(stack.bank_url, reader, account="alice", secret="pw",
                            amount=1_000, journal=journal, http=http)
            with open_reader(f"virtual:{card}") as reader:
                report = LC.resume_loads(reader, journal=journal, http=http)
            assert [r["outcome"] for r in report] == ["not loaded"]
        assert read_image(card)["app"]["ep"]["balance"] == 4_000
        assert stack.bank_server.db.totals() == {"confirmed": 4_000, "refunded": 1_000,
                                                 "accounts": 6_000}
        assert str(stack.load_server.db.engine.url).startswith("postgresql+psycopg")
    finally:
        stack.close()


def test_whole_system_clearing_and_audit_on_postgresql(cluster: Cluster, tmp_path: Path) -> None:
    """Payments, loads, bank and clearing databases all on PostgreSQL; a clean audit."""
    from svcard.host.demo.system import start_system
    from svcard.host.load import client as LC

    system = start_system(tmp_path / "sys", db_url=cluster.new_database(),
                          bank_db=cluster.new_database(), load_db=cluster.new_database(),
                          clearing_db=cluster.new_database())
    try:
        system.load.account("alice", 10_000, "pw")
        card = card_image(tmp_path, ep=0)
        journal = Journal(tmp_path / "j.jsonl")
        with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
            LC.load(system.load.bank_url, reader, account="alice", secret="pw", amount=5_000,
                    journal=journal, http=http)
            for variant in ("fig5", "fig6", "fig7", "fig8"):
                C.pay(system.pay.checkout_url("ticket", variant), reader, journal=journal,
                      http=http)
        system.close_batches()
        report = system.run_clearing()
        assert report.records_cleared == 4 and report.total_paid == 5_000
        again = system.run_clearing()
        assert again.records_cleared == 0
        result = system.audit([card])
        assert result.clean, result.discrepancies
        assert result.figures["float (ledger)"] == 0
    finally:
        system.close()


@pytest.mark.parametrize("variant", ["fig5", "fig6"])
def test_raced_debit_responses_on_postgresql(cluster: Cluster, tmp_path: Path,
                                             variant: str) -> None:
    """C3 at READ COMMITTED: the genuine debit response and 20 forged ones at once, then 20
    copies of the genuine one: one confirmation, the same result for every copy."""
    import asyncio
    import os

    from test_attack_pay import Honest, open_answer, post_all, result_c

    from svcard.protocols import messages as M

    stack = start_stack(tmp_path / "stack", psams=2, db_url=cluster.new_database())
    try:
        card = card_image(tmp_path, ep=5_000)
        with httpx.Client(timeout=30) as http:
            with open_reader(f"virtual:{card}") as reader:
                alice = Honest(stack, http, reader, variant, sku="song")
                debited = alice.debit(alice.draw())
            genuine = alice.genuine(debited)
            forged = [alice.response(0x6985) if i % 2 else
                      alice.response(0x9000, os.urandom(4), os.urandom(4)) for i in range(20)]
            url = stack.payment.url + "/v1/debit-response"
            answers = asyncio.run(post_all(url, [*forged[:10], genuine, *forged[10:]]))
            assert answers[10].status_code == 200
            assert result_c(alice.session, answers[10]).status == M.STATUS_OK
            copies = asyncio.run(post_all(url, [genuine] * 20))
            row = stack.payment_server.db.get(alice.params["merchant_id"],
                                              alice.params["txn_id"])
            assert row is not None and row["state"] == "confirmed"
            assert [open_answer(alice.session, c) for c in copies] == [row["result"]] * 20
        assert stack.payment_server.db.counts() == {"confirmed": 1}
        assert read_image(card)["app"]["ep"]["balance"] == 5_000 - 99
    finally:
        stack.close()

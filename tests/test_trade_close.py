"""Ending and clearing trading sessions (seed 004 FIG. 3, claims 10, 11) with real servers:
each way a session ends (the customer's terminate, the deposit spent, the merchant's own end,
the mediating agent's timeout), both sides' records compared, the withdrawal and deposit
records written once, the rest of the deposit returned, and the books closing in every
currency; then the attacker's records: a merchant claiming more than its last link, a forged
link, a tampered or misdirected record, replays, and a dropped, duplicated, altered or
reordered purchase in either side's report."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from svcard.host.kit.db import first_row
from svcard.host.trade import closing as K
from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade import records
from svcard.host.trade import signing as S
from svcard.host.trade.stack import TradeStack, start_trade


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def stack(tmp_path: Path, clock: Clock) -> Iterator[TradeStack]:
    s = start_trade(tmp_path / "trade", merchants={"shop": "JPY", "kiosk": "KWD"},
                    clock=clock, close_seconds=3600, grace_ms=60_000)
    yield s
    s.close()


def opened(stack: TradeStack, http: httpx.Client, who: str = "alice", deposit: int = 10_00,
           merchant: str = "shop", unit: int = 10) -> C.Session:
    if first_row(stack.account.engine, D.am_customers, id=who) is None:
        stack.customer(who, 100_00)
    cust = stack.customer(who + "x", 100_00)
    s = stack.open(http, cust, deposit, merchant, unit=unit)
    s.account_url = stack.am.url
    return s


def tick(stack: TradeStack) -> dict[str, int]:
    done = {"cleared": 0, "delivered": 0}
    for acquirer in stack.acquirers():
        for k, v in asyncio.run(acquirer.closer.tick()).items():
            done[k] += v
    return done


def books_clean(stack: TradeStack) -> records.Books:
    b = records.books([a.engine for a in stack.acquirers()], [stack.account.engine],
                      [m.engine for m in stack.merchant_accounts()])
    assert b.problems == []
    return b


def postings(stack: TradeStack) -> int:
    with stack.acquirer.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(D.acq_postings)).scalar_one())


def billing(stack: TradeStack, kind: str, session: str) -> dict[str, Any]:
    folder = "billing-am1" if kind == "withdrawals" else "billing-mam1"
    path = Path(stack.account.config.billing).parent / folder / kind / f"{session}.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def wait_delivered(stack: TradeStack, session: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        row = None
        for acquirer in stack.acquirers():
            row = row or first_row(acquirer.engine, D.acq_clearings, session=session)
        if row is not None and row["am_done"] and row["mam_done"]:
            return row
        time.sleep(0.05)
    raise AssertionError(f"{session}: the clearing was not delivered")


def test_customer_terminates_then_both_records_clear_once(stack: TradeStack) -> None:
    with httpx.Client(timeout=30) as http:
        s = opened(stack, http)
        for i in range(3):
            C.buy(http, s, f"song{i}", 2)
        got = C.close(http, s)
        c = got["clearing"]
        assert (c["outcome"], c["ended"], c["index"], c["paid"]) == \
            ("agreed", "terminated", 6, 60)
        # 1582 JPY deposit: 60 paid, 1522 back = 9.61 EUR (1 JPY to rounding): 0.39 charged
        assert (c["returned"], c["withdrawal"], c["rounding"]) == (961, 39, 1)
        wait_delivered(stack, s.session)
        w, d = billing(stack, "withdrawals", s.session), billing(stack, "deposits", s.session)
        assert (w["record"], w["amount"], w["currency"], w["deposit"], w["returned"]) == \
            ("withdrawals", 39, "EUR", 10_00, 961)
        assert (d["record"], d["amount"], d["currency"], d["merchant"]) == \
            ("deposits", 60, "JPY", "shop")
        assert S.verify(stack.parties["acq1"].public, S.CLEARING, w["clearing"].encode(),
                        w["clearing_signature"])
        customer = first_row(stack.account.engine, D.am_sessions, session=s.session)
        assert customer is not None and customer["state"] == D.CLEARED
        assert first_row(stack.account.engine, D.am_customers,
                         id=customer["customer"])["reserved"] == 0
        # the customer sees its clearing (claim 11: sent to the customer)
        shown = http.get(f"{stack.am.url}/v1/sessions/{s.session}/clearing",
                         params={"pseudonym": s.pseudonym}).json()
        assert json.loads(shown["clearing"]) == c and shown["withdrawal"] == 39
        assert http.get(f"{stack.am.url}/v1/sessions/{s.session}/clearing").status_code == 404
        # the customer opens its own sealed list; the acquirer holds only hash and totals
        kept = first_row(stack.acquirer.engine, D.acq_records, session=s.session,
                         side="customer")
        assert kept is not None and "song0" not in kept["body"]
        assert C.my_list(s, json.loads(kept["body"])["sealed"]) == s.orders
        # the whole close again: the same record, the same clearing, nothing booked twice
        before = postings(stack)
        again = C.close(http, s)
        assert again["taken"] == "same" and again["clearing"] == c
        assert postings(stack) == before
    b = books_clean(stack)
    assert b.withdrawals == {"EUR": 39} and b.deposits == {"JPY": 60}
    assert records.rounding(stack.acquirer.engine) == {"EUR": 0, "JPY": 1}


def test_the_deposit_spent_ends_the_session(stack: TradeStack) -> None:
    with httpx.Client(timeout=30) as http:
        s = opened(stack, http, deposit=1_00, unit=10)      # 158 JPY: 15 links of 10
        C.buy(http, s, "album", 10)
        assert C.buy(http, s, "album2", 5)["state"] == D.SPENT
        kept = first_row(stack.merchants["shop"].engine, D.ma_records, session=s.session)
        assert kept is not None and kept["ended"] == "spent" and kept["sent"] == 1
        c = C.close(http, s)["clearing"]
        assert (c["outcome"], c["ended"], c["paid"]) == ("agreed", "spent", 150)
        wait_delivered(stack, s.session)
    books_clean(stack)


def test_the_merchant_ends_the_session(stack: TradeStack) -> None:
    with httpx.Client(timeout=30) as http:
        s = opened(stack, http, merchant="kiosk", unit=1)    # 10.00 EUR -> 3.312 KWD
        C.buy(http, s, "tea", 250)
        asyncio.run(stack.merchants["kiosk"].closer.end(s.session))
        with pytest.raises(C.TradeError, match="409"):
            C.buy(http, s, "cake", 1)
        c = C.close(http, s)["clearing"]
        assert (c["outcome"], c["ended"], c["paid"], c["currency_merchant"]) == \
            ("agreed", "merchant", 250, "KWD")
        wait_delivered(stack, s.session)
    books_clean(stack)


def test_the_mediating_agent_times_an_idle_session_out(stack: TradeStack,
                                                       clock: Clock) -> None:
    with httpx.Client(timeout=30) as http:
        s = opened(stack, http)
        C.buy(http, s, "song", 3)
        assert tick(stack) == {"cleared": 0, "delivered": 0}     # not expired: untouched
        clock.offset = 3600 + 1                                  # past the session's expiry
        assert tick(stack)["cleared"] == 0       # asked the merchant; waits for the customer
        kept = first_row(stack.merchants["shop"].engine, D.ma_records, session=s.session)
        assert kept is not None and kept["ended"] == "timeout"
        assert first_row(stack.merchants["shop"].engine, D.ma_sessions,
                         session=s.session)["state"] == D.TERMINATED
        clock.offset += 61                                       # past the grace
        assert tick(stack)["cleared"] == 1
        row = wait_delivered(stack, s.session)
        c = json.loads(row["info"])
        assert (c["outcome"], c["ended"], c["paid"]) == ("one-sided", "timeout", 30)
        # the customer's record comes too late: refused, nothing moves
        body, headers = C.record(s)
        answer = http.post(f"{stack.am.url}/v1/sessions/{s.session}/record", content=body,
                           headers=headers)
        assert answer.status_code == 409
    books_clean(stack)


# --- the attacker's records ---------------------------------------------------------------

def merchant_record(stack: TradeStack, s: C.Session, entries: list[dict[str, Any]] | None = None,
                    index: int | None = None, link: str | None = None,
                    total: int | None = None) -> tuple[bytes, dict[str, str]]:
    """A record the merchant signs (honest unless told otherwise)."""
    agent = stack.merchants[s.merchant]
    p = D.ma_purchases.c
    with agent.engine.connect() as conn:
        bought = conn.execute(select(D.ma_purchases).where(p.session == s.session)
                              .order_by(p.link_index)).all()
    row = first_row(agent.engine, D.ma_sessions, session=s.session)
    assert row is not None and bought
    commitment = json.loads(row["commitment"])
    last = bought[-1]
    honest = [K.entry(b.link_index, b.item, b.units, b.order_signature) for b in bought]
    evidence = {"index": index or last.link_index, "link": link or last.link,
                "commitment": S.canonical(commitment["commitment"]).decode(),
                "commitment_signature": commitment["signature"], "order": last.order_body,
                "order_signature": last.order_signature}
    rec = K.make_record(s.session, "merchant", s.merchant, "terminated", row["currency"],
                        row["unit"], honest if entries is None else entries,
                        K.record_key(agent.config.private_key, s.session, "merchant"),
                        int(time.time()), evidence)
    if total is not None:
        rec["index"], rec["total"] = total // row["unit"], total
    return S.signed(agent.config.private_key, s.merchant, S.RECORD, rec)


def push(stack: TradeStack, http: httpx.Client, body: bytes,
         headers: dict[str, str]) -> httpx.Response:
    acquirer = stack.acquirer_of(headers[S.SIGNER]).config.id
    return http.post(f"{stack.url(acquirer)}/v1/records", content=body, headers=headers)


def test_a_merchant_claiming_more_than_its_last_link_gets_its_link(stack: TradeStack) -> None:
    with httpx.Client(timeout=30) as http:
        s = opened(stack, http)
        C.buy(http, s, "song", 4)
        assert push(stack, http, *merchant_record(stack, s, total=900)).status_code == 200
        c = C.close(http, s)["clearing"]
        assert c["outcome"] == "disputed" and c["paid"] == 40 and "claims link 90" in \
            c["reasons"]
        wait_delivered(stack, s.session)
    books_clean(stack)


def test_a_forged_link_proves_nothing(stack: TradeStack) -> None:
    with httpx.Client(timeout=30) as http:
        s = opened(stack, http)
        C.buy(http, s, "song", 4)
        forged = merchant_record(stack, s, index=50, link=os.urandom(32).hex(), total=500)
        assert push(stack, http, *forged).status_code == 200
        c = C.close(http, s)["clearing"]
        assert c["outcome"] == "disputed" and c["paid"] == 0 and "forged" in c["reasons"]
        wait_delivered(stack, s.session)
    books_clean(stack)


def test_tampered_misdirected_and_replayed_records_are_refused(stack: TradeStack) -> None:
    with httpx.Client(timeout=30) as http:
        s = opened(stack, http)
        other = opened(stack, http, who="bob")
        C.buy(http, s, "song", 2)
        C.buy(http, other, "song", 1)
        body, headers = merchant_record(stack, s)
        tampered = body.replace(b'"total":20', b'"total":30')
        assert tampered != body and push(stack, http, tampered, headers).status_code == 401
        kiosk = stack.merchants["kiosk"].config
        wrong_signer = {**headers, S.SIGNER: "kiosk",
                        S.SIGNATURE: S.sign(kiosk.private_key, S.RECORD, body)}
        assert push(stack, http, body, wrong_signer).status_code == 403
        assert first_row(stack.acquirer.engine, D.acq_records, session=s.session) is None
        # the customer's record of one session sent as another's
        cbody, cheaders = C.record(s)
        aimed = http.post(f"{stack.am.url}/v1/sessions/{other.session}/record", content=cbody,
                          headers={**cheaders, S.SIGNER: other.pseudonym})
        assert aimed.status_code == 401
        # the same merchant record twice is one record; another one after it is refused
        assert push(stack, http, body, headers).status_code == 200
        assert push(stack, http, body, headers).json()["taken"] == "same"
        again = merchant_record(stack, s, entries=[])
        assert push(stack, http, *again).status_code == 409
        c = C.close(http, s)["clearing"]
        assert c["outcome"] == "agreed"
        info = wait_delivered(stack, s.session)
        before = postings(stack)
        assert push(stack, http, body, headers).json()["taken"] == "same"
        # the clearing information replayed to the account manager: one withdrawal
        replay = http.post(f"{stack.am.url}/v1/clearings", content=info["info"].encode(),
                           headers={S.SIGNATURE: info["signature"], S.SIGNER: "acq1"})
        assert replay.status_code == 200
        with stack.account.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(
                D.am_withdrawals)).scalar_one() == 1
        forged_info = info["info"].replace('"withdrawal":', '"withdrawal":1')
        assert http.post(f"{stack.am.url}/v1/clearings", content=forged_info.encode(),
                         headers={S.SIGNATURE: info["signature"],
                                  S.SIGNER: "acq1"}).status_code in (400, 401)
        assert postings(stack) == before
    books_clean(stack)


FAULTS = ("dropped", "duplicated", "altered", "reordered")


def faulty(entries: list[dict[str, Any]], fault: str) -> list[dict[str, Any]]:
    out = [dict(e) for e in entries]
    if fault == "dropped":
        del out[1]
    elif fault == "duplicated":
        out.insert(1, dict(out[1]))
    elif fault == "altered":
        out[1]["item"] = "other"
    else:
        out[0], out[1] = out[1], out[0]
    return out


@pytest.mark.parametrize("side", ["customer", "merchant"])
def test_a_faulty_report_on_either_side_is_detected(stack: TradeStack, side: str) -> None:
    with httpx.Client(timeout=30) as http:
        for n, fault in enumerate(FAULTS):
            s = opened(stack, http, who=f"c{n}")
            for i in range(3):
                C.buy(http, s, f"song{i}", 1 + i)
            if side == "merchant":
                bad = merchant_record(stack, s, entries=faulty(
                    [K.entry(e["index"], e["item"], e["units"], e["signature"])
                     for e in s.orders], fault))
                assert push(stack, http, *bad).status_code == 200
            else:
                s.orders = faulty(s.orders, fault)
            c = C.close(http, s)["clearing"]
            assert c["outcome"] == "disputed", (side, fault, c)
            assert c["paid"] == 60          # the merchant's evidence: link 6 x 10 JPY
            wait_delivered(stack, s.session)
    books_clean(stack)


def test_the_merchant_ends_a_session_from_the_command_line(stack: TradeStack,
                                                           tmp_path: Path) -> None:
    from click.testing import CliRunner

    from svcard.host.cli.main import main

    cfg = stack.merchants["shop"].config
    acq = stack.parties["acq1"]
    toml = tmp_path / "shop.toml"
    toml.write_text(f'id = "shop"\nkey = "{cfg.private_key.hex()}"\ndb = "{cfg.db_url}"\n'
                    f'currency = "JPY"\n[acquirer]\nid = "acq1"\nurl = "{acq.url}"\n'
                    f'public_key = "{acq.public.hex()}"\n')
    with httpx.Client(timeout=30) as http:
        s = opened(stack, http)
        C.buy(http, s, "song", 2)
        r = CliRunner().invoke(main, ["session", "merchant-end", s.session, "--config",
                                      str(toml)], prog_name="svcard")
        assert r.exit_code == 0 and "ended (merchant): 1 purchases, 20 JPY" in r.output, \
            r.output
        assert cfg.private_key.hex() not in r.output
        r = CliRunner().invoke(main, ["session", "merchant-end", "am1.999", "--config",
                                      str(toml)], prog_name="svcard")
        assert r.exit_code == 1 and "not a session of this merchant" in r.output
        with pytest.raises(C.TradeError, match="409"):
            C.buy(http, s, "song", 1)
        c = C.close(http, s)["clearing"]
        assert (c["outcome"], c["ended"], c["paid"]) == ("agreed", "merchant", 20)
        wait_delivered(stack, s.session)
    books_clean(stack)


def test_raced_records_and_replayed_clearings_clear_once(stack: TradeStack) -> None:
    """16 copies of the customer's record and 16 of the merchant's, sent at once: one
    clearing, one set of postings, one withdrawal and one deposit."""
    import threading

    with httpx.Client(timeout=30) as http:
        s = opened(stack, http)
        C.buy(http, s, "song", 3)
        C.terminate(http, s)
        cbody, cheaders = C.record(s)
        mrow = first_row(stack.merchants["shop"].engine, D.ma_records, session=s.session)
        assert mrow is not None
        mheaders = {S.SIGNATURE: mrow["signature"], S.SIGNER: "shop"}
    answers: list[int] = []

    def send(i: int) -> None:
        with httpx.Client(timeout=60) as h:
            if i % 2:
                r = h.post(f"{stack.am.url}/v1/sessions/{s.session}/record", content=cbody,
                           headers=cheaders)
            else:
                r = h.post(f"{stack.url('acq1')}/v1/records",
                           content=mrow["body"].encode(), headers=mheaders)
            answers.append(r.status_code)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers.count(200) == 32, answers
    wait_delivered(stack, s.session)
    with stack.acquirer.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(D.acq_postings).where(
            D.acq_postings.c.event == "clearing")).scalar_one() == 7
    b = books_clean(stack)
    assert b.deposits == {"JPY": 30}


def test_truncated_forged_and_misaimed_end_and_clearing_messages(stack: TradeStack) -> None:
    with httpx.Client(timeout=30) as http:
        s = opened(stack, http)
        C.buy(http, s, "song", 1)
        acq = stack.acquirer.config
        end = {"acquirer": "acq1", "merchant": "shop", "session": s.session,
               "reason": "timeout", "created": int(time.time())}
        url = f"{stack.url('shop')}/v1/sessions/{s.session}/end"
        body, headers = S.signed(S.new_key()[0], "acq1", S.END, end)
        assert http.post(url, content=body, headers=headers).status_code == 401   # forged
        body, headers = S.signed(acq.private_key, "acq1", S.END, end)
        assert http.post(url, content=body[:-5], headers=headers).status_code == 400
        other = {**end, "merchant": "kiosk"}
        body2, headers2 = S.signed(acq.private_key, "acq1", S.END, other)
        assert http.post(url, content=body2, headers=headers2).status_code == 403
        stale = {**end, "created": int(time.time()) - 3600}
        body3, headers3 = S.signed(acq.private_key, "acq1", S.END, stale)
        assert http.post(url, content=body3, headers=headers3).status_code == 401
        assert first_row(stack.merchants["shop"].engine, D.ma_records,
                         session=s.session) is None
        first = http.post(url, content=body, headers=headers)
        again = http.post(url, content=body, headers=headers)
        assert first.status_code == again.status_code == 200
        assert first.content == again.content     # the record is made once
        rec = K.parse_record(first.content)
        assert (rec["ended"], rec["index"], rec["total"]) == ("timeout", 1, 10)
        # the record truncated on its way to the acquirer
        sig = {S.SIGNATURE: first.headers[S.SIGNATURE], S.SIGNER: "shop"}
        assert push(stack, http, first.content[:-9], sig).status_code == 400
        # clearing information not from the mediating agent, or for another AM
        fake = {"acquirer": "acq9", "session": s.session}
        r = http.post(f"{stack.am.url}/v1/clearings", content=json.dumps(fake).encode(),
                      headers={S.SIGNATURE: "00" * 64, S.SIGNER: "acq9"})
        assert r.status_code == 400
        r = http.post(f"{stack.url('mam1')}/v1/clearings", content=b"{",
                      headers={S.SIGNATURE: "00" * 64, S.SIGNER: "acq1"})
        assert r.status_code == 400
        c = C.close(http, s)["clearing"]
        assert c["outcome"] == "agreed" and c["paid"] == 10
        info = wait_delivered(stack, s.session)
        misaimed = json.loads(info["info"]) | {"account_manager": "am2"}
        mbody, mheaders = S.signed(acq.private_key, "acq1", S.CLEARING, misaimed)
        assert http.post(f"{stack.am.url}/v1/clearings", content=mbody,
                         headers=mheaders).status_code == 403
        forged = json.loads(info["info"]) | {"withdrawal": 0}
        fbody, fheaders = S.signed(S.new_key()[0], "acq1", S.CLEARING, forged)
        assert http.post(f"{stack.url('mam1')}/v1/clearings", content=fbody,
                         headers=fheaders).status_code == 401
    books_clean(stack)


def test_a_comparison_made_before_a_record_came_is_not_used(stack: TradeStack) -> None:
    """The comparison runs before the clearing step; the step uses it only when the session
    has the same records (here a second, lying record came in between)."""
    from svcard.host.trade.server.closer import clear, prejudge, store_record

    with httpx.Client(timeout=30) as http:
        s = opened(stack, http)
        for i in range(3):
            C.buy(http, s, f"song{i}", 1)
        C.terminate(http, s)            # the merchant's record is in
    engine = stack.acquirer.engine
    judged = prejudge(engine, s.session)
    assert judged is not None and judged[1].outcome == "one-sided"
    s.orders = faulty(s.orders, "dropped")
    body, headers = C.record(s)
    now = int(time.time() * 1000)
    assert store_record(engine, s.session, "customer", "am1", body.decode(),
                        headers[S.SIGNATURE], "", now) == "new"
    acq = stack.acquirer.config
    row = clear(engine, s.session, acq.id, acq.private_key, "terminated", now, judged)
    assert row is not None and row["outcome"] == "disputed"
    assert clear(engine, s.session, acq.id, acq.private_key, "terminated", now,
                 judged)["outcome"] == "disputed"      # cleared once: the same row again

"""A trading-session system on loopback, for the tests, the demo and the benchmarks: one
customer account manager, one mediating trusted agent (the merchant operator's) and one or
more merchant agents, each its own server and database, with fresh keys; the exchange table
the acquirer's bank issued, valid for a day from now unless given.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ..kit.serving import ServerThread
from . import signing as S
from .config import (
    AccountManagerConfig,
    AcquirerConfig,
    MerchantAccountConfig,
    MerchantConfig,
    MerchantPeer,
    Peer,
)
from .customer import Session, open_session
from .money import Amount, ExchangeTable
from .server.account import AccountManager, add_customer
from .server.acquirer import Acquirer
from .server.merchant import MerchantAgent
from .server.merchant_account import MerchantAccount

DAY_MS = 86_400_000
DEMO_RATES = {"JPY": "158.2345", "KWD": "0.3312", "USD": "1.0821", "GBP": "0.8412"}


def demo_table(now_ms: int | None = None, lifespan_ms: int = DAY_MS,
               issuer: str = "bank-m") -> ExchangeTable:
    now = int(time.time() * 1000) if now_ms is None else now_ms
    return ExchangeTable.from_text(issuer, "EUR", DEMO_RATES, now - 60_000, now + lifespan_ms)


@dataclass
class Customer:
    id: str
    key: bytes = field(repr=False)
    currency: str


@dataclass
class Party:
    id: str
    key: bytes = field(repr=False)
    public: bytes
    thread: ServerThread

    @property
    def url(self) -> str:
        return self.thread.url

    def peer(self) -> Peer:
        return Peer(self.id, self.url, self.public)


@dataclass
class TradeStack:
    account: AccountManager
    acquirer: Acquirer
    merchants: dict[str, MerchantAgent]
    parties: dict[str, Party]
    operator: str
    merchant_account: MerchantAccount
    # more merchant operators (add_operator): id -> its acquirer and merchant account manager
    others: dict[str, tuple[Acquirer, MerchantAccount]] = field(default_factory=dict)
    operator_of: dict[str, str] = field(default_factory=dict)     # merchant -> operator

    def acquirers(self) -> list[Acquirer]:
        return [self.acquirer, *(a for a, _ in self.others.values())]

    def merchant_accounts(self) -> list[MerchantAccount]:
        return [self.merchant_account, *(m for _, m in self.others.values())]

    def acquirer_of(self, merchant: str) -> Acquirer:
        op = self.operator_of.get(merchant, self.operator)
        return self.acquirer if op == self.operator else self.others[op][0]

    @property
    def am(self) -> Party:
        return self.parties[self.account.config.id]

    def url(self, party: str) -> str:
        return self.parties[party].url

    def customer(self, customer: str, credit_limit: int = 100_000,
                 currency: str = "EUR") -> Customer:
        private, public = S.new_key()
        add_customer(self.account.engine, customer, public, currency, credit_limit)
        return Customer(customer, private, currency)

    def open(self, http: httpx.Client, who: Customer, deposit: int, merchant: str = "shop",
             unit: int | None = None) -> Session:
        return open_session(http, self.am.url, self.am.id, self.am.public, who.id, who.key,
                            merchant, self.url(merchant),
                            self.operator_of.get(merchant, self.operator),
                            Amount(deposit, who.currency), unit=unit)

    def restart(self, party: str) -> None:
        """Stop one server and start a new one on the same port and database."""
        old = self.parties[party]
        port = old.thread.port
        old.thread.stop()
        app: Callable[[], object]
        if party == self.merchant_account.config.id:
            self.merchant_account.close()
            self.merchant_account = MerchantAccount(self.merchant_account.config,
                                                    clock=self.merchant_account.clock)
            app = self.merchant_account.app
        elif party == self.account.config.id:
            self.account.close()
            self.account = AccountManager(self.account.config, clock=self.account.clock)
            app = self.account.app
        elif party == self.acquirer.config.id:
            self.acquirer.close()
            self.acquirer = Acquirer(self.acquirer.config, clock=self.acquirer.clock)
            app = self.acquirer.app
        else:
            agent = self.merchants[party]
            agent.close()
            agent = self.merchants[party] = MerchantAgent(agent.config, clock=agent.clock)
            app = agent.app
        old.thread = ServerThread(app(), port=port).start()

    def close(self) -> None:
        for party in self.parties.values():
            party.thread.stop()
        self.account.close()
        for acquirer in self.acquirers():
            acquirer.close()
        for mam in self.merchant_accounts():
            mam.close()
        for m in self.merchants.values():
            m.close()


def _start(app_of: Callable[[], object], pid: str, key: bytes) -> Party:
    thread = ServerThread(app_of()).start()
    return Party(pid, key, S.public_of(key), thread)


def start_trade(folder: Path, *, merchants: dict[str, str] | None = None,
                table: ExchangeTable | None = None, db_urls: dict[str, str] | None = None,
                customer_table: ExchangeTable | None = None,
                clock: Callable[[], float] = time.time, grace_ms: int = 60_000,
                close_seconds: float = 5.0) -> TradeStack:
    """Account manager ``am1``, acquirer ``acq1`` of operator ``op1``, merchant agents
    (id -> currency; default ``shop`` in JPY) and their account manager ``mam1``, databases
    in ``folder`` unless ``db_urls`` (party id -> URL) says otherwise; billing files in
    ``folder/billing-am1`` and ``folder/billing-mam1``."""
    folder.mkdir(parents=True, exist_ok=True)
    merchants = merchants or {"shop": "JPY"}
    urls = db_urls or {}
    keys = {pid: S.new_key()[0] for pid in ("am1", "acq1", "mam1", *merchants)}

    def db(pid: str) -> str:
        return urls.get(pid, f"sqlite:///{folder / (pid + '.db')}")

    parties: dict[str, Party] = {}
    agents: dict[str, MerchantAgent] = {}
    acquirer_peer_key = S.public_of(keys["acq1"])
    mam = MerchantAccount(MerchantAccountConfig(
        "mam1", keys["mam1"], db("mam1"), {"acq1": acquirer_peer_key},
        folder / "billing-mam1"), clock=clock)
    parties["mam1"] = _start(mam.app, "mam1", keys["mam1"])
    for mid, currency in merchants.items():
        peer = Peer("acq1", "", acquirer_peer_key)
        agents[mid] = MerchantAgent(MerchantConfig(mid, keys[mid], db(mid), peer, currency),
                                    clock=clock)
        parties[mid] = _start(agents[mid].app, mid, keys[mid])
    acquirer = Acquirer(AcquirerConfig(
        "acq1", keys["acq1"], db("acq1"), {"am1": S.public_of(keys["am1"])},
        {mid: MerchantPeer(mid, parties[mid].url, parties[mid].public, currency)
         for mid, currency in merchants.items()}, table or demo_table(),
        merchant_account=parties["mam1"].peer(), grace_ms=grace_ms,
        close_seconds=close_seconds), clock=clock)
    parties["acq1"] = _start(acquirer.app, "acq1", keys["acq1"])
    for agent in agents.values():   # the merchants push their records to it
        agent.config.acquirer = parties["acq1"].peer()
    account = AccountManager(AccountManagerConfig(
        "am1", keys["am1"], db("am1"), {"op1": parties["acq1"].peer()},
        table=customer_table or demo_table(issuer="bank-c"),
        billing=folder / "billing-am1"), clock=clock)
    parties["am1"] = _start(account.app, "am1", keys["am1"])
    acquirer.config.account_manager_urls["am1"] = parties["am1"].url
    return TradeStack(account, acquirer, agents, parties, "op1", mam)


def add_operator(stack: TradeStack, folder: Path, operator: str, merchants: dict[str, str],
                 *, table: ExchangeTable | None = None,
                 clock: Callable[[], float] = time.time, grace_ms: int = 60_000,
                 close_seconds: float = 5.0) -> None:
    """Another merchant operator beside ``op1``: its own mediating agent ``acq<n>`` and
    merchant account manager ``mam<n>`` (n from ``operator``'s digits), its merchants (id ->
    currency); the customers' account manager learns to reach it."""
    n = "".join(ch for ch in operator if ch.isdigit()) or "2"
    aid, mid_ = f"acq{n}", f"mam{n}"
    keys = {pid: S.new_key()[0] for pid in (aid, mid_, *merchants)}

    def db(pid: str) -> str:
        return f"sqlite:///{folder / (pid + '.db')}"

    mam = MerchantAccount(MerchantAccountConfig(mid_, keys[mid_], db(mid_),
                                                {aid: S.public_of(keys[aid])},
                                                folder / f"billing-{mid_}"), clock=clock)
    stack.parties[mid_] = _start(mam.app, mid_, keys[mid_])
    for mid, currency in merchants.items():
        agent = MerchantAgent(MerchantConfig(mid, keys[mid], db(mid),
                                             Peer(aid, "", S.public_of(keys[aid])), currency),
                              clock=clock)
        stack.merchants[mid] = agent
        stack.parties[mid] = _start(agent.app, mid, keys[mid])
        stack.operator_of[mid] = operator
    am = stack.am
    acquirer = Acquirer(AcquirerConfig(
        aid, keys[aid], db(aid), {am.id: am.public},
        {mid: MerchantPeer(mid, stack.url(mid), stack.parties[mid].public, currency)
         for mid, currency in merchants.items()}, table or demo_table(),
        {am.id: am.url}, stack.parties[mid_].peer(), grace_ms=grace_ms,
        close_seconds=close_seconds), clock=clock)
    stack.parties[aid] = _start(acquirer.app, aid, keys[aid])
    for mid in merchants:
        stack.merchants[mid].config.acquirer = stack.parties[aid].peer()
    stack.account.config.operators[operator] = stack.parties[aid].peer()
    stack.others[operator] = (acquirer, mam)

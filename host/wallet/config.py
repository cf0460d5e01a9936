"""The settings of the wallet's servers, and their TOML files (``svcard serve wallet-web |
wallet-gateway | wallet-fin --config FILE``).

Every link key is 32 bytes (64 hex digits; ``key_file``/``key_env`` also work). The web server
and the gateway share ``web_key``; the gateway and the financial system ``fin_key``; each mall
has its own key with the gateway, and each cash agent with the financial system.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field

from ..kit.config import (
    CurrencyCode,
    Hex6,
    Hex8,
    PosInt,
    SecretHex32,
    SecretText,
    Section,
    Url,
    db_setting,
    parse_config,
)
from .links import ID


@dataclass
class FinConfig:
    """The financial system: its own secret-digest key, the gateway's link key, the agents'."""

    secret_key: bytes = field(repr=False)
    gateway_keys: dict[str, bytes] = field(repr=False)
    agent_keys: dict[str, bytes] = field(default_factory=dict, repr=False)
    db_url: str = field(default="sqlite:///wallet-fin.db", repr=False)
    mail_dir: Path = Path("wallet-mail")
    currency: int = 156
    max_balance: int = 100_000_00
    max_failures: int = 5
    van_keys: dict[str, bytes] = field(default_factory=dict, repr=False)
    gateway_url: str = ""                # where movements are reported ("": not reported)
    report_seconds: float = 2.0          # how often unsent reports are tried again


@dataclass
class PurseSettings:
    """The gateway's side of a *real* card (a purse chip card): the gateway is a merchant of
    seed 002's payment server for each mall (a card's purse purchase is made to the mall's
    merchant id, under the key that merchant shares with the payment server), and the bank of
    seed 002's load flow (its id and the key it shares with the load server)."""

    public_url: str                       # the gateway as the card helper reaches it
    payment_url: str = ""                 # seed 002's payment server
    payment_terminal: bytes = b""         # its PSAM pool's terminal id (6 bytes)
    merchants: dict[str, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    load_url: str = ""                    # seed 002's load server
    load_terminal: bytes = b""            # its load terminal id (6 bytes)
    bank_id: bytes = b""                  # the gateway's bank id at the load server (8 bytes)
    bank_key: bytes = field(default=b"", repr=False)   # shared with the load server
    balance_limit: int = 100_000_00       # the most a real card may hold after a load
    exponent: int = 2                     # the currency's exponent on the purse


@dataclass
class GatewayConfig:
    """The payment gateway: the web server's key, each mall's key and origin, the financial
    system's address and key, and its own key for the applicant digests."""

    secret_key: bytes = field(repr=False)
    web_keys: dict[str, bytes] = field(repr=False)
    mall_keys: dict[str, bytes] = field(repr=False)
    mall_origins: dict[str, str]
    fin_url: str
    fin_key: bytes = field(repr=False)
    party: str = "gateway"
    db_url: str = field(default="sqlite:///wallet-gateway.db", repr=False)
    currency: int = 156
    max_purchase_ms: int = 3_600_000     # a purchase may expire at most this far ahead
    statement_dir: Path | None = None    # yesterday's statements written here (None: not)
    statement_seconds: float = 3600.0    # how often (each time: the same files again)
    purse: PurseSettings | None = None   # real cards (None: virtual cards only)


@dataclass
class WebConfig:
    """The electronic payment web server: the gateway's address and the key it signs with."""

    gateway_url: str
    gateway_key: bytes = field(repr=False)
    party: str = "web"
    db_url: str = field(default="sqlite:///wallet-web.db", repr=False)
    session_seconds: int = 1800
    login_failures: int = 5              # per member and per address, in each window
    login_window_seconds: int = 900
    secure_cookie: bool = False          # True behind HTTPS


@dataclass
class VanConfig:
    """The VAN server (FIG. 6: 190): each mall's key, the financial system's address and key."""

    mall_keys: dict[str, bytes] = field(repr=False)
    fin_url: str
    fin_key: bytes = field(repr=False)
    party: str = "van"
    db_url: str = field(default="sqlite:///wallet-van.db", repr=False)


class PartyEntry(Section):
    id: str = Field(pattern=ID.pattern)
    key: SecretHex32
    origin: Url | None = None


class FinFile(Section):
    db: SecretText | None = None
    secret_key: SecretHex32
    mail_dir: str = "wallet-mail"
    currency: CurrencyCode = 156
    max_balance: PosInt = 100_000_00
    gateway: list[PartyEntry] = Field(min_length=1, max_length=16)
    agent: list[PartyEntry] = Field(default_factory=list, max_length=1000)
    van: list[PartyEntry] = Field(default_factory=list, max_length=16)
    gateway_url: Url | None = None


class MerchantEntry(Section):
    """A ``[[purse.merchant]]``: a mall's merchant id at the payment server and their key."""

    mall: str = Field(pattern=ID.pattern)
    merchant_id: Hex8
    key: SecretHex32


class PurseFile(Section):
    public_url: Url
    payment_url: Url | None = None
    payment_terminal_id: Hex6 | None = None
    merchant: list[MerchantEntry] = Field(default_factory=list, max_length=10_000)
    load_url: Url | None = None
    load_terminal_id: Hex6 | None = None
    bank_id: Hex8 | None = None
    bank_key: SecretHex32 | None = None
    balance_limit: PosInt = 100_000_00


class GatewayFile(Section):
    db: SecretText | None = None
    secret_key: SecretHex32
    fin_url: Url
    fin_key: SecretHex32
    currency: CurrencyCode = 156
    web: list[PartyEntry] = Field(min_length=1, max_length=16)
    mall: list[PartyEntry] = Field(default_factory=list, max_length=10_000)
    statement_dir: str | None = None
    purse: PurseFile | None = None


class VanFile(Section):
    db: SecretText | None = None
    party: str = Field(default="van", pattern=ID.pattern)
    fin_url: Url
    fin_key: SecretHex32
    mall: list[PartyEntry] = Field(min_length=1, max_length=10_000)


class WebFile(Section):
    db: SecretText | None = None
    gateway_url: Url
    gateway_key: SecretHex32
    secure_cookie: bool = False


def fin_config(path: Path, db_url: str | None = None) -> FinConfig:
    f = parse_config(FinFile, path)
    mail = Path(f.mail_dir)
    return FinConfig(f.secret_key, {p.id: p.key for p in f.gateway},
                     {p.id: p.key for p in f.agent},
                     mail_dir=mail if mail.is_absolute() else path.parent / mail,
                     currency=f.currency, max_balance=f.max_balance,
                     van_keys={p.id: p.key for p in f.van},
                     gateway_url=f.gateway_url or "", **db_setting(f.db, db_url))


def gateway_config(path: Path, db_url: str | None = None) -> GatewayConfig:
    f = parse_config(GatewayFile, path)
    statements = Path(f.statement_dir) if f.statement_dir else None
    if statements is not None and not statements.is_absolute():
        statements = path.parent / statements
    purse = None
    if f.purse is not None:
        u = f.purse
        purse = PurseSettings(u.public_url.rstrip("/"), (u.payment_url or "").rstrip("/"),
                              u.payment_terminal_id or b"",
                              {m.mall: (m.merchant_id, m.key) for m in u.merchant},
                              (u.load_url or "").rstrip("/"), u.load_terminal_id or b"",
                              u.bank_id or b"", u.bank_key or b"", u.balance_limit)
    return GatewayConfig(f.secret_key, {p.id: p.key for p in f.web},
                         {p.id: p.key for p in f.mall},
                         {p.id: (p.origin or "").rstrip("/") for p in f.mall},
                         f.fin_url, f.fin_key, currency=f.currency, statement_dir=statements,
                         purse=purse, **db_setting(f.db, db_url))


def web_config(path: Path, db_url: str | None = None) -> WebConfig:
    f = parse_config(WebFile, path)
    return WebConfig(f.gateway_url, f.gateway_key, secure_cookie=f.secure_cookie,
                     **db_setting(f.db, db_url))


def van_config(path: Path, db_url: str | None = None) -> VanConfig:
    f = parse_config(VanFile, path)
    return VanConfig({p.id: p.key for p in f.mall}, f.fin_url, f.fin_key, party=f.party,
                     **db_setting(f.db, db_url))

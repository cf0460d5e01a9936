"""Personalisation: a TOML profile in, a card image out.

A profile names its ``kind`` (``iep``, ``psam`` or ``hsm``). Keys come either from an issuer
file (master keys; card keys are then diversified from the application serial, optionally first
by the issuer id) or, for an IEP, as explicit card keys. Paths in a profile are relative to the
profile's own folder. See ``docs/profiles.md`` for every field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from ..protocols import crypto, mac_schemes
from ..protocols import purse as P
from .goods import RESERVED_SFIS, GoodsFile, GoodsFiles
from .hsm import HsmState, IssuerLoadKeys
from .iep import IepState, Purse
from .iep_commands.lockout import DEFAULT_MAC_FAILURE_LIMIT
from .iep_commands.pin import encode_pin
from .image import new_image
from .keys import DEFAULT_SCHEME, IssuerScheme, KeyEntry
from .loyalty import POINTS_CURRENCY, CardFacts, LoyaltyProfile, programmes_from_profile
from .psam import IssuerKey, PsamState
from .runtime import check_atr, default_atr
from .storage import ProfileError as ProfileError  # (re-exported: defined there, light to catch)
from .toml_schema import (
    SECRET,
    U32,
    Byte,
    CurrencyCode,
    CurrencyExponent,
    Date,
    Hex4,
    Hex6,
    Hex8,
    Hex9,
    Hex10,
    HexAid,
    HexAtr,
    HexByteName,
    SecretHex16,
    Section,
    check,
    fits,
    one_of,
    read_document,
)

DEFAULT_IEP_AID = P.DEFAULT_IEP_AID
DEFAULT_PSAM_AID = P.DEFAULT_PSAM_AID
DEFAULT_HSM_AID = P.DEFAULT_HSM_AID


# --- the files, as pydantic models ------------------------------------------------------------

def _pin(value: str) -> str:
    try:
        encode_pin(value)
    except ValueError as exc:
        raise PydanticCustomError("svcard", "{text}", {"text": str(exc)}) from None
    return value


class MasterKey(Section):
    """A ``[[purchase_keys]]`` or ``[[load_keys]]`` entry of an issuer file."""

    index: Byte
    version: Byte
    algorithm: Byte = 0
    master_key: SecretHex16


class IssuerFile(Section):
    issuer_id: Hex8
    diversify_by_issuer: bool = False
    tac_master_key: SecretHex16
    purchase_keys: list[MasterKey] = Field(min_length=1)
    load_keys: list[MasterKey] = Field(min_length=1)
    unload_keys: list[MasterKey] = Field(default_factory=list)   # optional: ED unload (DULK)
    update_keys: list[MasterKey] = Field(default_factory=list)   # optional: overdraft (DUK)
    goods_key: MasterKey | None = None   # optional: secure-messaging goods writes (04 DC/E2)
    # which algorithm each algorithm id a card may answer stands for, e.g. {"00" = "3des",
    # "01" = "3des"}; empty: a card answers exactly its key's algorithm id
    algorithm_ids: dict[HexByteName, Annotated[str, one_of(crypto.ALGORITHMS)]] = Field(
        default_factory=dict)
    mac_scheme: Annotated[str, one_of(mac_schemes.NAMES)] = mac_schemes.DEFAULT
    # "points": a loyalty programme's keys (card/loyalty.py); never in a money PSAM or HSM
    unit: Literal["money", "points"] = "money"


class CardKey(Section):
    """An explicit card key of an IEP profile (``[[keys.purchase]]``, ``[[keys.load]]``)."""

    index: Byte
    version: Byte = 1
    algorithm: Byte = 0
    key: SecretHex16


class CardKeys(Section):
    tac: SecretHex16
    purchase: list[CardKey] = Field(min_length=1)
    load: list[CardKey] = Field(min_length=1)
    unload: list[CardKey] = Field(default_factory=list)
    update: list[CardKey] = Field(default_factory=list)
    goods: CardKey | None = None


class Balances(Section):
    ep: U32 = 0
    ed: U32 = 0


class Pin(Section):
    value: Annotated[str, AfterValidator(_pin), SECRET] | None = None
    try_limit: Annotated[int, Field(ge=1, le=15)] = 3


class Holder(Section):
    name: Annotated[str, fits(20)] = ""
    id_number: Annotated[str, fits(32, "ascii")] = ""
    card_type: Byte = 0
    staff_flag: Byte = 0
    id_type: Byte = 0


class GoodsFileProfile(Section):
    """A ``[[goods]]`` entry of an IEP profile: one goods record file (card/goods.py)."""

    sfi: Annotated[int, Field(ge=1, le=30)]
    kind: Literal["ticket", "coupon", "transit", "voucher"]
    records: Annotated[int, Field(ge=1, le=254)] = 8


class Profile(Section):
    """What every kind of profile may hold."""

    kind: str
    issuer: str | None = None
    issuers: list[str] | None = Field(default=None, min_length=1)
    aid: HexAid | None = None
    atr: HexAtr | None = None
    t0: bool = False


class IepProfile(Profile):
    app_serial: Hex10
    start_date: Date
    expiry_date: Date
    keys: CardKeys | None = None
    issuer_id: Hex8 | None = None
    label: Annotated[str, fits(16, "ascii")] = "SVCARD ED/EP"
    app_type: Annotated[int, Field(ge=1, le=3)] = 3
    app_version: Byte = 1
    currency_code: CurrencyCode = 156
    currency_exponent: CurrencyExponent = 2
    balance_limit: U32 = 100_000_00
    balances: Balances = Balances()
    pin: Pin = Pin()
    holder: Holder = Holder()
    fixed_random: Hex4 | None = None
    mac_failure_limit: Annotated[int, Field(ge=1, le=255)] = DEFAULT_MAC_FAILURE_LIMIT
    log_counter: Literal["before", "after"] = "before"   # the log record's counter
    uid: Hex9 | None = None   # answered to GET DATA 00 00; MAC1 data in changsha-metro
    mac_scheme: Annotated[str, one_of(mac_schemes.NAMES)] | None = None   # explicit keys only
    goods: list[GoodsFileProfile] | None = None   # goods record files; none given: the default
    capp_plain_update: bool = False   # plain 80 DC may write goods (default: MAC'd 84 DE only)
    loyalty: list[LoyaltyProfile] = Field(default_factory=list)   # programmes (card/loyalty.py)


class PsamProfile(Profile):
    terminal_id: Hex6
    psam_serial: Hex10
    batch_key: SecretHex16
    default_issuer: Hex8 | None = None
    currency_code: CurrencyCode = 156
    currency_exponent: CurrencyExponent = 2
    next_ttn: U32 = 1
    blocked_cards: list[Hex8] = Field(default_factory=list)


class HsmProfile(Profile):
    pass


KINDS: dict[str, type[Profile]] = {"iep": IepProfile, "psam": PsamProfile, "hsm": HsmProfile}


class _Kind(BaseModel):
    model_config = ConfigDict(strict=True)
    kind: Annotated[str, one_of(KINDS)]


# --- issuer files -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Issuer:
    """An issuer file: its id and master keys (test material only in fixtures/)."""

    issuer_id: bytes
    purchase: list[KeyEntry]
    load: list[KeyEntry]
    tac: bytes
    two_level: bool
    unload: tuple[KeyEntry, ...] = ()
    update: tuple[KeyEntry, ...] = ()
    scheme: IssuerScheme = DEFAULT_SCHEME
    goods: KeyEntry | None = None
    points: bool = False   # a loyalty programme's issuer file (unit = "points")

    def __repr__(self) -> str:
        return f"Issuer({self.issuer_id.hex()})"


def load_issuer(path: Path) -> Issuer:
    """The issuer file at ``path``: its id, master keys and diversification."""
    f = check(IssuerFile, read_document(path, ProfileError), path, ProfileError)

    def entries(name: str, keys: list[MasterKey]) -> list[KeyEntry]:
        seen: set[int] = set()
        for i, k in enumerate(keys):
            if k.index in seen:
                raise ProfileError(f"{path}: {name}[{i}].index: {k.index} is given twice")
            seen.add(k.index)
        for i, k in enumerate(keys):
            if f.algorithm_ids and f"{k.algorithm:02X}" not in f.algorithm_ids:
                raise ProfileError(f"{path}: {name}[{i}].algorithm: {k.algorithm:02X} is not "
                                   "in algorithm_ids")
        return [KeyEntry(k.index, k.version, k.algorithm, k.master_key) for k in keys]

    scheme = IssuerScheme(tuple(sorted((int(i, 16), a) for i, a in f.algorithm_ids.items())),
                          f.mac_scheme)
    goods = entries("goods_key", [f.goods_key])[0] if f.goods_key else None
    purse_masters = {k.master_key for k in (*f.purchase_keys, *f.load_keys, *f.unload_keys,
                                            *f.update_keys)} | {f.tac_master_key}
    if goods is not None and goods.key in purse_masters:
        # the fulfilment server holds the goods key: it must open no purse key
        raise ProfileError(f"{path}: goods_key.master_key: the same as one of the issuer's "
                           "purse master keys (the fulfilment server that holds it could "
                           "then make the purse's MACs or TACs); give it a key of its own")
    return Issuer(f.issuer_id, entries("purchase_keys", f.purchase_keys),
                  entries("load_keys", f.load_keys), f.tac_master_key, f.diversify_by_issuer,
                  tuple(entries("unload_keys", f.unload_keys)),
                  tuple(entries("update_keys", f.update_keys)), scheme, goods,
                  f.unit == "points")


# --- profiles ---------------------------------------------------------------------------------

def image_from_profile(path: str | Path, **overrides: Any) -> dict[str, Any]:
    """Read a profile and build the card image it describes; ``overrides`` replace top-level
    profile fields (e.g. ``app_serial`` for many cards from one profile) and are checked as the
    file's own fields are."""
    path = Path(path)
    data = {**read_document(path, ProfileError), **overrides}
    kind = check(_Kind, data, path, ProfileError).kind
    profile = check(KINDS[kind], data, path, ProfileError)
    if isinstance(profile, IepProfile):
        app_state = _iep(profile, path)
    elif isinstance(profile, PsamProfile):
        app_state = _psam(profile, path)
    else:
        app_state = _hsm(profile, path)
    if profile.atr is not None:
        try:
            check_atr(profile.atr, profile.t0)
        except ValueError as exc:
            raise ProfileError(f"{path}: atr: {exc}") from None
    image = new_image(kind, app_state, atr=profile.atr or default_atr(profile.t0), t0=profile.t0)
    if isinstance(profile, IepProfile) and profile.loyalty:
        image["loyalty"] = programmes_from_profile(
            profile.loyalty, CardFacts(profile.aid or DEFAULT_IEP_AID, profile.app_serial,
                                       profile.start_date, profile.expiry_date, profile.uid,
                                       profile.fixed_random, _card_keys(app_state)),
            path, load_issuer, ProfileError)
    return image


def _card_keys(app: dict[str, Any]) -> frozenset[bytes]:
    """Every key of a purse's image state (``app``): purse keys, TAC key, goods key."""
    entries = [*app["purchase_keys"], *app["load_keys"], *app["unload_keys"],
               *app["update_keys"], *([app["goods_key"]] if app.get("goods_key") else [])]
    return frozenset({bytes.fromhex(app["tac_key"])} | {bytes.fromhex(k["key"]) for k in entries})


def _issuers(profile: Profile, path: Path) -> list[Issuer]:
    if profile.issuer is not None and profile.issuers is not None:
        raise ProfileError(f"{path}: issuers: give issuer or issuers, not both")
    if profile.issuers is not None:
        names = [(f"issuers[{i}]", n) for i, n in enumerate(profile.issuers)]
    elif profile.issuer is not None:
        names = [("issuer", profile.issuer)]
    else:
        raise ProfileError(f"{path}: issuer: missing (required): an issuer key file "
                           "('issuer', or 'issuers' for several)")
    out = []
    for field, name in names:
        try:
            out.append(load_issuer(path.parent / name))
        except ProfileError as exc:
            raise ProfileError(f"{path}: {field}: {exc}") from None
    return out


def _text(value: str, size: int, encoding: str = "utf-8") -> bytes:
    """``value`` padded with zeros to ``size`` bytes (the model checked that it fits)."""
    raw = value.encode(encoding)
    return raw + bytes(size - len(raw))


def _iep(p: IepProfile, path: Path) -> dict[str, Any]:
    serial = p.app_serial
    if p.keys is not None:  # explicit card keys
        if p.issuer is not None or p.issuers is not None:
            raise ProfileError(f"{path}: keys: give explicit keys or an issuer file, not both")
        if p.issuer_id is None:
            raise ProfileError(f"{path}: issuer_id: missing (required with explicit keys)")

        def explicit(name: str, keys: list[CardKey]) -> dict[int, KeyEntry]:
            out: dict[int, KeyEntry] = {}
            for i, k in enumerate(keys):
                if k.index in out:
                    raise ProfileError(f"{path}: keys.{name}[{i}].index: {k.index} is given "
                                       "twice")
                out[k.index] = KeyEntry(k.index, k.version, k.algorithm, k.key)
            return out
        purchase, load = explicit("purchase", p.keys.purchase), explicit("load", p.keys.load)
        unload, update = explicit("unload", p.keys.unload), explicit("update", p.keys.update)
        tac, issuer_id = p.keys.tac, p.issuer_id
        g = p.keys.goods
        goods = KeyEntry(g.index, g.version, g.algorithm, g.key) if g else None
        if g is not None and g.key in {tac} | {k.key for keys in (purchase, load, unload, update)
                                               for k in keys.values()}:
            raise ProfileError(f"{path}: keys.goods.key: the same as one of the card's purse "
                               "keys; give it a key of its own")
    else:
        if p.issuer_id is not None:
            raise ProfileError(f"{path}: issuer_id: only with explicit keys (the issuer file "
                               "names the issuer)")
        issuer = _issuers(p, path)[0]
        issuer_id = issuer.issuer_id
        level = issuer.issuer_id if issuer.two_level else None

        def diversified(entries: Sequence[KeyEntry]) -> dict[int, KeyEntry]:
            return {e.index: KeyEntry(e.index, e.version, e.algorithm,
                                      crypto.card_key(e.key, serial, level)) for e in entries}
        purchase, load = diversified(issuer.purchase), diversified(issuer.load)
        unload, update = diversified(issuer.unload), diversified(issuer.update)
        tac = crypto.card_key(issuer.tac, serial, level)
        goods = next(iter(diversified([issuer.goods]).values())) if issuer.goods else None
    scheme = _iep_scheme(p, path, issuer.scheme.mac_scheme if p.keys is None else None)
    for purse in ("ep", "ed"):
        balance = getattr(p.balances, purse)
        if balance > p.balance_limit:
            raise ProfileError(f"{path}: balances.{purse}: expected at most balance_limit "
                               f"({p.balance_limit}), got {balance}")
    public = P.PublicAppData.build({
        "issuer_id": issuer_id, "app_type": p.app_type, "app_version": p.app_version,
        "app_serial": serial, "start_date": P.bcd_date(p.start_date),
        "expiry_date": P.bcd_date(p.expiry_date), "reserved": bytes(2),
    })
    h = p.holder
    holder_data = P.HolderData.build({
        "card_type": h.card_type, "staff_flag": h.staff_flag, "name": _text(h.name, 20),
        "id_number": _text(h.id_number, 32, "ascii"), "id_type": h.id_type,
    })
    state = IepState(
        aid=p.aid or DEFAULT_IEP_AID, label=p.label, public_data=public,
        holder_data=holder_data, currency_code=p.currency_code,
        currency_exponent=p.currency_exponent, balance_limit=p.balance_limit,
        purchase_keys=purchase, load_keys=load, tac_key=tac, pin=p.pin.value,
        pin_try_limit=p.pin.try_limit, pin_tries_left=p.pin.try_limit,
        ep=Purse(balance=p.balances.ep), ed=Purse(balance=p.balances.ed),
        mac_failure_limit=p.mac_failure_limit, fixed_random=p.fixed_random,
        unload_keys=unload, update_keys=update, log_counter=p.log_counter,
        mac_scheme=scheme, uid=p.uid, goods_key=goods,
        capp_plain_update=p.capp_plain_update,
    )
    state.goods = _goods_files(p, path)
    return state.to_json()


def _goods_files(p: IepProfile, path: Path) -> GoodsFiles:
    """The card's goods record files: ``[[goods]]`` (``goods = []`` for none), else the
    default four (card/goods.py)."""
    if p.goods is None:
        return GoodsFiles()
    files: dict[int, GoodsFile] = {}
    for i, g in enumerate(p.goods):
        if g.sfi in RESERVED_SFIS:
            raise ProfileError(f"{path}: goods[{i}].sfi: {g.sfi:02X} is a purse file (public "
                               "data 15, holder data 16, log 18)")
        if g.sfi in files:
            raise ProfileError(f"{path}: goods[{i}].sfi: {g.sfi:02X} is given twice")
        files[g.sfi] = GoodsFile.from_json({"sfi": g.sfi, "kind": g.kind, "records": g.records})
    return GoodsFiles(files)


def _iep_scheme(p: IepProfile, path: Path, from_issuer: str | None) -> str:
    """The card's MAC-scheme profile (its issuer file's, or ``mac_scheme`` with explicit
    keys), checked against ``uid``: given exactly when the profile puts a UID into MAC1."""
    if from_issuer is not None and p.mac_scheme is not None:
        raise ProfileError(f"{path}: mac_scheme: only with explicit keys (the issuer file "
                           "names the MAC scheme)")
    name = from_issuer or p.mac_scheme or mac_schemes.DEFAULT
    size = mac_schemes.scheme(name).uid_size
    if size and p.uid is None:
        raise ProfileError(f"{path}: uid: missing (required: the {name} MAC scheme puts the "
                           f"card's {size}-byte UID into MAC1)")
    if not size and p.uid is not None:
        raise ProfileError(f"{path}: uid: only for a MAC scheme with a UID in MAC1 (this "
                           f"card's is {name})")
    return name


def _one_unit(issuers: list[Issuer], path: Path, points: bool | None, what: str) -> None:
    """Refuse a PSAM or HSM that would hold a loyalty programme's keys (``unit = "points"``)
    beside money issuers' keys, or a points PSAM (currency 999) with money keys: a client that
    lied about a card's currency could then pay money with points, or load points as money."""
    field = "issuers" if len(issuers) > 1 else "issuer"
    for i, issuer in enumerate(issuers):
        want = issuers[0].points if points is None else points
        if issuer.points != want:
            unit = "points" if issuer.points else "money"
            raise ProfileError(f"{path}: {field}{f'[{i}]' if field == 'issuers' else ''}: "
                               f"issuer {issuer.issuer_id.hex().upper()} is a {unit} issuer "
                               f"and {what}: points and money never share keys")


def _psam(p: PsamProfile, path: Path) -> dict[str, Any]:
    issuers = _issuers(p, path)
    _one_unit(issuers, path, p.currency_code == POINTS_CURRENCY,
              f"this PSAM's currency_code is {p.currency_code} (999 = points)")
    keys = [IssuerKey(i.issuer_id, k.version, k.algorithm, k.key)
            for i in issuers for k in i.purchase]
    state = PsamState(
        aid=p.aid or DEFAULT_PSAM_AID, terminal_id=p.terminal_id, psam_serial=p.psam_serial,
        default_issuer=p.default_issuer or issuers[0].issuer_id, keys=keys,
        batch_key=p.batch_key, currency_code=p.currency_code,
        currency_exponent=p.currency_exponent, next_ttn=p.next_ttn,
        blocked=set(p.blocked_cards),
        schemes={i.issuer_id: i.scheme for i in issuers if i.scheme != DEFAULT_SCHEME},
    )
    return state.to_json()


def _hsm(p: Profile, path: Path) -> dict[str, Any]:
    issuers = _issuers(p, path)
    _one_unit(issuers, path, None, "this HSM holds the other unit's keys too")
    state = HsmState(
        aid=p.aid or DEFAULT_HSM_AID,
        issuers={i.issuer_id: IssuerLoadKeys(
            i.issuer_id, {k.version: (k.algorithm, k.key) for k in i.load}, i.tac, i.two_level,
            unload_keys={k.version: (k.algorithm, k.key) for k in i.unload},
            update_keys={k.version: (k.algorithm, k.key) for k in i.update}, scheme=i.scheme)
            for i in issuers},
    )
    return state.to_json()

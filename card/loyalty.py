"""Loyalty programmes on the IEP card (seed 002 FIG. 16): one ADF per programme.

A programme (airline miles, hotel points) is an application of its own beside the purse, at its
own AID, selected by SELECT, holding one EP purse of *points* with its own keys (purchase =
redeem, load, TAC), counters, cyclic log and proof. Its commands are PBOC's EP commands,
unchanged (:mod:`svcard.card.iep_commands.loyalty`), so every terminal, PSAM and HSM that
handles a purse handles a programme: the PSAM and the HSM find the programme's keys by the
issuer id in its EF 0x15, exactly as for a purse's issuer.

Points are no money: the programme's SELECT answer states currency ``999`` (ISO 4217 ``XXX``,
"no currency") with exponent 0, and the host reads any purse with that code as points.

In the card image a programme is one entry of the top-level ``"loyalty"`` list (beside
``"app"``, the purse), and every write of a programme is an atomic write of the whole image,
in the same two steps as the purse's (balance, counter, proof and pending log; then the log).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..protocols import crypto, mac_schemes
from ..protocols import purse as P
from ..protocols import sw as SW
from .goods import GoodsFiles
from .iep import Iep, IepState, Purse
from .iep_commands import loyalty as commands
from .iep_commands.lockout import DEFAULT_MAC_FAILURE_LIMIT
from .keys import IssuerScheme, KeyEntry
from .runtime import CardError
from .storage import ImageError
from .toml_schema import U32, Byte, Hex8, HexAid, SecretHex16, Section, fits

POINTS_CURRENCY = 999     # ISO 4217 XXX, "no currency": the SELECT answer of a programme
POINTS_EXPONENT = 0
PROGRAMME_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,15}")
MAX_PROGRAMMES = 8        # a card holds at most this many programmes (every input is bounded)
DEFAULT_POINTS_LIMIT = 10_000_000

# the IepState fields a programme keeps in the image; the rest are fixed for a programme
_KEPT = ("aid", "label", "public_data", "balance_limit", "purchase_keys", "load_keys",
         "tac_key", "ep", "log", "proof", "pending_log", "fixed_random", "mac_failure_limit",
         "mac_scheme", "uid", "purchase_mac_failures", "load_mac_failures", "log_counter")
_NO_HOLDER = "00" * 55


def check_name(name: object) -> str:
    if not isinstance(name, str) or not PROGRAMME_NAME.fullmatch(name):
        raise ValueError("a programme id is 1-16 characters: a-z, 0-9 and '-', first not '-'")
    return name


class Programme(Iep):
    """One loyalty programme's ADF: an EP purse of points with the programme's keys."""

    secure_messaging_classes: tuple[int, ...] = ()

    def __init__(self, programme: str, state: IepState,
                 persist: Callable[[], None] | None = None) -> None:
        super().__init__(state, persist)
        self.programme = check_name(programme)
        self.handlers = {key: partial(command, self) for key, command in commands.COMMANDS.items()}
        self.keep_pending = tuple(self.handlers[key] for key in commands.COMPLETIONS)

    def __repr__(self) -> str:
        return f"Programme({self.programme}, aid={self.aid.hex()}, points={self.state.ep.balance})"

    def purse_for(self, p2: int) -> Purse:
        """A programme has one purse, the EP (P2 ``02``); anything else ``6A86``."""
        if p2 != P.PURSE_EP:
            raise CardError(SW.WRONG_P1P2)
        return self.state.ep

    def to_state(self) -> dict[str, Any]:
        return programme_json(self.programme, self.state)


def programme_json(programme: str, state: IepState) -> dict[str, Any]:
    full = state.to_json()
    return {"programme": programme, **{k: full[k] for k in _KEPT}}


def programme_from_json(d: dict[str, Any]) -> Programme:
    """A programme from its image entry (ValueError, KeyError, TypeError when damaged)."""
    data = {k: d[k] for k in _KEPT if k in d}
    data.update(holder_data=_NO_HOLDER, currency_code=POINTS_CURRENCY,
                currency_exponent=POINTS_EXPONENT, ed=Purse().to_json(),
                goods={"files": []})
    return Programme(str(d["programme"]), IepState.from_json(data))


def programmes_from_image(image: dict[str, Any], source: str = "card image"
                          ) -> list[Programme]:
    """The image's programmes, their fields checked first (:func:`check_programmes`)."""
    if "loyalty" not in image:
        return []
    check_programmes(image, source)
    return [programme_from_json(entry) for entry in image["loyalty"]]


# --- checking an image's programmes ------------------------------------------------------------

_HEX = r"^(?:[0-9A-Fa-f]{2})"
HexText = Annotated[str, Field(pattern=_HEX + "+$")]
Hex16Text = Annotated[str, Field(pattern=_HEX + "{16}$")]
Hex30Text = Annotated[str, Field(pattern=_HEX + "{30}$")]
AidText = Annotated[str, Field(pattern=_HEX + "{5,16}$")]   # ISO 7816-4: 5 to 16 bytes
LogText = Annotated[str, Field(pattern=_HEX + f"{{{P.LOG_RECORD_SIZE}}}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class _Key(_Strict):
    index: Annotated[int, Field(ge=0, le=255)]
    version: Annotated[int, Field(ge=0, le=255)]
    algorithm: Annotated[int, Field(ge=0, le=255)] = 0
    key: Hex16Text


class _Purse(_Strict):
    balance: Annotated[int, Field(ge=0, le=0xFFFFFFFF)]
    online_counter: Annotated[int, Field(ge=0, le=0xFFFF)]
    offline_counter: Annotated[int, Field(ge=0, le=0xFFFF)]


class _Programme(_Strict):
    programme: Annotated[str, Field(pattern="^" + PROGRAMME_NAME.pattern + "$")]
    aid: AidText
    label: Annotated[str, fits(16, "ascii")] | None = None   # the FCI's label
    public_data: Hex30Text
    balance_limit: Annotated[int, Field(ge=0, le=0xFFFFFFFF)]
    purchase_keys: Annotated[list[_Key], Field(max_length=256)]
    load_keys: Annotated[list[_Key], Field(max_length=256)]
    tac_key: Hex16Text
    ep: _Purse
    log: Annotated[list[LogText], Field(max_length=P.LOG_RECORDS)] = []
    pending_log: LogText | None = None
    fixed_random: Annotated[str, Field(pattern=_HEX + "{4}$")] | None = None
    uid: Annotated[str, Field(pattern=_HEX + "{9}$")] | None = None


class _Loyalty(_Strict):
    loyalty: Annotated[list[_Programme], Field(max_length=MAX_PROGRAMMES)] = []


def check_programmes(image: dict[str, Any], source: str) -> None:
    """Refuse (:class:`ImageError` naming the file and the field, never a value) an image
    whose ``loyalty`` entries have the wrong type, size or range, or that is no purse card."""
    if "loyalty" not in image:
        return
    if image.get("kind") != "iep":
        raise ImageError(f"{source}: loyalty: only a purse card (kind iep) holds programmes")
    try:
        _Loyalty.model_validate({"loyalty": image["loyalty"]})
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
        raise ImageError(f"{source}: {where.lstrip('.')}: "
                         f"{str(error['msg']).removeprefix('Value error, ')}") from None


# --- personalisation: ``[[loyalty]]`` in an IEP profile ---------------------------------------

class ProgrammeKey(Section):
    index: Byte
    version: Byte = 1
    algorithm: Byte = 0
    key: SecretHex16


class ProgrammeKeys(Section):
    tac: SecretHex16
    purchase: list[ProgrammeKey] = Field(min_length=1)
    load: list[ProgrammeKey] = Field(min_length=1)


class LoyaltyProfile(Section):
    """A ``[[loyalty]]`` entry of an IEP profile: one programme's ADF (see docs/points.md)."""

    programme: Annotated[str, Field(pattern="^" + PROGRAMME_NAME.pattern + "$")]
    aid: HexAid
    label: Annotated[str, fits(16, "ascii")] | None = None
    issuer: str | None = None          # the programme's key file (an issuer file)
    keys: ProgrammeKeys | None = None  # or explicit card keys, with issuer_id
    issuer_id: Hex8 | None = None
    balance_limit: U32 = DEFAULT_POINTS_LIMIT
    points: U32 = 0
    mac_failure_limit: Annotated[int, Field(ge=1, le=255)] = DEFAULT_MAC_FAILURE_LIMIT


class IssuerKeys(Protocol):
    """What personalisation needs of an issuer file (card/personalise.py ``Issuer``)."""

    @property
    def issuer_id(self) -> bytes: ...
    @property
    def purchase(self) -> list[KeyEntry]: ...
    @property
    def load(self) -> list[KeyEntry]: ...
    @property
    def tac(self) -> bytes: ...
    @property
    def two_level(self) -> bool: ...
    @property
    def scheme(self) -> IssuerScheme: ...
    @property
    def points(self) -> bool: ...


@dataclass(frozen=True)
class CardFacts:
    """What a programme takes from the card it is on."""

    aid: bytes            # the purse's AID: no programme AID may overlap it
    serial: bytes         # EF 0x15 app serial, which diversifies the programme's keys
    start: dt.date
    expiry: dt.date
    uid: bytes | None
    fixed_random: bytes | None
    purse_keys: frozenset[bytes] = frozenset()   # the purse's card keys: no programme shares one


def programmes_from_profile(entries: Sequence[LoyaltyProfile], card: CardFacts, path: Path,
                            load_issuer: Callable[[Path], IssuerKeys],
                            error: type[Exception]) -> list[dict[str, Any]]:
    """The image entries of the profile's ``[[loyalty]]`` programmes; a bad one raises
    ``error`` naming ``path`` and the field."""
    if len(entries) > MAX_PROGRAMMES:
        raise error(f"{path}: loyalty: at most {MAX_PROGRAMMES} programmes on a card")
    out: list[dict[str, Any]] = []
    aids: list[bytes] = [card.aid]
    names: set[str] = set()
    taken = set(card.purse_keys)   # card keys of the purse and of the programmes before
    for i, e in enumerate(entries):
        where = f"{path}: loyalty[{i}]"
        if e.programme in names:
            raise error(f"{where}.programme: {e.programme} is given twice")
        names.add(e.programme)
        if any(a.startswith(e.aid) or e.aid.startswith(a) for a in aids):
            raise error(f"{where}.aid: overlaps the purse's or another programme's AID (SELECT "
                        "by a partial AID would be ambiguous)")
        aids.append(e.aid)
        if e.points > e.balance_limit:
            raise error(f"{where}.points: expected at most balance_limit ({e.balance_limit}), "
                        f"got {e.points}")
        issuer_id, purchase, load, tac, scheme = _keys(e, card.serial, path, where,
                                                       load_issuer, error)
        own = {tac} | {k.key for k in (*purchase.values(), *load.values())}
        if own & taken:
            # a load HSM or PSAM of the programme would then make MACs the purse (or another
            # programme) accepts: points turned into money by a client choosing the AID
            raise error(f"{where}.{'keys' if e.keys is not None else 'issuer'}: a key of this "
                        "programme is one of the purse's or another programme's on this card; "
                        "points and money (and two programmes) never share keys")
        taken |= own
        uid = card.uid if mac_schemes.scheme(scheme).uid_size else None
        if mac_schemes.scheme(scheme).uid_size and uid is None:
            raise error(f"{where}.issuer: its MAC scheme {scheme} needs the card's uid")
        public = P.PublicAppData.build({
            "issuer_id": issuer_id, "app_type": 2, "app_version": 1, "app_serial": card.serial,
            "start_date": P.bcd_date(card.start), "expiry_date": P.bcd_date(card.expiry),
            "reserved": bytes(2)})
        state = IepState(
            aid=e.aid, label=e.label or e.programme.upper(), public_data=public,
            holder_data=bytes(55), currency_code=POINTS_CURRENCY,
            currency_exponent=POINTS_EXPONENT, balance_limit=e.balance_limit,
            purchase_keys=purchase, load_keys=load, tac_key=tac, ep=Purse(balance=e.points),
            fixed_random=card.fixed_random, mac_failure_limit=e.mac_failure_limit,
            mac_scheme=scheme, uid=uid, goods=GoodsFiles({}))
        out.append(programme_json(e.programme, state))
    return out


def _keys(e: LoyaltyProfile, serial: bytes, path: Path, where: str,
          load_issuer: Callable[[Path], IssuerKeys], error: type[Exception]
          ) -> tuple[bytes, dict[int, KeyEntry], dict[int, KeyEntry], bytes, str]:
    if e.keys is not None:
        if e.issuer is not None:
            raise error(f"{where}.keys: give explicit keys or an issuer file, not both")
        if e.issuer_id is None:
            raise error(f"{where}.issuer_id: missing (required with explicit keys)")

        def explicit(name: str, keys: list[ProgrammeKey]) -> dict[int, KeyEntry]:
            found: dict[int, KeyEntry] = {}
            for j, k in enumerate(keys):
                if k.index in found:
                    raise error(f"{where}.keys.{name}[{j}].index: {k.index} is given twice")
                found[k.index] = KeyEntry(k.index, k.version, k.algorithm, k.key)
            return found
        return (e.issuer_id, explicit("purchase", e.keys.purchase),
                explicit("load", e.keys.load), e.keys.tac, mac_schemes.DEFAULT)
    if e.issuer is None:
        raise error(f"{where}.issuer: missing (required): the programme's key file, or "
                    "explicit keys with issuer_id")
    if e.issuer_id is not None:
        raise error(f"{where}.issuer_id: only with explicit keys (the issuer file names it)")
    try:
        issuer = load_issuer(path.parent / e.issuer)
    except ValueError as exc:
        raise error(f"{where}.issuer: {exc}") from None
    if not issuer.points:
        raise error(f"{where}.issuer: {e.issuer} is a money issuer; a programme's issuer file "
                    'says unit = "points" (points and money never share keys)')
    level = issuer.issuer_id if issuer.two_level else None

    def diversified(entries: Sequence[KeyEntry]) -> dict[int, KeyEntry]:
        return {k.index: KeyEntry(k.index, k.version, k.algorithm,
                                  crypto.card_key(k.key, serial, level)) for k in entries}
    return (issuer.issuer_id, diversified(issuer.purchase), diversified(issuer.load),
            crypto.card_key(issuer.tac, serial, level), issuer.scheme.mac_scheme)

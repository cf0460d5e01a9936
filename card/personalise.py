"""Personalisation: a TOML profile in, a card image out.

A profile names its ``kind`` (``iep``, ``psam`` or ``hsm``). Keys come either from an issuer
file (master keys; card keys are then diversified from the application serial, optionally first
by the issuer id) or, for an IEP, as explicit card keys. Paths in a profile are relative to the
profile's own folder. See ``docs/profiles.md`` for every field.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..protocols import crypto
from ..protocols import purse as P
from .hsm import HsmState, IssuerLoadKeys
from .iep import IepState, Purse
from .iep_commands.lockout import DEFAULT_MAC_FAILURE_LIMIT
from .iep_commands.pin import encode_pin
from .image import new_image
from .keys import KeyEntry
from .psam import IssuerKey, PsamState
from .runtime import DEFAULT_ATR

DEFAULT_IEP_AID = P.DEFAULT_IEP_AID
DEFAULT_PSAM_AID = P.DEFAULT_PSAM_AID
DEFAULT_HSM_AID = P.DEFAULT_HSM_AID


class ProfileError(ValueError):
    """A profile that cannot become a card; the message names the field."""


def _get(d: dict[str, Any], key: str, where: str, default: Any = ...) -> Any:
    if key in d:
        return d[key]
    if default is ...:
        raise ProfileError(f"{where}: missing field '{key}'")
    return default


def _hex(value: Any, size: int | None, field: str) -> bytes:
    if not isinstance(value, str):
        raise ProfileError(f"{field}: expected a hex string")
    try:
        raw = bytes.fromhex(value.replace(" ", ""))
    except ValueError:
        raise ProfileError(f"{field}: not hex") from None
    if size is not None and len(raw) != size:
        raise ProfileError(f"{field}: expected {size} bytes, got {len(raw)}")
    return raw


def _int(value: Any, field: str, lo: int = 0, hi: int = 0xFFFFFFFF) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProfileError(f"{field}: expected a whole number from {lo} to {hi}")
    return value


def _date(value: Any, field: str) -> bytes:
    if isinstance(value, dt.date):
        return P.bcd_date(value)
    text = str(value).replace("-", "")
    raw = _hex(text, 4, field)
    if not P.valid_date(raw):
        raise ProfileError(f"{field}: not a date (YYYY-MM-DD)")
    return raw


@dataclass(frozen=True)
class Issuer:
    """An issuer file: its id and master keys (test material only in fixtures/)."""

    issuer_id: bytes
    purchase: list[KeyEntry]
    load: list[KeyEntry]
    tac: bytes
    two_level: bool

    def __repr__(self) -> str:
        return f"Issuer({self.issuer_id.hex()})"


def load_issuer(path: Path) -> Issuer:
    data = _read_toml(path)
    where = str(path)

    def entries(name: str) -> list[KeyEntry]:
        items = _get(data, name, where)
        if not isinstance(items, list) or not items:
            raise ProfileError(f"{where}: '{name}' must be a list of keys")
        out = []
        for i, item in enumerate(items):
            f = f"{where}: {name}[{i}]"
            out.append(KeyEntry(_int(_get(item, "index", f), f + ".index", 0, 255),
                                _int(_get(item, "version", f), f + ".version", 0, 255),
                                _int(item.get("algorithm", 0), f + ".algorithm", 0, 255),
                                _hex(_get(item, "master_key", f), 16, f + ".master_key")))
        return out

    return Issuer(
        issuer_id=_hex(_get(data, "issuer_id", where), 8, f"{where}: issuer_id"),
        purchase=entries("purchase_keys"),
        load=entries("load_keys"),
        tac=_hex(_get(data, "tac_master_key", where), 16, f"{where}: tac_master_key"),
        two_level=bool(data.get("diversify_by_issuer", False)),
    )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ProfileError(f"no such file: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None


def image_from_profile(path: str | Path, **overrides: Any) -> dict[str, Any]:
    """Read a profile and build the card image it describes; ``overrides`` replace top-level
    profile fields (e.g. ``app_serial`` for many cards from one profile)."""
    path = Path(path)
    data = {**_read_toml(path), **overrides}
    kind = _get(data, "kind", str(path))
    builders = {"iep": _iep, "psam": _psam, "hsm": _hsm}
    if kind not in builders:
        raise ProfileError(f"{path}: kind must be one of iep, psam, hsm; got {kind!r}")
    app_state = builders[kind](data, path)
    atr = _hex(data["atr"], None, "atr") if "atr" in data else DEFAULT_ATR
    return new_image(kind, app_state, atr=atr, t0=bool(data.get("t0", False)))


def _issuers(data: dict[str, Any], path: Path) -> list[Issuer]:
    names = data.get("issuers") or ([data["issuer"]] if "issuer" in data else [])
    if not names:
        raise ProfileError(f"{path}: give 'issuer' (or 'issuers'): issuer key files")
    return [load_issuer(path.parent / str(n)) for n in names]


def _text(value: Any, size: int, field: str, encoding: str = "utf-8") -> bytes:
    raw = str(value).encode(encoding)
    if len(raw) > size:
        raise ProfileError(f"{field}: at most {size} bytes")
    return raw + bytes(size - len(raw))


def _iep(data: dict[str, Any], path: Path) -> dict[str, Any]:
    where = str(path)
    serial = _hex(_get(data, "app_serial", where), 10, "app_serial")
    keys = data.get("keys")
    if keys is not None:  # explicit card keys
        def explicit(name: str) -> dict[int, KeyEntry]:
            out = {}
            for i, item in enumerate(_get(keys, name, "keys")):
                f = f"keys.{name}[{i}]"
                out[_int(item["index"], f, 0, 255)] = KeyEntry(
                    _int(item["index"], f, 0, 255), _int(item.get("version", 1), f, 0, 255),
                    _int(item.get("algorithm", 0), f, 0, 255), _hex(item["key"], 16, f + ".key"))
            return out
        purchase, load = explicit("purchase"), explicit("load")
        tac = _hex(_get(keys, "tac", "keys"), 16, "keys.tac")
        issuer_id = _hex(_get(data, "issuer_id", where), 8, "issuer_id")
    else:
        issuer = _issuers(data, path)[0]
        issuer_id = issuer.issuer_id
        level = issuer.issuer_id if issuer.two_level else None

        def diversified(entries: list[KeyEntry]) -> dict[int, KeyEntry]:
            return {e.index: KeyEntry(e.index, e.version, e.algorithm,
                                      crypto.card_key(e.key, serial, level)) for e in entries}
        purchase, load = diversified(issuer.purchase), diversified(issuer.load)
        tac = crypto.card_key(issuer.tac, serial, level)
    public = P.PublicAppData.build({
        "issuer_id": issuer_id,
        "app_type": _int(data.get("app_type", 3), "app_type", 1, 3),
        "app_version": _int(data.get("app_version", 1), "app_version", 0, 255),
        "app_serial": serial,
        "start_date": _date(_get(data, "start_date", where), "start_date"),
        "expiry_date": _date(_get(data, "expiry_date", where), "expiry_date"),
        "reserved": bytes(2),
    })
    holder = data.get("holder", {})
    holder_data = P.HolderData.build({
        "card_type": _int(holder.get("card_type", 0), "holder.card_type", 0, 255),
        "staff_flag": _int(holder.get("staff_flag", 0), "holder.staff_flag", 0, 255),
        "name": _text(holder.get("name", ""), 20, "holder.name"),
        "id_number": _text(holder.get("id_number", ""), 32, "holder.id_number", "ascii"),
        "id_type": _int(holder.get("id_type", 0), "holder.id_type", 0, 255),
    })
    balances = data.get("balances", {})
    limit = _int(data.get("balance_limit", 100_000_00), "balance_limit")
    ep = Purse(balance=_int(balances.get("ep", 0), "balances.ep", 0, limit))
    ed = Purse(balance=_int(balances.get("ed", 0), "balances.ed", 0, limit))
    pin_cfg = data.get("pin", {})
    pin = pin_cfg.get("value")
    if pin is not None:
        try:
            encode_pin(str(pin))
        except ValueError as exc:
            raise ProfileError(f"pin.value: {exc}") from None
    tries = _int(pin_cfg.get("try_limit", 3), "pin.try_limit", 1, 15)
    state = IepState(
        aid=_hex(data["aid"], None, "aid") if "aid" in data else DEFAULT_IEP_AID,
        label=str(data.get("label", "SVCARD ED/EP")),
        public_data=public, holder_data=holder_data,
        currency_code=_int(data.get("currency_code", 156), "currency_code", 0, 999),
        currency_exponent=_int(data.get("currency_exponent", 2), "currency_exponent", 0, 9),
        balance_limit=limit, purchase_keys=purchase, load_keys=load, tac_key=tac,
        pin=str(pin) if pin is not None else None, pin_try_limit=tries, pin_tries_left=tries,
        ep=ep, ed=ed,
        mac_failure_limit=_int(data.get("mac_failure_limit", DEFAULT_MAC_FAILURE_LIMIT),
                               "mac_failure_limit", 1, 255),
        fixed_random=_hex(data["fixed_random"], 4, "fixed_random")
        if "fixed_random" in data else None,
    )
    return state.to_json()


def _psam(data: dict[str, Any], path: Path) -> dict[str, Any]:
    where = str(path)
    issuers = _issuers(data, path)
    keys = [IssuerKey(i.issuer_id, k.version, k.algorithm, k.key)
            for i in issuers for k in i.purchase]
    default = (_hex(data["default_issuer"], 8, "default_issuer") if "default_issuer" in data
               else issuers[0].issuer_id)
    state = PsamState(
        aid=_hex(data["aid"], None, "aid") if "aid" in data else DEFAULT_PSAM_AID,
        terminal_id=_hex(_get(data, "terminal_id", where), 6, "terminal_id"),
        psam_serial=_hex(_get(data, "psam_serial", where), 10, "psam_serial"),
        default_issuer=default, keys=keys,
        batch_key=_hex(_get(data, "batch_key", where), 16, "batch_key"),
        currency_code=_int(data.get("currency_code", 156), "currency_code", 0, 999),
        currency_exponent=_int(data.get("currency_exponent", 2), "currency_exponent", 0, 9),
        next_ttn=_int(data.get("next_ttn", 1), "next_ttn", 0, 0xFFFFFFFF),
        blocked={_hex(b, 8, "blocked_cards[]") for b in data.get("blocked_cards", [])},
    )
    return state.to_json()


def _hsm(data: dict[str, Any], path: Path) -> dict[str, Any]:
    issuers = _issuers(data, path)
    state = HsmState(
        aid=_hex(data["aid"], None, "aid") if "aid" in data else DEFAULT_HSM_AID,
        issuers={i.issuer_id: IssuerLoadKeys(
            i.issuer_id, {k.version: (k.algorithm, k.key) for k in i.load}, i.tac, i.two_level)
            for i in issuers},
    )
    return state.to_json()

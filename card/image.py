"""Card images: the versioned JSON form of a whole chip, and building a live card from one.

An image is ``{"format": "svcard-card-image", "version": 1, "kind": "iep"|"psam"|"hsm",
"atr": HEX, "t0": bool, "app": {...}}``, and for a purse card optionally ``"loyalty": [...]``,
its loyalty programmes' ADFs (card/loyalty.py). :func:`open_card` gives a :class:`Card` whose every
persistent change is written back to the image atomically, holding the image's lock until the
card is closed.

:func:`check_image` validates an image's fields (pydantic models, strict types: a number is a
JSON number, hex is a string of the right length) and refuses a bad one with an
:class:`ImageError` naming the file and the field (``card.json: app.ep.balance: expected a
whole number``), never a value (images hold keys).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from ..protocols import crypto, mac_schemes
from ..protocols import goods as G
from ..protocols import purse as P
from .hsm import HsmState, LoadHsm
from .iep import Iep, IepState
from .loyalty import check_programmes, programmes_from_image
from .psam import Psam, PsamState
from .runtime import DEFAULT_ATR, Application, Card, check_atr, default_atr
from .storage import (
    IMAGE_FORMAT,
    IMAGE_VERSION,
    ImageError,
    ImageStore,
    MemoryStore,
    Store,
    TearHook,
    encode_image,
    write_atomically,
)

KINDS = ("iep", "psam", "hsm")


def _make_app(kind: str, state: dict[str, Any]) -> Application:
    if kind == "iep":
        return Iep(IepState.from_json(state))
    if kind == "psam":
        return Psam(PsamState.from_json(state))
    if kind == "hsm":
        return LoadHsm(HsmState.from_json(state))
    raise ImageError(f"unknown card kind {kind!r} (expected one of {', '.join(KINDS)})")


def new_image(kind: str, app_state: dict[str, Any], *, atr: bytes = DEFAULT_ATR,
              t0: bool = False) -> dict[str, Any]:
    return {"format": IMAGE_FORMAT, "version": IMAGE_VERSION, "kind": kind,
            "atr": atr.hex().upper(), "t0": t0, "app": app_state}


def card_from_image(image: dict[str, Any], store: Store | None = None,
                    source: str = "card image") -> Card:
    """A live card over ``image``; every persistent change is committed to ``store``.
    ``source`` names the image in errors (its file)."""
    try:
        kind = str(image["kind"])
        app = _make_app(kind, image["app"])
        programmes = programmes_from_image(image, source)   # loyalty ADFs, beside the purse
        t0 = bool(image.get("t0", False))
        atr = bytes.fromhex(image.get("atr") or default_atr(t0).hex())
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        check_image(image, source)  # names the field when the models see what is wrong
        raise ImageError(f"{source}: damaged or incomplete card image "
                         f"({type(exc).__name__}: {exc})") from None
    if t0 and atr == DEFAULT_ATR:   # a T=0 image written when svcard's ATR offered T=1 too
        atr = default_atr(True)
    try:
        check_atr(atr, t0)
    except ValueError as exc:
        raise ImageError(f"{source}: atr: {exc}") from None
    sink: Store = store if store is not None else MemoryStore()
    card = Card([app, *programmes], atr=atr, t0=t0, kind=kind, on_close=sink.close)

    def build() -> dict[str, Any]:
        out = new_image(kind, app.to_state(), atr=atr, t0=t0)
        if programmes:
            out["loyalty"] = [p.to_state() for p in programmes]
        return out

    def persist() -> None:
        sink.commit(build)

    app.persist = persist
    if isinstance(app, Psam):  # a purchase appends to the image's journal (card/storage.py)
        app.persist_change = lambda change: sink.append(change, build)
    for programme in programmes:
        programme.persist = persist
    if isinstance(app, Iep):
        app.recover()
    for programme in programmes:
        programme.recover()
    return card


def open_card(path: str | os.PathLike[str], *, lock_timeout: float = 5.0,
              tear: TearHook | None = None) -> Card:
    """Open the card image at ``path`` (locked until ``card.close()``)."""
    if not Path(path).is_file():  # before the lock file is made: opening never creates
        raise ImageError(f"no card image at {path}")
    store = ImageStore(path, lock_timeout=lock_timeout, tear=tear)
    try:
        return card_from_image(store.image, store, str(path))
    except BaseException:
        store.close()
        raise


def save_new_image(path: str | os.PathLike[str], image: dict[str, Any], *,
                   overwrite: bool = False) -> None:
    target = Path(path)
    if target.exists() and not overwrite:
        raise ImageError(f"{target} exists already (use --force to replace it)")
    card_from_image(image)  # refuse an image that would not load
    write_atomically(target, encode_image(image))


def app_of(card: Card) -> Application:
    return card.apps[0]


# --- checking an image's fields -------------------------------------------------------------
def _hex(size: int | None) -> AfterValidator:
    def check(value: str) -> str:
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise ValueError("expected hex") from None
        if size is not None and len(raw) != size:
            raise ValueError(f"expected {size} bytes of hex, got {len(raw)}")
        return value
    return AfterValidator(check)


Hex = Annotated[str, _hex(None)]
Byte = Annotated[int, Field(ge=0, le=255)]
Count = Annotated[int, Field(ge=0, le=0xFFFFFFFF)]


def _one_of(names: tuple[str, ...], what: str) -> AfterValidator:
    """A name from ``names``; an unknown one is quoted only when it looks like a name (short,
    letters, digits and dashes), so a key pasted into the field is never repeated."""
    def check(value: str) -> str:
        if value not in names:
            shown = f" {value!r}" if len(value) <= 24 and value.replace("-", "").replace(
                "_", "").isalnum() else ""
            raise ValueError(f"unknown {what}{shown} (known: {', '.join(names)})")
        return value
    return AfterValidator(check)


SchemeName = Annotated[str, _one_of(mac_schemes.NAMES, "MAC scheme")]
AlgorithmName = Annotated[str, _one_of(crypto.ALGORITHMS, "algorithm")]
Hex1 = Annotated[str, _hex(1)]
Hex4 = Annotated[str, _hex(4)]
Hex6 = Annotated[str, _hex(6)]
Hex8 = Annotated[str, _hex(8)]
Hex9 = Annotated[str, _hex(9)]
Hex10 = Annotated[str, _hex(10)]
Hex16 = Annotated[str, _hex(16)]
Hex30 = Annotated[str, _hex(30)]
Hex55 = Annotated[str, _hex(55)]
HexLogRecord = Annotated[str, _hex(P.LOG_RECORD_SIZE)]
HexPsamRecord = Annotated[str, _hex(P.PSAM_RECORD_SIZE)]
HexGoodsRecord = Annotated[str, _hex(G.RECORD_SIZE)]


class _Strict(BaseModel):
    # strict: "12" is not a number, 1 is not hex; fields the check does not know are kept
    model_config = ConfigDict(strict=True, extra="allow")


class _Key(_Strict):
    index: Byte
    version: Byte
    algorithm: Byte = 0
    key: Hex16


class _IssuerScheme(_Strict):
    """An issuer's cryptography as the PSAM and the HSM keep it (card/keys.py IssuerScheme)."""
    algorithms: dict[Hex1, AlgorithmName] = {}
    mac_scheme: SchemeName = mac_schemes.DEFAULT


class _Purse(_Strict):
    balance: Count
    online_counter: Annotated[int, Field(ge=0, le=0xFFFF)]
    offline_counter: Annotated[int, Field(ge=0, le=0xFFFF)]
    overdraft_limit: Count = 0


class _GoodsFile(_Strict):
    sfi: Annotated[int, Field(ge=1, le=30)]
    kind: Literal["ticket", "coupon", "transit", "voucher"]
    record_length: Literal[40] = 40
    records: Annotated[int, Field(ge=1, le=254)]
    data: dict[str, HexGoodsRecord] = {}


class _Goods(_Strict):
    files: list[_GoodsFile] = []


class _Iep(_Strict):
    aid: Hex
    public_data: Hex30
    holder_data: Hex55
    currency_code: Annotated[int, Field(ge=0, le=999)]
    currency_exponent: Annotated[int, Field(ge=0, le=9)]
    balance_limit: Count
    purchase_keys: list[_Key]
    load_keys: list[_Key]
    tac_key: Hex16
    pin: str | None = None
    pin_try_limit: Annotated[int, Field(ge=1, le=15)] = 3
    pin_tries_left: Annotated[int, Field(ge=0, le=15)] = 3
    ep: _Purse
    ed: _Purse
    log: list[HexLogRecord] = []
    pending_log: HexLogRecord | None = None
    fixed_random: Hex4 | None = None
    mac_failure_limit: Annotated[int, Field(ge=1, le=255)] = 3
    unload_keys: list[_Key] = []
    update_keys: list[_Key] = []
    log_counter: Literal["before", "after"] = "before"
    mac_scheme: SchemeName = mac_schemes.DEFAULT
    uid: Hex9 | None = None
    goods: _Goods | None = None
    capp_plain_update: bool = False   # plain 80 DC into goods files (default: 84 DE only)


class _PsamKey(_Strict):
    issuer_id: Hex8
    version: Byte
    algorithm: Byte = 0
    key: Hex16


class _Psam(_Strict):
    aid: Hex
    terminal_id: Hex6
    psam_serial: Hex10
    default_issuer: Hex8
    keys: list[_PsamKey]
    batch_key: Hex16
    currency_code: Annotated[int, Field(ge=0, le=999)]
    currency_exponent: Annotated[int, Field(ge=0, le=9)]
    next_ttn: Count
    batch_number: Count
    blocked: list[Hex8] = []
    records: list[HexPsamRecord] = []
    closed_records: list[HexPsamRecord] = []
    previous: dict[str, Any]
    issuer_schemes: dict[Hex8, _IssuerScheme] = {}


class _HsmKey(_Strict):
    version: Byte
    algorithm: Byte = 0
    key: Hex16


class _HsmIssuer(_Strict):
    issuer_id: Hex8
    load_keys: list[_HsmKey]
    tac_key: Hex16
    two_level: bool = False
    unload_keys: list[_HsmKey] = []
    update_keys: list[_HsmKey] = []
    scheme: _IssuerScheme | None = None


class _Hsm(_Strict):
    aid: Hex
    issuers: list[_HsmIssuer]


class _Image(_Strict):
    format: Literal["svcard-card-image"]
    version: Literal[1]
    kind: Literal["iep", "psam", "hsm"]
    atr: Hex | None = None
    t0: bool = False
    app: dict[str, Any]


_APPS: dict[str, type[_Strict]] = {"iep": _Iep, "psam": _Psam, "hsm": _Hsm}


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(image)"


def _problem(error: Any) -> str:
    kind = error["type"]
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "expected a whole number"
    if kind == "string_type":
        return "expected a string"
    if kind == "bool_type":
        return "expected true or false"
    if kind in ("list_type", "dict_type", "model_type"):
        return {"list_type": "expected a list", "dict_type": "expected an object",
                "model_type": "expected an object"}[kind]
    if kind == "missing":
        return "missing"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"expected {expected}"
    if kind in ("greater_than_equal", "less_than_equal"):
        ctx = error.get("ctx", {})
        bound = ctx.get("ge", ctx.get("le"))
        return f"expected a number {'>=' if 'ge' in ctx else '<='} {bound}"
    message = str(error.get("msg", kind))
    return message.removeprefix("Value error, ")


def check_image(image: Any, source: str = "card image") -> None:
    """Refuse (:class:`ImageError`: ``SOURCE: FIELD: PROBLEM``, one line, no value quoted) an
    image whose fields have the wrong type, size or range for its kind."""
    try:
        top = _Image.model_validate(image)
    except ValidationError as exc:
        raise _image_error(source, exc, ()) from None
    try:
        app = _APPS[top.kind].model_validate(top.app)
    except ValidationError as exc:
        raise _image_error(source, exc, ("app",)) from None
    check_programmes(image, source)   # the loyalty ADFs (card/loyalty.py)
    if isinstance(app, _Iep):   # a UID-in-MAC1 scheme needs the card's UID
        size = mac_schemes.scheme(app.mac_scheme).uid_size
        if size and app.uid is None:
            raise ImageError(f"{source}: app.uid: missing (the {app.mac_scheme} MAC scheme "
                             f"puts a {size}-byte card UID into MAC1)")


def _image_error(source: str, exc: ValidationError, prefix: tuple[str, ...]) -> ImageError:
    error = exc.errors(include_url=False, include_input=False)[0]
    where = _where(prefix + tuple(error["loc"]))
    return ImageError(f"{source}: {where}: {_problem(error)}")

"""TOML files checked by pydantic models: the pieces both the card profiles
(``card/personalise.py``) and the servers' configuration files (``host/kit/config.py``, which
re-exports them) are made of.

- :class:`Section`, the base of every table: typed (strict: TOML's own types, no coercion of
  ``"5"`` to 5), unknown keys refused, and every secret field ``X`` (one marked :data:`SECRET`)
  also taken from ``X_file = PATH`` (relative to the file; the file's content, stripped) or
  ``X_env = NAME`` (an environment variable); exactly one of the three.
- Field types: hex bytes of an exact length (``Hex8``, ``SecretHex32`` ...), bounded whole
  numbers (``Byte``, ``NonNegInt`` ...), ``Url``, ``Date``, :func:`one_of` for names.
- :func:`check` validates a TOML document against a model and turns pydantic's
  ``ValidationError`` into one line ``FILE: FIELD.PATH: PROBLEM`` (up to five problems,
  separated by ``;``). The line never holds a secret field's value, nor a misspelt key's value.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import tomllib
import types
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    HttpUrl,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

MAX_FILE = 1 << 20          # bytes: a configuration file or profile is a few kilobytes
MAX_SECRET_FILE = 1 << 16   # bytes: a file holding one secret
MAX_SHOWN = 5               # problems named in one message
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,40}")

M = TypeVar("M", bound=BaseModel)


class SecretField:
    """The marker of a secret field: its value is never shown in an error, and it may come
    from ``NAME_file`` or ``NAME_env`` instead."""

    def __repr__(self) -> str:
        return "SECRET"


SECRET = SecretField()


def _problem(message: str, *, key: str | None = None,
             show_input: bool = False) -> PydanticCustomError:
    """A validation problem whose text is ``message`` as is (pydantic's own texts are replaced
    by :func:`describe_error`): about the field's ``key`` (``X_file``, ``X_env``) if given,
    followed by the bad value if ``show_input`` and the field is not a secret."""
    context: dict[str, Any] = {"text": message, "show_input": show_input}
    if key is not None:
        context["key"] = key
    return PydanticCustomError("svcard", "{text}", context)


# --- field types ------------------------------------------------------------------------------

def _hex_parser(lo: int, hi: int) -> Callable[[Any], bytes]:
    def parse(value: Any) -> bytes:
        if not isinstance(value, str):
            raise _problem("expected a hex string", show_input=True)
        try:
            raw = bytes.fromhex("".join(value.split()))
        except ValueError:
            raise _problem("not hex", show_input=True) from None
        if not lo <= len(raw) <= hi:
            want = f"{lo}" if lo == hi else f"{lo} to {hi}"
            raise _problem(f"expected {want} bytes of hex, got {len(raw)}")
        return raw
    return parse


def _hex(lo: int, hi: int | None = None) -> BeforeValidator:
    return BeforeValidator(_hex_parser(lo, lo if hi is None else hi))


Hex4 = Annotated[bytes, _hex(4)]
Hex6 = Annotated[bytes, _hex(6)]
Hex8 = Annotated[bytes, _hex(8)]
Hex9 = Annotated[bytes, _hex(9)]
Hex10 = Annotated[bytes, _hex(10)]
Hex16 = Annotated[bytes, _hex(16)]
Hex32 = Annotated[bytes, _hex(32)]
HexAid = Annotated[bytes, _hex(5, 16)]     # ISO 7816-4: an AID is 5 to 16 bytes
HexAtr = Annotated[bytes, _hex(2, 33)]     # ISO 7816-3: TS, T0 and at most 31 more
SecretHex16 = Annotated[bytes, _hex(16), SECRET]
SecretHex32 = Annotated[bytes, _hex(32), SECRET]
SecretText = Annotated[str, SECRET]

Byte = Annotated[int, Field(ge=0, le=255)]


def _hex_byte_name(value: str) -> str:
    if re.fullmatch(r"[0-9A-Fa-f]{2}", value) is None:
        raise _problem(f"expected two hex digits, got {shown(value)}")
    return value.upper()


HexByteName = Annotated[str, AfterValidator(_hex_byte_name)]   # a table key such as "01"
U32 = Annotated[int, Field(ge=0, le=0xFFFFFFFF)]
NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
NonNegFloat = Annotated[float, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
CurrencyCode = Annotated[int, Field(ge=0, le=999)]     # ISO 4217 numeric
CurrencyExponent = Annotated[int, Field(ge=0, le=9)]

_HTTP_URL: TypeAdapter[HttpUrl] = TypeAdapter(HttpUrl)


def _http_url(value: str) -> str:
    try:
        _HTTP_URL.validate_python(value)
    except ValidationError:
        raise _problem(f"expected an http:// or https:// URL, got {shown(value)}") from None
    return value


Url = Annotated[str, AfterValidator(_http_url)]  # checked, and kept as written


def _date(value: Any) -> dt.date:
    if isinstance(value, dt.datetime) or not isinstance(value, dt.date | str):
        raise _problem("expected a date (YYYY-MM-DD)", show_input=True)
    if isinstance(value, dt.date):
        return value
    try:
        return dt.datetime.strptime(value.replace("-", ""), "%Y%m%d").date()
    except ValueError:
        raise _problem(f"not a date (YYYY-MM-DD), got {shown(value)}") from None


Date = Annotated[dt.date, BeforeValidator(_date)]   # a TOML date, or "YYYYMMDD"/"YYYY-MM-DD"


def one_of(names: Iterable[str]) -> AfterValidator:
    """A string that is one of ``names``."""
    allowed = tuple(names)

    def check_name(value: str) -> str:
        if value not in allowed:
            raise _problem(f"expected one of {', '.join(allowed)}, got {shown(value)}")
        return value
    return AfterValidator(check_name)


def fits(size: int, encoding: str = "utf-8") -> AfterValidator:
    """A string of at most ``size`` bytes in ``encoding``."""
    def check_text(value: str) -> str:
        try:
            length = len(value.encode(encoding))
        except UnicodeEncodeError:
            raise _problem(f"expected {encoding.upper()} text") from None
        if length > size:
            raise _problem(f"expected at most {size} bytes, got {length}")
        return value
    return AfterValidator(check_text)


# --- sections and secrets ---------------------------------------------------------------------

class Section(BaseModel):
    """A table of a TOML file: strict types, no unknown key, secrets from a file or the
    environment too."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _secret_sources(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        secrets = [n for n, f in cls.model_fields.items() if is_secret(f)]
        if not any(f"{n}_file" in data or f"{n}_env" in data for n in secrets):
            return data
        data = dict(data)
        folder = Path((info.context or {}).get("folder", "."))
        for name in secrets:
            keys = (name, f"{name}_file", f"{name}_env")
            given = [k for k in keys if k in data]
            if len(given) > 1:
                raise _problem(f"give one of {', '.join(keys)}, not {' and '.join(given)}",
                               key=given[1])
            if given and given[0] != name:
                data[name] = _secret_from(given[0], data.pop(given[0]), folder)
        return data


def is_secret(info: FieldInfo) -> bool:
    """Whether a field is marked :data:`SECRET` (``Annotated[..., SECRET] | None`` too)."""
    return SECRET in info.metadata or SECRET in _unwrap(info.annotation)[1]


def _secret_from(key: str, where: Any, folder: Path) -> str:
    """The secret ``key`` (``X_file`` or ``X_env``) points at; never shown in an error."""
    if not isinstance(where, str) or not where:
        raise _problem("expected " + ("a file name" if key.endswith("_file")
                                      else "an environment variable name"), key=key)
    if key.endswith("_env"):
        value = os.environ.get(where)
        if value is None:
            raise _problem(f"the environment variable {shown(where)} is not set", key=key)
        source = f"the environment variable {shown(where)}"
    else:
        path = folder / where
        try:
            with path.open("rb") as fh:
                raw = fh.read(MAX_SECRET_FILE + 1)
        except OSError as exc:
            raise _problem(f"cannot read {path}: {exc.strerror or type(exc).__name__}",
                           key=key) from None
        if len(raw) > MAX_SECRET_FILE:
            raise _problem(f"{path} is longer than {MAX_SECRET_FILE} bytes", key=key)
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _problem(f"{path} is not UTF-8 text", key=key) from None
        source = str(path)
    value = value.strip()
    if not value:
        raise _problem(f"{source} is empty", key=key)
    return value


# --- reading and checking a file --------------------------------------------------------------

def read_document(path: Path, error: type[Exception]) -> dict[str, Any]:
    """The TOML document at ``path``; a missing, unreadable, oversized or malformed file is
    ``error`` naming the file."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_FILE + 1)
    except FileNotFoundError:
        raise error(f"no such file: {path}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or type(exc).__name__}") from None
    if len(raw) > MAX_FILE:
        raise error(f"{path}: longer than {MAX_FILE} bytes") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}") from None


def check(model: type[M], data: dict[str, Any], path: Path, error: type[Exception]) -> M:
    """``data`` (read from ``path``) as a ``model``; a problem is ``error`` with one line
    ``PATH: FIELD: PROBLEM``."""
    try:
        return model.model_validate(data, context={"folder": path.parent})
    except ValidationError as exc:
        raise error(f"{path}: {describe_errors(model, exc)}") from None


def describe_errors(model: type[BaseModel], exc: ValidationError) -> str:
    """Up to :data:`MAX_SHOWN` problems of ``exc``, each ``FIELD: PROBLEM``, on one line."""
    errors = exc.errors(include_url=False)
    lines = [describe_error(model, e) for e in errors[:MAX_SHOWN]]
    more = len(errors) - MAX_SHOWN
    return "; ".join(lines) + (f" (and {more} more)" if more > 0 else "")


_TYPED = {"int_type", "int_parsing", "int_from_float", "float_type", "float_parsing",
          "finite_number", "string_type", "bool_type", "bool_parsing", "literal_error",
          "greater_than", "greater_than_equal", "less_than", "less_than_equal", "list_type",
          "dict_type", "model_type", "model_attributes_type", "date_type", "bytes_type"}


def describe_error(model: type[BaseModel], error: Any) -> str:
    """One pydantic error as ``FIELD: PROBLEM``; a secret's value is never shown."""
    loc: tuple[Any, ...] = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    if error["type"] == "svcard" and "key" in ctx:  # a problem with X_file / X_env
        loc = (*loc, ctx["key"])
    where = field_path(loc) or "(top level)"
    kind = error["type"]
    if kind == "missing":
        return f"{where}: missing (required)"
    if kind == "extra_forbidden":
        return f"{where}: unknown key"
    if kind in ("too_short", "too_long"):
        count = ctx.get("min_length" if kind == "too_short" else "max_length")
        return (f"{where}: expected at {'least' if kind == 'too_short' else 'most'} {count} "
                f"{'entry' if count == 1 else 'entries'}")
    annotation, metadata, secret = _leaf(model, loc)
    if kind == "svcard":
        text = f"{where}: {ctx.get('text', error['msg'])}"
        return f"{text}, got {shown(error.get('input'))}" if ctx.get("show_input") \
            and not secret else text
    if kind in _TYPED:
        text = f"{where}: expected {expected(annotation, metadata)}"
        return text if secret else f"{text}, got {shown(error.get('input'))}"
    message = str(error.get("msg", "not valid"))
    return f"{where}: {message[:1].lower()}{message[1:]}"


def field_path(loc: Sequence[Any]) -> str:
    """``("merchant", 0, "variants", 1)`` -> ``merchant[0].variants[1]``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part == "[key]":
            text += " (the key)"
        else:
            name = part if _PLAIN_KEY.fullmatch(str(part)) else json.dumps(str(part)[:40])
            text += f".{name}" if text else name
    return text


def shown(value: Any) -> str:
    """A short, one-line picture of a bad value, as TOML would write it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 40 else value[:40] + "...")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """``Annotated[T, ...] | None`` -> (T, its metadata, constraints of Field(...) included)."""
    metadata: list[Any] = []
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation, *more = get_args(annotation)
            for item in more:
                metadata.extend(item.metadata if isinstance(item, FieldInfo) else [item])
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation, metadata
            annotation = members[0]
        else:
            return annotation, metadata


def _leaf(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Any, list[Any], bool]:
    """The type and metadata ``loc`` ends at in ``model``, and whether a secret is on the way."""
    annotation: Any = model
    metadata: list[Any] = []
    secret = False
    for i, part in enumerate(loc):
        annotation, more = _unwrap(annotation)
        metadata = metadata + more
        origin = get_origin(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            info = annotation.model_fields.get(str(part))
            if info is None:
                return None, [], secret
            annotation, metadata = info.annotation, list(info.metadata)
        elif origin is list and isinstance(part, int):
            annotation, metadata = get_args(annotation)[0], []
        elif origin is dict and part != "[key]":
            key_next = i + 1 < len(loc) and loc[i + 1] == "[key]"
            annotation, metadata = get_args(annotation)[0 if key_next else 1], []
        elif part != "[key]":
            return None, [], secret
        secret = secret or SECRET in metadata
    annotation, more = _unwrap(annotation)
    metadata = metadata + more
    return annotation, metadata, secret or SECRET in metadata


def expected(annotation: Any, metadata: list[Any]) -> str:
    """What a field of this type holds, in words: ``a whole number from 0 to 255``."""
    origin = get_origin(annotation)
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "a whole number" + _bounds(metadata)
    if annotation is float:
        return "a number" + _bounds(metadata)
    if annotation is str:
        return "a string"
    if annotation is dt.date:
        return "a date (YYYY-MM-DD)"
    if origin is list:
        inner, _ = _unwrap(get_args(annotation)[0])
        tables = isinstance(inner, type) and issubclass(inner, BaseModel)
        return "a list of tables" if tables else "a list"
    if origin is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return "a table"
    return "a valid value"


def _bounds(metadata: list[Any]) -> str:
    found = {name: getattr(m, name) for m in metadata for name in ("ge", "gt", "le", "lt")
             if getattr(m, name, None) is not None}
    ge, gt, le, lt = (found.get(n) for n in ("ge", "gt", "le", "lt"))
    if ge is not None and le is not None:
        return f" from {ge} to {le}"
    low = f" >= {ge}" if ge is not None else f" > {gt}" if gt is not None else ""
    high = f" <= {le}" if le is not None else f" < {lt}" if lt is not None else ""
    return low + (" and" if low and high else "") + high

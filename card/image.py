"""Card images: the versioned JSON form of a whole chip, and building a live card from one.

An image is ``{"format": "svcard-card-image", "version": 1, "kind": "iep"|"psam"|"hsm",
"atr": HEX, "t0": bool, "app": {...}}``. :func:`open_card` gives a :class:`Card` whose every
persistent change is written back to the image atomically, holding the image's lock until the
card is closed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .hsm import HsmState, LoadHsm
from .iep import Iep, IepState
from .psam import Psam, PsamState
from .runtime import DEFAULT_ATR, Application, Card
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


def card_from_image(image: dict[str, Any], store: Store | None = None) -> Card:
    """A live card over ``image``; every persistent change is committed to ``store``."""
    try:
        kind = str(image["kind"])
        app = _make_app(kind, image["app"])
        atr = bytes.fromhex(image.get("atr") or DEFAULT_ATR.hex())
        t0 = bool(image.get("t0", False))
    except (KeyError, ValueError, TypeError) as exc:
        raise ImageError(f"card image is damaged or incomplete: {exc!r}") from None
    sink: Store = store if store is not None else MemoryStore()
    card = Card([app], atr=atr, t0=t0, kind=kind, on_close=sink.close)

    def build() -> dict[str, Any]:
        return new_image(kind, app.to_state(), atr=atr, t0=t0)

    def persist() -> None:
        sink.commit(build)

    app.persist = persist
    if isinstance(app, Iep):
        app.recover()
    return card


def open_card(path: str | os.PathLike[str], *, lock_timeout: float = 5.0,
              tear: TearHook | None = None) -> Card:
    """Open the card image at ``path`` (locked until ``card.close()``)."""
    store = ImageStore(path, lock_timeout=lock_timeout, tear=tear)
    try:
        return card_from_image(store.image, store)
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

"""The append-only journal beside a card image: small changes to the image, one fsynced append
each, so a change costs the same however large the image has grown.

A journal file (``IMAGE.journal``) is a run of *frames*: a 4-byte big-endian payload length,
a 4-byte CRC-32 over the length bytes and the payload, then the payload (1 to
:data:`MAX_PAYLOAD` bytes of compact JSON). The first frame is the header: the journal's
``id`` and ``seq``, which must match the ``journal`` marker of the image it belongs to (see
:mod:`svcard.card.storage`). Every further frame is one *change* to the image's ``app``
object, applied in order by :func:`apply_change`::

    {"set":    {"next_ttn": 8, "previous": {...}}}   top-level fields given new values
    {"append": {"records": ["HEX", ...]}}              items added at the end of a list
    {"put":    {"records": [[INDEX, "HEX"], ...]}}     items of a list replaced in place
    {"add":    {"blocked": ["HEX"]}}                   a sorted list used as a set
    {"remove": {"blocked": ["HEX"]}}

A frame is written by one ``write`` and made durable by ``fdatasync`` before the card
answers. A power cut during an append can leave only the last frame incomplete or wrong: the
reader drops such a *torn tail* (the bytes from the first bad frame on, when they are fewer
than one largest frame) and the card never answered the change it held. A bad frame with more
than that after it is not a torn append but damage, and the journal is refused.
"""

from __future__ import annotations

import gc
import json
import zlib
from dataclasses import dataclass
from typing import Any

JOURNAL_FORMAT = "svcard-card-journal"
JOURNAL_VERSION = 1
MAX_PAYLOAD = 2048
FRAME_HEAD = 8           # length (4) + CRC-32 (4)
MAX_FRAME = FRAME_HEAD + MAX_PAYLOAD
OPS = ("set", "append", "put", "add", "remove")

Change = dict[str, Any]


class JournalError(Exception):
    """A journal that cannot be read or does not fit its image."""


def frame(payload: bytes) -> bytes:
    """One frame around ``payload``."""
    if not 0 < len(payload) <= MAX_PAYLOAD:
        raise ValueError(f"a journal frame holds 1 to {MAX_PAYLOAD} bytes, not {len(payload)}")
    size = len(payload).to_bytes(4, "big")
    return size + zlib.crc32(payload, zlib.crc32(size)).to_bytes(4, "big") + payload


def encode_change(change: Change) -> bytes:
    return frame(json.dumps(change, separators=(",", ":"), sort_keys=True).encode())


def header_frame(journal_id: str, seq: int) -> bytes:
    return encode_change({"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION,
                          "id": journal_id, "seq": seq})


@dataclass(frozen=True)
class Contents:
    """What a journal file holds: its header's id and seq, its changes in order, the length of
    its good frames, and how many bytes of torn tail follow them."""

    journal_id: str
    seq: int
    changes: list[Change]
    good_length: int
    torn_bytes: int


def _frames(data: bytes, source: str) -> tuple[list[bytes], int]:
    """The payloads of the good frames and where they end (a torn tail is left out)."""
    payloads: list[bytes] = []
    view = memoryview(data)
    pos = 0
    while pos < len(data):
        size = int.from_bytes(view[pos:pos + 4], "big")
        end = pos + FRAME_HEAD + size
        if (len(data) - pos < FRAME_HEAD or not 0 < size <= MAX_PAYLOAD or end > len(data)
                or zlib.crc32(view[pos + FRAME_HEAD:end], zlib.crc32(view[pos:pos + 4]))
                != int.from_bytes(view[pos + 4:pos + FRAME_HEAD], "big")):
            if len(data) - pos > MAX_FRAME:
                raise JournalError(f"{source}: damaged at byte {pos} ({len(data) - pos} "
                                   "bytes follow: more than one torn append)")
            break
        payloads.append(data[pos + FRAME_HEAD:end])
        pos = end
    return payloads, pos


def parse_journal(data: bytes, source: str = "journal") -> Contents:
    """Read a journal's bytes (:class:`JournalError` when its header or a frame before the
    tail is bad)."""
    payloads, good = _frames(data, source)
    collecting = gc.isenabled()
    gc.disable()  # millions of small objects, none in a cycle: the collector would run often
    try:  # one JSON array: far cheaper than a json.loads per frame
        items = json.loads(b"[" + b",".join(payloads) + b"]")
    except ValueError:
        items = None
    finally:
        if collecting:
            gc.enable()
    if not isinstance(items, list) or len(items) != len(payloads):  # e.g. "1,2" in one frame
        raise JournalError(f"{source}: a frame whose checksum holds is not one JSON value")
    if not items:
        raise JournalError(f"{source}: no journal header")
    head = items[0]
    if (not isinstance(head, dict) or head.get("format") != JOURNAL_FORMAT
            or not isinstance(head.get("id"), str) or not isinstance(head.get("seq"), int)):
        raise JournalError(f"{source} is not an svcard card journal")
    if head.get("version") != JOURNAL_VERSION:
        raise JournalError(f"{source} has journal version {head.get('version')!r}; this "
                           f"svcard reads version {JOURNAL_VERSION}")
    changes = items[1:]
    ops = frozenset(OPS)
    for n, change in enumerate(changes):
        if type(change) is not dict or not change or not change.keys() <= ops:
            raise JournalError(f"{source}: change {n + 1} is not a change")
    return Contents(head["id"], head["seq"], changes, good, len(data) - good)


def apply_change(app: dict[str, Any], change: Change) -> None:
    """Apply one change to an image's ``app`` object, in place (:class:`JournalError` for a
    change that does not fit it). The operations of one change touch different fields."""
    try:
        for op, fields in change.items():
            if op == "set":
                app.update(fields)
            elif op == "append":
                for key, items in fields.items():
                    app.setdefault(key, []).extend(items)
            elif op == "put":
                for key, pairs in fields.items():
                    target = app[key]
                    for index, item in pairs:
                        if not 0 <= index < len(target):
                            raise JournalError(f"change puts {key}[{index}] of {len(target)}")
                        target[index] = item
            elif op == "add":
                for key, items in fields.items():
                    app[key] = sorted(set(app.get(key, [])) | set(items))
            elif op == "remove":
                for key, items in fields.items():
                    app[key] = sorted(set(app.get(key, [])) - set(items))
            else:
                raise JournalError(f"unknown change {op!r}")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise JournalError(f"a change that does not fit the image ({type(exc).__name__})"
                           ) from None

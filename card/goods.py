"""The IEP's goods record files: digital goods (tickets, coupons, transit tokens, voucher codes)
stored on the card, one fixed-length record each (layout: :mod:`svcard.protocols.goods`).

The default profile has four linear record files, one per kind of good:

=====  ==============  ===============  =======
SFI    kind (tag)      record length    records
=====  ==============  ===============  =======
0x11   ticket (01)     40               8
0x12   coupon (02)     40               8
0x13   transit (03)    40               8
0x14   voucher (04)    40               8
=====  ==============  ===============  =======

A card profile may declare other files (``[[goods]]`` in its TOML: sfi, kind, records). A file
holds records of its own kind only; an all-zero record is an empty slot.

Writes come from two commands, both through :meth:`GoodsFiles.check_write` (which record a
write goes to, or the status word refusing it; nothing is written) and :meth:`GoodsFiles.apply`
(the write, in memory): UPDATE CAPP DATA CACHE, cached until its DEBIT FOR CAPP PURCHASE
commits the records and the debit in one image write (:meth:`svcard.card.iep.Iep.commit_value`),
and the secure-messaging record writes, committed by :meth:`svcard.card.iep.Iep.write_goods`.

P2's low three bits (``mode``) say what P1 is: ``0b100`` a record number (1..N), ``0b000`` a
tag (the record's first byte): the record that holds the same good (it starts with that tag and
has the same issuer_id and good_id) is replaced, and a new good goes into the first empty
record; a full file refuses it.

Status words: unknown SFI ``6A82``; data not one record long ``6700``; record number 0 or a mode
other than these ``6A86``; record number beyond the file ``6A83``; a new good by tag into a full
file ``6A84``; a record whose tag is not the file's kind, whose tag is not P1 (tag mode), or
which does not follow its layout ``6A80``.

The state is persisted in the card image as ``app.goods``: ``{"files": [{"sfi": 17, "kind":
"ticket", "record_length": 40, "records": 8, "data": {"1": HEX, ...}}]}`` (empty records left
out). An image without it loads with the default files, all empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..protocols import goods as G
from ..protocols import sw as SW
from .runtime import CardError

NOT_ENOUGH_MEMORY = 0x6A84   # no room for the record in the file (or in the CAPP cache)
MAX_RECORDS = 254            # a record number is one byte; 0 and FF are not records
DEFAULT_RECORDS = 8
RESERVED_SFIS = (0x15, 0x16, 0x18)   # the purse's own files: public data, holder data, log
DEFAULT_FILES: tuple[tuple[int, str], ...] = (
    (0x11, "ticket"), (0x12, "coupon"), (0x13, "transit"), (0x14, "voucher"))

Write = tuple[int, int, bytes]   # (sfi, record number, record)


@dataclass(slots=True)
class GoodsFile:
    """One linear record file of goods of one kind (volatile copy of what the image holds)."""

    sfi: int
    kind: str
    records: list[bytes]
    record_length: int = G.RECORD_SIZE

    @property
    def tag(self) -> int:
        return G.KINDS[self.kind]

    def to_json(self) -> dict[str, Any]:
        return {"sfi": self.sfi, "kind": self.kind, "record_length": self.record_length,
                "records": len(self.records),
                "data": {str(n + 1): r.hex().upper() for n, r in enumerate(self.records)
                         if not G.is_empty(r)}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> GoodsFile:
        sfi, kind, count = int(d["sfi"]), str(d["kind"]), int(d["records"])
        length = int(d.get("record_length", G.RECORD_SIZE))
        if not 1 <= sfi <= 30 or kind not in G.KINDS or not 1 <= count <= MAX_RECORDS:
            raise ValueError("a goods file has an sfi 1..30, a kind "
                             f"({', '.join(G.KINDS)}) and 1..{MAX_RECORDS} records")
        if sfi in RESERVED_SFIS:
            raise ValueError(f"SFI {sfi:02X} is a purse file (15, 16, 18), not a goods file")
        if length != G.RECORD_SIZE:
            raise ValueError(f"a goods record has {G.RECORD_SIZE} bytes")
        records = [G.EMPTY] * count
        for n, raw in (d.get("data") or {}).items():
            number, record = int(n), bytes.fromhex(raw)
            if not 1 <= number <= count:
                raise ValueError(f"goods file {sfi:02X}: record {number} beyond its {count}")
            G.check(record)
            if record[0] != G.KINDS[kind]:
                raise ValueError(f"goods file {sfi:02X} holds {kind} records only")
            records[number - 1] = record
        return cls(sfi, kind, records, length)


def default_files(records: int = DEFAULT_RECORDS) -> list[GoodsFile]:
    return [GoodsFile(sfi, kind, [G.EMPTY] * records) for sfi, kind in DEFAULT_FILES]


@dataclass(slots=True)
class GoodsFiles:
    """The goods record files of one purse, by SFI.

    The interface other command groups use (keep it stable): :meth:`read`, :meth:`find`,
    :meth:`check_write`, :meth:`apply`; the Iep commits applied writes with the purse's value
    (:meth:`svcard.card.iep.Iep.commit_value`) or alone (:meth:`svcard.card.iep.Iep.write_goods`).
    """

    files: dict[int, GoodsFile] = field(default_factory=lambda: {
        f.sfi: f for f in default_files()})

    # --- reading -----------------------------------------------------------------------------
    def file(self, sfi: int) -> GoodsFile:
        """The file ``sfi`` names, or ``6A82``."""
        found = self.files.get(sfi)
        if found is None:
            raise CardError(SW.FILE_NOT_FOUND)
        return found

    def read(self, sfi: int, record_no: int) -> bytes:
        """Record ``record_no`` (1 the first) of file ``sfi``: ``6A82`` unknown file, ``6A86``
        record 0, ``6A83`` beyond the file. An empty record reads as zeros."""
        records = self.file(sfi).records
        if record_no == 0:
            raise CardError(SW.WRONG_P1P2)
        if record_no > len(records):
            raise CardError(SW.RECORD_NOT_FOUND)
        return records[record_no - 1]

    def find(self, sfi: int, tag: int) -> int | None:
        """The number of the first record of file ``sfi`` whose first byte is ``tag`` (``00``:
        the first empty record), or None; ``6A82`` for an unknown file."""
        for n, record in enumerate(self.file(sfi).records):
            if record[0] == tag:
                return n + 1
        return None

    def goods(self) -> Iterator[tuple[int, int, bytes]]:
        """Every record that holds a good: (sfi, record number, record), by SFI then number."""
        for sfi in sorted(self.files):
            for n, record in enumerate(self.files[sfi].records):
                if not G.is_empty(record):
                    yield sfi, n + 1, record

    # --- writing -----------------------------------------------------------------------------
    def check_write(self, sfi: int, p1: int, mode: int, data: bytes,
                    pending: Mapping[tuple[int, int], bytes] | None = None) -> int:
        """The record number a write of ``data`` (P1, P2 = ``sfi << 3 | mode``) would go to, or
        :class:`CardError` with the status word refusing it (see the module's text). Nothing is
        written. ``pending`` holds writes accepted but not yet applied (a CAPP cache), by
        (sfi, record number): a tag-mode write sees them as if written."""
        goods_file = self.file(sfi)
        if mode not in (G.MODE_RECORD, G.MODE_TAG):
            raise CardError(SW.WRONG_P1P2)
        if len(data) != goods_file.record_length:
            raise CardError(SW.WRONG_LENGTH)
        try:
            G.check(data)
        except G.GoodsRecordError:
            raise CardError(SW.INCORRECT_DATA) from None
        if data[0] != goods_file.tag:
            raise CardError(SW.INCORRECT_DATA)
        records = goods_file.records
        if mode == G.MODE_RECORD:
            if p1 == 0:
                raise CardError(SW.WRONG_P1P2)
            if p1 > len(records):
                raise CardError(SW.RECORD_NOT_FOUND)
            return p1
        if data[0] != p1:
            raise CardError(SW.INCORRECT_DATA)
        view = records
        if pending:
            view = list(records)
            for (p_sfi, number), record in pending.items():
                if p_sfi == sfi:
                    view[number - 1] = record
        first_empty = None
        good = data[G.GOOD_KEY]
        for n, record in enumerate(view):
            if record[0] == p1 and record[G.GOOD_KEY] == good:
                return n + 1
            if first_empty is None and record[0] == G.TAG_EMPTY:
                first_empty = n + 1
        if first_empty is None:
            raise CardError(NOT_ENOUGH_MEMORY)
        return first_empty

    def apply(self, sfi: int, record_no: int, data: bytes) -> None:
        """Write ``data`` into record ``record_no`` of file ``sfi`` (in memory; checked by
        :meth:`check_write` before). The caller persists."""
        self.files[sfi].records[record_no - 1] = bytes(data)

    def apply_all(self, writes: Iterable[Write]) -> None:
        for sfi, record_no, data in writes:
            self.apply(sfi, record_no, data)

    # --- the image -----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"files": [self.files[sfi].to_json() for sfi in sorted(self.files)]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> GoodsFiles:
        """The goods files an image holds; an image without them has the default files."""
        if d is None:
            return cls()
        files = [GoodsFile.from_json(f) for f in d.get("files", [])]
        by_sfi = {f.sfi: f for f in files}
        if len(by_sfi) != len(files):
            raise ValueError("two goods files have the same sfi")
        return cls(by_sfi)

"""Readers: one PC/SC-style interface over every way of reaching a card.

``reader`` imports only ``protocols``; a virtual reader takes any object with ``atr`` and
``transmit(bytes) -> bytes``.
"""

from .base import (
    CardConnectionError,
    CardRemovedError,
    NoCardError,
    NoPcscServiceError,
    NoSuchReaderError,
    Reader,
    ReaderError,
    SharingViolationError,
)
from .virtual import VirtualReader

__all__ = [
    "CardConnectionError",
    "CardRemovedError",
    "NoCardError",
    "NoPcscServiceError",
    "NoSuchReaderError",
    "Reader",
    "ReaderError",
    "SharingViolationError",
    "VirtualReader",
]

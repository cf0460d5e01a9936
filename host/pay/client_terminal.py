"""A client terminal's Ed25519 key (FIG. 7) and this process's registry of them, and the checkout
URL a client asks for with or without one."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ...protocols import messages as M
from ..terminal.purse import TerminalError


class ClientTerminal:
    """A client terminal's Ed25519 key, registered with merchants that allow it FIG. 7: it signs
    its FIG. 7 confirmations. Its id is 8 bytes, by default the start of SHA-256 of its public
    key. The private key is never printed, logged or journalled."""

    def __init__(self, key: Ed25519PrivateKey, terminal_id: bytes | None = None) -> None:
        self._key = key
        self.public_key = key.public_key().public_bytes(serialization.Encoding.Raw,
                                                        serialization.PublicFormat.Raw)
        self.terminal_id = terminal_id or fingerprint(self.public_key)
        if len(self.terminal_id) != 8:
            raise ValueError("a client terminal id is 8 bytes")

    def __repr__(self) -> str:
        return f"ClientTerminal({self.terminal_id.hex().upper()})"

    @classmethod
    def generate(cls, terminal_id: bytes | None = None) -> ClientTerminal:
        return cls(Ed25519PrivateKey.generate(), terminal_id)

    @classmethod
    def load(cls, path: Path, terminal_id: bytes | None = None) -> ClientTerminal:
        """Read a PEM (PKCS #8) Ed25519 private key file, as ``save`` writes it."""
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise TerminalError(f"{path}: not a usable terminal key "
                                f"({type(exc).__name__})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise TerminalError(f"{path}: not an Ed25519 private key")
        return cls(key, terminal_id)

    def save(self, path: Path) -> None:
        """Write the private key (PEM, PKCS #8) to a new file readable by its owner only."""
        pem = self._key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)

    def sign_confirmation(self, merchant_id: bytes, txn_id: bytes, result_m: bytes,
                          card_mac2: bytes, tac: bytes) -> bytes:
        return self._key.sign(M.fig7_signed_data(merchant_id, txn_id, result_m, card_mac2,
                                                 tac))


def fingerprint(public_key: bytes) -> bytes:
    """The default id of a client terminal: the first 8 bytes of SHA-256 of its public key."""
    return hashlib.sha256(public_key).digest()[:8]


# This process's own client terminals, by id (like an ssh agent): a checkout URL that names
# ``?terminal=ID`` is paid with the key registered here for ID (used by svcard.host.pay.stack).
_TERMINALS: dict[bytes, ClientTerminal] = {}


def add_terminal(terminal: ClientTerminal) -> None:
    _TERMINALS[terminal.terminal_id] = terminal


def remove_terminal(terminal: ClientTerminal) -> None:
    if _TERMINALS.get(terminal.terminal_id) is terminal:
        del _TERMINALS[terminal.terminal_id]


def terminal_named(value: str | None) -> ClientTerminal | None:
    try:
        return _TERMINALS.get(bytes.fromhex(value or ""))
    except ValueError:
        return None


def checkout_request(url: str, terminal: ClientTerminal | None = None,
                     ) -> tuple[str, ClientTerminal | None]:
    """The checkout URL this client asks, and the terminal it pays as: with a terminal key
    the URL names the terminal; without one it never asks for FIG. 7."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if terminal is None:
        terminal = terminal_named(next((v for k, v in query if k == "terminal"), None))
    query = [(k, v) for k, v in query if k != "terminal"]
    if terminal is None:
        query = [(k, v) for k, v in query if (k, v) != ("variant", "fig7")]
    else:
        query.append(("terminal", terminal.terminal_id.hex().upper()))
    return urlunsplit(parts._replace(query=urlencode(query))), terminal

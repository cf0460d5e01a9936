"""What the helper trusts: its pairing token (a 0600 file), the web origins it answers and the
loopback addresses it may listen on.

The token is 32 random bytes (URL-safe base64). It is made once and kept in its file, so a shop
page is paired once; ``--new-token`` replaces it (every paired page must then be paired again).
A token file that someone else could read, or that is not a plain file of ours, is refused rather
than used. The token is compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import secrets
import stat
from pathlib import Path
from urllib.parse import urlsplit

TOKEN_BYTES = 32
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")    # secrets.token_urlsafe(32)
MAX_TOKEN_FILE = 256                          # bytes read from a token file at most
MAX_URL = 2048                                # the longest checkout URL taken
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


class PairingError(Exception):
    """A token file, origin, URL or listen address that cannot be used; the message names it."""


def default_token_file() -> Path:
    """``$XDG_STATE_HOME/svcard/helper-token`` (``~/.local/state/svcard/helper-token``)."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "svcard" / "helper-token"


def load_or_create_token(path: Path, renew: bool = False) -> tuple[str, bool]:
    """The pairing token kept in ``path`` and whether it was made just now. A missing file (or
    ``renew``) gets a new token, written to a new 0600 file that replaces the old one at once."""
    if renew or not os.path.lexists(path):
        return _write_token(path), True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise PairingError(f"token file {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise PairingError(f"token file {path}: not a regular file")
        if info.st_uid != os.getuid():
            raise PairingError(f"token file {path}: owned by another user")
        if info.st_mode & 0o077:
            raise PairingError(f"token file {path}: others may read it (mode "
                               f"{stat.S_IMODE(info.st_mode):04o}); chmod 600 it, or make a "
                               "new token with --new-token")
        raw = fh.read(MAX_TOKEN_FILE + 1)
    token = raw.decode("ascii", "replace").strip()
    if len(raw) > MAX_TOKEN_FILE or not _TOKEN.fullmatch(token):
        raise PairingError(f"token file {path}: not a helper token (make a new one with "
                           "--new-token)")
    return token, False


def _write_token(path: Path) -> str:
    token = secrets.token_urlsafe(TOKEN_BYTES)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(token + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        raise PairingError(f"token file {path}: {exc.strerror or exc}") from None
    return token


def token_matches(expected: str, authorization: str | None) -> bool:
    """Whether an ``Authorization: Bearer TOKEN`` header carries ``expected`` (constant time)."""
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8", "replace"), expected.encode("ascii"))


def normalise_origin(value: str, what: str = "--allow-origin") -> str:
    """``scheme://host[:port]`` as a browser sends it in ``Origin`` (lower-case host, default
    port left out). A wildcard, ``null`` or anything with a path is refused."""
    text = value.strip()
    if text in ("*", "null", ""):
        raise PairingError(f"{what} {text or '(empty)'}: name each shop's origin "
                           "(e.g. https://shop.example); a wildcard is never accepted")
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        raise PairingError(f"{what} {text[:100]}: the port is not a number") from None
    if (parts.scheme not in ("http", "https") or not parts.hostname or "*" in text
            or parts.path not in ("", "/") or parts.query or parts.fragment
            or parts.username is not None or parts.password is not None):
        raise PairingError(f"{what} {text[:100]}: an origin is http(s)://HOST[:PORT] and "
                           "nothing else")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def url_origin(url: str) -> str:
    """The origin of an http(s) URL (``PairingError`` if it is not one)."""
    if len(url) > MAX_URL:
        raise PairingError(f"checkout_url: longer than {MAX_URL} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PairingError("checkout_url: not an http(s) URL")
    return normalise_origin(f"{parts.scheme}://{parts.netloc}", "checkout_url")


def loopback_address(host: str) -> str:
    """The address to listen on, which must be loopback: no other computer may reach the card."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise PairingError(f"--host {host}: the helper listens on loopback only (127.0.0.1 or "
                           "::1), so that no other computer can reach the card")
    return str(address)


def is_loopback_host_header(value: str | None) -> bool:
    """Whether a request's ``Host`` names this computer by a loopback name (not a DNS name that
    an attacker's page could have pointed at 127.0.0.1)."""
    if not value:
        return False
    host = value.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else ""
    else:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return host in LOOPBACK_NAMES or _is_loopback_ip(host)


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

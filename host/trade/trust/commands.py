"""``svcard session product`` (the customer fetches a digital product it bought, FIG. 4) and
``svcard session dispute-verify`` (a third party judges a dispute package with public keys
only). Registered on ``svcard session`` by ``host/trade/cli.py``.

``product``: exit 0 with the product written to ``--out``; 1 when the merchant or the trusted
party refused, or the product does not match its signed description (the dispute package is
written all the same); 3 for a file that cannot be used; 11 for a server out of reach.
``dispute-verify``: exit 0 ``matches`` (the product is the one described), 1 ``mismatch`` (the
merchant's signed description is false), 3 ``invalid`` (the evidence does not hold together).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import httpx

from ...kit.command_line import EXIT_DECLINED, EXIT_INPUT, EXIT_NETWORK, emit, fail, json_option
from .. import customer as C
from ..signing import SigningError, public_from_hex
from . import buyer, certs
from . import delivery as V


def _write(path: Path, data: bytes) -> None:
    """``data`` to a new file ``path`` (never over an existing one), mode 0600."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        fail(f"{path}: cannot write: {exc.strerror}", EXIT_INPUT)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@click.command("product")
@click.option("--state", "state", required=True, type=click.Path(path_type=Path),
              help="The session file.")
@click.option("--index", type=click.IntRange(1, 1_000_000), default=None,
              help="The link that paid the purchase (default: the last purchase).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Where to write the product (a new file).")
@click.option("--dispute", type=click.Path(path_type=Path), default=None,
              help="Where to write the dispute package (a new file; default OUT.dispute).")
@json_option
def product_cmd(state: Path, index: int | None, out: Path, dispute: Path | None,
                as_json: bool) -> None:
    """Fetch the digital product a purchase bought: check the merchant's signed offer,
    accept it, and open it with the key the trusted party releases (seed 004 FIG. 4)."""
    dispute = dispute or out.with_name(out.name + ".dispute")
    cert = dispute.with_name(dispute.name + ".cert")
    for path in (out, dispute, cert):
        if path.exists():
            fail(f"{path}: exists; it is never overwritten", EXIT_INPUT)
    try:
        s = C.load(state)
    except C.TradeError as exc:
        fail(str(exc), EXIT_INPUT)
    was_pending = bool(s.pending)
    try:
        with httpx.Client(timeout=60) as http:
            got = buyer.fetch(http, s, index, keep=state)
    except C.TradeError as exc:
        fail(str(exc), EXIT_DECLINED)
    except httpx.HTTPError as exc:
        fail(f"{s.merchant_url}: {type(exc).__name__}: {exc}", EXIT_NETWORK)
    if was_pending and not s.pending:     # paid by the release: now in the session's list
        C.save(state, s)
    _write(dispute, got.package)
    if got.merchant_cert:
        _write(cert, got.merchant_cert.encode())
    data = {"session": s.session, "index": got.index, "item": got.item,
            "matches": got.plaintext is not None, "reason": got.reason,
            "out": str(out), "dispute": str(dispute),
            "merchant_cert": str(cert) if got.merchant_cert else "",
            "merchant_fi": s.opened.get("acquirer", ""),
            "merchant_key": got.merchant_key.hex(), "session_key": got.session_key.hex()}
    if got.plaintext is None:
        emit(as_json, data, f"{got.item}: {got.reason}; the dispute package is {dispute}")
        raise SystemExit(EXIT_DECLINED)
    _write(out, got.plaintext)
    emit(as_json, data, f"{got.item}: {len(got.plaintext)} bytes to {out}, as described; "
                        f"dispute package {dispute}")


@click.command("product-buy")
@click.argument("item")
@click.option("--units", type=click.IntRange(1, 10_000), default=1, show_default=True)
@click.option("--state", "state", required=True, type=click.Path(path_type=Path),
              help="The session file.")
@json_option
def product_buy_cmd(item: str, units: int, state: Path, as_json: bool) -> None:
    """Order the digital product ITEM fairly (FIG. 4): the merchant gets the signed order, not
    the link; `svcard session product` then accepts the offer and the trusted party releases
    K2 to you and the link to the merchant in one step."""
    try:
        s = C.load(state)
    except C.TradeError as exc:
        fail(str(exc), EXIT_INPUT)
    try:
        with httpx.Client(timeout=30) as http:
            got = buyer.buy_product(http, s, item, units)
    except C.TradeError as exc:
        C.save(state, s)
        fail(str(exc), EXIT_DECLINED)
    except httpx.HTTPError as exc:
        C.save(state, s)
        fail(f"{s.merchant_url}: {type(exc).__name__}: {exc}", EXIT_NETWORK)
    C.save(state, s)
    emit(as_json, got, f"ordered {item} (link {got['index']}): nothing paid until you accept "
                       f"its offer: svcard session product --state {state} --out FILE")


@click.command("dispute-verify")
@click.argument("package", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--merchant-key", default=None, help="The merchant's public key (hex).")
@click.option("--merchant-cert", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Instead: the certificate of the merchant's key by the "
              "merchant's own FI (written beside the package), checked with --fi-key.")
@click.option("--fi-key", default=None, help="The public key (hex) of the merchant's FI.")
@click.option("--session-key", required=True, help="The session's public key (hex).")
@json_option
def dispute_verify_cmd(package: Path, merchant_key: str | None, merchant_cert: Path | None,
                       fi_key: str | None, session_key: str, as_json: bool) -> None:
    """Judge a FIG. 4 dispute package with public keys only: is the product the one the
    merchant's signed description describes? The merchant's key is given, or taken from the
    certificate its own FI signed for the session (a key the customer made up is then no
    merchant's)."""
    if (merchant_key is None) == (merchant_cert is None or fi_key is None):
        fail("give --merchant-key, or --merchant-cert with --fi-key", EXIT_INPUT)
    try:
        session = public_from_hex(session_key, "--session-key")
        with package.open("rb") as f:
            blob = f.read(V.MAX_PACKAGE + 1)
        if merchant_cert is not None and fi_key is not None:
            merchant = _vouched(blob, merchant_cert, public_from_hex(fi_key, "--fi-key"))
        else:
            merchant = public_from_hex(str(merchant_key), "--merchant-key")
    except SigningError as exc:
        fail(str(exc), EXIT_INPUT)
    except OSError as exc:
        fail(f"{exc.filename}: cannot read: {exc.strerror}", EXIT_INPUT)
    except certs.CertError as exc:      # the evidence does not hold together
        emit(as_json, {"outcome": "invalid", "reason": exc.reason},
             f"{merchant_cert}: invalid: {exc.reason}")
        raise SystemExit(EXIT_INPUT) from None
    verdict = V.verify_dispute(blob, merchant, session)
    emit(as_json, {"outcome": verdict.outcome, "reason": verdict.reason},
         f"{package}: {verdict.outcome}: {verdict.reason}")
    raise SystemExit({"matches": 0, "mismatch": EXIT_DECLINED}.get(verdict.outcome,
                                                                   EXIT_INPUT))


def _vouched(blob: bytes, cert: Path, fi: bytes) -> bytes:
    """The merchant's key from its FI's certificate, for the package's session."""
    try:
        session = json.loads(blob)["description"]["session"]
        return certs.vouched(fi, cert.read_bytes()[:certs.MAX_CERT + 1], str(session))
    except (ValueError, KeyError, TypeError, RecursionError):
        raise certs.CertError("the package names no session") from None


def register(group: click.Group) -> None:
    group.add_command(product_cmd)
    group.add_command(product_buy_cmd)
    group.add_command(dispute_verify_cmd)

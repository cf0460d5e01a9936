"""The goods system's commands (seed 000): ``svcard serve goods-merchant|goods-payment|
goods-auth|goods-bank|goods-fulfil``, ``svcard goods init|account|close-batch``, and ``svcard device
init|register|wait|pickup`` (the communication device).

A refusal exits 1, an unreachable server 11, a file that cannot be used 3.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from ...protocols import signatures as S
from ..kit.command_line import EXIT_DECLINED, EXIT_INPUT, EXIT_NETWORK, emit, fail, json_option
from ..kit.serving import serve as serve_app
from ..kit.serving import serve_options
from ..terminal.card_commands import handled
from ..terminal.reader_specs import open_reader
from .config import ROLES

if TYPE_CHECKING:
    from .device import Device, FirstMessage, Outcome
    from .server.common import PartyServer

T = TypeVar("T")

NAMES = {"merchant": "the merchant server", "payment": "the payment server",
         "auth": "the authentication server", "bank": "the financial institution",
         "fulfil": "the fulfilment server"}


def register(root: click.Group, serve: click.Group) -> None:
    root.add_command(goods)
    root.add_command(device)
    for role in ROLES:
        serve.add_command(_serve_command(role))


def _serve_command(role: str) -> click.Command:
    @click.command(f"goods-{role}", help=f"Serve {NAMES[role]} of the goods system (seed 000).")
    @click.option("--config", "config_path", required=True,
                  type=click.Path(dir_okay=False, path_type=Path),
                  help="The goods system's TOML file (docs/goods.md).")
    @click.option("--db", "db_url", default=None, help="Database URL (over the file's).")
    @click.option("--host", default="127.0.0.1", show_default=True)
    @click.option("--port", type=click.IntRange(1, 65535), default=None,
                  help="Default: the port of this party's url in the file.")
    @click.option("--psam", "psam_specs", multiple=True,
                  help="goods-payment only: a PSAM's reader spec (repeat for a pool of one "
                       "terminal id); with none, goods are not paid by the purse.")
    @serve_options
    def command(config_path: Path, db_url: str | None, host: str, port: int | None,
                psam_specs: tuple[str, ...], log_level: str, drain_seconds: float) -> None:
        from urllib.parse import urlsplit

        from ..kit.config import ConfigError
        from .config import goods_config
        from .stack import SERVERS

        try:
            config = goods_config(config_path, role, db_url)
        except ConfigError as exc:
            fail(str(exc), EXIT_INPUT)
        if psam_specs and role != "payment":
            fail("--psam: only the payment server holds PSAMs", EXIT_INPUT)
        from ...reader import ReaderError
        try:
            psams = [open_reader(spec) for spec in psam_specs]
        except ReaderError as exc:
            fail(f"--psam: {exc}", EXIT_INPUT)
        try:
            if psams:
                from .server.payment import PaymentServer
                server: PartyServer = PaymentServer(config, psams=psams)
            else:
                server = SERVERS[role](config)
        except ValueError as exc:
            fail(f"{config_path}: {exc}", EXIT_INPUT)
        port = port or urlsplit(config.me.url).port or 80
        sys.exit(serve_app(server.app(), host=host, port=port, log_level=log_level,
                           drain=server, drain_seconds=drain_seconds))
    return command


@click.group()
def goods() -> None:
    """The goods system of seed 000: its files and the institution's accounts."""


@goods.command("init")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@json_option
def init_cmd(folder: Path, as_json: bool) -> None:
    """Write a demo goods system into FOLDER: goods.toml, a key file per party (0600), the
    issuer file of the demo cards, goods-key.toml (the fulfilment server's goods key only,
    0600) and a demo PSAM image for goods the purse pays
    (``svcard serve goods-payment --psam virtual:FOLDER/goods-psam1.json``) (TEST KEYS)."""
    from .stack import psam_images, write_system

    if (folder / "goods.toml").exists():
        fail(f"{folder / 'goods.toml'}: exists; never overwritten", EXIT_INPUT)
    try:
        path = write_system(folder)
        [psam] = psam_images(folder, 1)
    except (OSError, S.SigningError) as exc:
        fail(str(exc), EXIT_INPUT)
    emit(as_json, {"config": str(path), "psam": str(psam)},
         f"goods system written: {path} (the payment server's PSAM: {psam})")


@goods.command("account")
@click.argument("account")
@click.option("--config", "config_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path))
@click.option("--card", "card_serial", required=True, help="The card's application serial.")
@click.option("--pin-file", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--balance", type=click.IntRange(0, 2**40), default=0, show_default=True,
              help="Minor units.")
@json_option
def account_cmd(account: str, config_path: Path, card_serial: str, pin_file: Path,
                balance: int, as_json: bool) -> None:
    """Open ACCOUNT at the institution, paying for one card."""
    import time

    from ..kit.config import ConfigError
    from .config import goods_config
    from .db import make_engine
    from .server.bank import add_account

    try:
        config = goods_config(config_path, "bank")
        pin = pin_file.read_text().strip()
    except (ConfigError, OSError) as exc:
        fail(str(exc), EXIT_INPUT)
    engine = make_engine(config.db_url, "bank")
    try:
        add_account(engine, account, card_serial, pin, balance,
                    config.system.currency_code, int(time.time() * 1000))
    except ValueError as exc:
        fail(str(exc), EXIT_INPUT)
    except Exception as exc:   # a unique key: the account or the card is taken
        fail(f"account {account}: {type(exc).__name__} (the account or card exists)",
             EXIT_DECLINED)
    finally:
        engine.dispose()
    emit(as_json, {"account": account, "card": card_serial.upper(), "balance": balance},
         f"account {account} pays for card {card_serial.upper()}")


@goods.command("close-batch")
@click.option("--config", "config_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The goods system's TOML file (its payment party's key file is needed).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The concentration folder that svcard clearing run reads.")
@click.option("--resend", is_flag=True, help="Write every file the server kept (an answer lost).")
@json_option
def close_batch_cmd(config_path: Path, out_dir: Path, resend: bool, as_json: bool) -> None:
    """Close the goods payment server's PSAM batches; write the batch files (with the TACs of
    the committed composite purchases) and late proofs into --out, for svcard clearing run.
    Exit 1 if the server refused, 3 if a file cannot be used, 11 if it cannot be reached."""
    from ..kit.config import ConfigError
    from .batch import CloseError, close_batches
    from .config import goods_config

    try:
        config = goods_config(config_path, "payment")
    except ConfigError as exc:
        fail(str(exc), EXIT_INPUT)
    try:
        paths = close_batches(config, out_dir, resend=resend)
    except CloseError as exc:
        fail(str(exc), EXIT_NETWORK if "cannot reach" in str(exc) else EXIT_DECLINED)
    except OSError as exc:
        fail(f"{out_dir}: {exc.strerror or exc}", EXIT_INPUT)
    emit(as_json, {"files": [str(p) for p in paths]},
         "\n".join([f"{len(paths)} file(s) for clearing:"] + [f"  {p}" for p in paths]))


# --- the device ---------------------------------------------------------------------------------
key_option = click.option("--key", "key_file", required=True,
                          type=click.Path(dir_okay=False, path_type=Path),
                          help="The device's private key file (svcard device init).")
auth_options = [
    click.option("--auth", "auth_url", required=True, help="The authentication server's URL."),
    click.option("--auth-id", required=True, help="The authentication server's id."),
    click.option("--auth-key", required=True, help="Its public key (64 hex digits)."),
]


def _with_auth(f: click.decorators.FC) -> click.decorators.FC:
    for option in reversed(auth_options):
        f = option(f)
    return key_option(f)


def _device(auth_url: str, auth_id: str, auth_key: str, key_file: Path) -> Device:
    from .device import Device

    try:
        public = bytes.fromhex(auth_key)
        if len(public) != 32:
            raise ValueError
    except ValueError:
        fail("--auth-key: 64 hex digits", EXIT_INPUT)
    try:
        key = S.read_private_key(key_file)
    except S.SigningError as exc:
        fail(str(exc), EXIT_INPUT)
    return Device(auth_url.rstrip("/"), auth_id, public, key)


@click.group()
def device() -> None:
    """The communication device of seed 000: shows first messages, authorises with the card,
    writes the goods onto it."""


@device.command("init")
@key_option
@json_option
def device_init(key_file: Path, as_json: bool) -> None:
    """Make the device's key (a new file, mode 0600); prints its device id."""
    from .wire import device_id, new_key  # (kit.http, SQLAlchemy: only when a key is made)

    key = new_key()
    try:
        S.write_private_key(key_file, key)
    except S.SigningError as exc:
        fail(str(exc), EXIT_INPUT)
    did = device_id(S.public_of(key))
    emit(as_json, {"device": did}, f"device {did}")


def _run(work: Callable[[], T]) -> T:
    import httpx

    from .device import DeviceError

    try:
        return work()
    except DeviceError as exc:
        cause = exc.__cause__
        fail(str(exc), EXIT_NETWORK if isinstance(cause, httpx.HTTPError) else EXIT_DECLINED)


@device.command("register")
@_with_auth
@click.option("--label", default="device", show_default=True)
@json_option
def device_register(auth_url: str, auth_id: str, auth_key: str, key_file: Path, label: str,
                    as_json: bool) -> None:
    """Register this device's key with the authentication server."""
    dev = _device(auth_url, auth_id, auth_key, key_file)
    did = _run(lambda: dev.register(label[:64] or "device"))
    emit(as_json, {"device": did}, f"device {did} registered")


@device.command("wait")
@_with_auth
@click.option("--card", "card_spec", required=True, help="Reader spec of the card.")
@click.option("--yes", is_flag=True, help="Authorise every first message without asking.")
@click.option("--pin-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The card's PIN (else asked for).")
@click.option("--count", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="First messages to handle before exiting.")
@click.option("--wait", "wait_s", type=click.IntRange(0, 60), default=25, show_default=True,
              help="Seconds one long poll waits.")
@click.option("--polls", type=click.IntRange(1, 10**6), default=10**6,
              help="Give up after this many polls with nothing.")
@click.option("--pay", type=click.Choice(["bank", "purse"]), default="bank", show_default=True,
              help="Who pays: the card holder's bank account (the good written by secure "
                   "messaging) or the card's purse (one composite purchase, good and debit "
                   "together; the PIN, if given, is checked by the card only).")
@json_option
def device_wait(auth_url: str, auth_id: str, auth_key: str, key_file: Path, card_spec: str,
                yes: bool, pin_file: Path | None, count: int, wait_s: int, polls: int,
                pay: str, as_json: bool) -> None:
    """Wait for first messages, show each, authorise it with the card and write the good."""
    dev = _device(auth_url, auth_id, auth_key, key_file)
    pin = None
    if pin_file is not None:
        try:
            pin = pin_file.read_text().strip()
        except OSError as exc:
            fail(f"{pin_file}: {exc.strerror}", EXIT_INPUT)
    done: list[dict[str, object]] = []
    for _ in range(polls):
        if len(done) >= count:
            break
        firsts = _run(lambda: dev.poll(wait_s))
        for first in firsts[:count - len(done)]:
            click.echo(first.show(), err=as_json)
            approve = yes or click.confirm("Authorise this payment?", default=False)
            if pay == "purse":
                if not approve:
                    done.append({"order": first.order, "paid": False, "reason": "not authorised"})
                    continue
                out = _pay_with_purse(dev, card_spec, first, pin)
            else:
                the_pin = pin or ("0000" if not approve else click.prompt(
                    "Card PIN", hide_input=True))
                out = _authorise(dev, card_spec, first, the_pin, approve)
            done.append(dict(vars(out)))
            click.echo(f"order {first.order}: " + (
                "paid, good written onto the card" if out.written
                else f"{'paid' if out.paid else 'not paid'}: {out.reason}"), err=as_json)
    emit(as_json, {"device": dev.id, "handled": done, "round_trips": dev.round_trips},
         f"{len(done)} first message(s) handled, {dev.round_trips} round trip(s)")
    if len(done) < count:
        sys.exit(EXIT_DECLINED)


def _authorise(dev: Device, card_spec: str, first: FirstMessage, pin: str,
               approve: bool) -> Outcome:
    with handled(), open_reader(card_spec) as card:
        return _run(lambda: dev.authorise(card, first, pin, approve=approve))


def _pay_with_purse(dev: Device, card_spec: str, first: FirstMessage,
                    pin: str | None) -> Outcome:
    with handled(), open_reader(card_spec) as card:
        return _run(lambda: dev.pay_with_purse(card, first, pin))


@device.command("pickup")
@_with_auth
@click.option("--card", "card_spec", required=True, help="Reader spec of the card.")
@json_option
def device_pickup(auth_url: str, auth_id: str, auth_key: str, key_file: Path, card_spec: str,
                  as_json: bool) -> None:
    """The card's next contact: write every good paid for it and not yet on it."""
    dev = _device(auth_url, auth_id, auth_key, key_file)
    with handled(), open_reader(card_spec) as card:
        outs = _run(lambda: dev.pickup(card))
    emit(as_json, {"device": dev.id, "written": [vars(o) for o in outs]},
         f"{sum(o.written for o in outs)} good(s) written")

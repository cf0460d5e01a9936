"""``svcard card``: make card images from profiles, show what one holds, serve images to
pcscd through vpcd."""

from __future__ import annotations

import copy
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import click

from ...card.applet import (
    APPLET_CLASS,
    AppletBuildError,
    AppletStateError,
    build_applet,
    install_params,
    personalisation_script,
)
from ...card.iep import Iep
from ...card.image import app_of, card_from_image, check_image, save_new_image
from ...card.personalise import image_from_profile
from ...card.storage import ImageError, read_image
from ..kit.command_line import EXIT_INPUT, EXIT_USAGE, emit, fail, json_option
from ..terminal.capp import describe_goods, goods_lines
from ..terminal.card_commands import handled
from ..terminal.points import describe_programmes, programme_lines
from .describe import describe_image, render_image


@click.group()
def card() -> None:
    """Make and inspect card images (IEP purse, PSAM, load HSM)."""


@card.command("new")
@click.argument("profile", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the card image (JSON).")
@click.option("--force", is_flag=True, help="Replace an existing image.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Replace a profile field (repeat), e.g. --set psam_serial=000...02 or "
                   "--set balances.ep=5000. VALUE is read as TOML; a field the profile gives "
                   "as a string stays a string, and VALUE that is not TOML is a string.")
def card_new(profile: Path, out: Path, force: bool, settings: tuple[str, ...]) -> None:
    """Personalise a card from a TOML PROFILE (see docs/profiles.md).

    \b
    Two PSAMs of one pool from one profile (each needs its own serial):
      svcard card new psam.toml --out psam1.json --set psam_serial=00000000000000000001
      svcard card new psam.toml --out psam2.json --set psam_serial=00000000000000000002
    """
    overrides = profile_overrides(profile, settings)
    with handled():
        image = image_from_profile(profile, **overrides)
        save_new_image(out, image, overwrite=force)
    click.echo(f"wrote {image['kind']} card image {out}")


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*")


def profile_overrides(profile: Path, settings: tuple[str, ...]) -> dict[str, Any]:
    """``--set KEY=VALUE`` settings as top-level profile overrides: a dotted KEY replaces one
    field of a table (``balances.ep=5000`` keeps the profile's other balances). A VALUE is TOML
    (``5000``, ``true``, ``["AB"]``, ``"text"``), except that a field the profile already gives
    as a string takes VALUE as that string (hex serials keep their leading zeros), and a VALUE
    that is not TOML is a string. A setting without ``=`` is a usage error."""
    try:
        with profile.open("rb") as fh:
            current: dict[str, Any] = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        current = {}  # image_from_profile says what is wrong with the file
    overrides: dict[str, Any] = {}
    for setting in settings:
        key, sep, text = setting.partition("=")
        key = key.strip()
        if not sep or not _KEY.fullmatch(key):
            raise click.BadParameter(f"{setting!r} is not KEY=VALUE (e.g. psam_serial=00..02)",
                                     param_hint="'--set'")
        path = key.split(".")
        top = path[0]
        if top not in overrides:
            overrides[top] = copy.deepcopy(current.get(top)) if len(path) > 1 else None
        table = overrides
        for part in path[:-1]:
            if not isinstance(table.get(part), dict):
                table[part] = {}
            table = table[part]
        table[path[-1]] = _value(text, _lookup(current, path))
    return overrides


def _lookup(data: Any, path: list[str]) -> Any:
    for part in path:
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _value(text: str, current: Any) -> Any:
    """VALUE as TOML, or as the string it is (see :func:`profile_overrides`)."""
    if isinstance(current, str):
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


@card.command("show")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
def card_show(image: Path, as_json: bool) -> None:
    """Print what a card image holds: balances, counters, the decoded log (never keys)."""
    with handled():
        raw = read_image(image)
        check_image(raw, str(image))  # a field of the wrong type: its name, exit code 3
        try:
            data = describe_image(raw)
            text = render_image(data)
            if raw.get("kind") == "iep":   # the goods it holds (host/terminal/capp.py)
                data["goods"] = describe_goods(raw["app"])
                text += "\n" + "\n".join(goods_lines(data["goods"]))
            if raw.get("loyalty"):   # its loyalty programmes (host/terminal/points.py)
                data["loyalty"] = describe_programmes(raw)
                text += "\n" + "\n".join(programme_lines(data["loyalty"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise ImageError(f"{image}: damaged card image ({type(exc).__name__}: "
                             f"{exc})") from None
    emit(as_json, data, text)


@card.command("applet")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the compiled applet (OUT/classes) and its personalisation "
                   "script (OUT/perso.apdu).")
@click.option("--jar", envvar="JCARDSIM_JAR", metavar="JAR",
              help="The jCardSim jar whose javacard.* classes the applet compiles against "
                   "[default: $JCARDSIM_JAR].")
@json_option
def card_applet(image: Path, out: Path, jar: str | None, as_json: bool) -> None:
    """Build svcard's IEP as a Java Card applet, personalised like a purse card IMAGE.

    Writes the compiled classes and the personalisation script (it holds the card's keys:
    mode 0600) and prints the jcardsim: reader spec that runs the applet; the image is only
    read. See docs/javacard.md.
    """
    if not jar:
        fail("--jar: give the jCardSim jar (or set JCARDSIM_JAR)", EXIT_USAGE)
    with handled():
        raw = read_image(image)
        check_image(raw, str(image))
        app = app_of(card_from_image(raw))
    if not isinstance(app, Iep):
        fail(f"{image}: a {raw.get('kind')} image; the applet is a purse card (kind iep)",
             EXIT_INPUT)
    try:
        params = install_params(app.state)
        script_text = personalisation_script(app.state)
        classes = build_applet(out / "classes", jar)
    except AppletStateError as exc:
        fail(f"{image}: {exc}", EXIT_INPUT)
    except AppletBuildError as exc:
        fail(str(exc), EXIT_INPUT)
    script = out / "perso.apdu"
    script.unlink(missing_ok=True)
    fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(script_text)
    spec = f"jcardsim:{APPLET_CLASS}:{app.state.aid.hex().upper()}:{params.hex().upper()}@{script}"
    data = {"classes": str(classes), "script": str(script), "reader_spec": spec,
            "applet_class": APPLET_CLASS}
    emit(as_json, data, "\n".join([
        f"built {APPLET_CLASS} into {classes}",
        f"personalisation script {script} (it holds the card's keys: keep it secret)",
        f"put {classes} on JCARDSIM_CLASSPATH (with BouncyCastle's bcprov.jar for a jCardSim "
        "that needs it), then use the card as",
        f"  --card '{spec}'"]))


@card.command("serve")
@click.argument("images", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--vpcd", "address", default="127.0.0.1:35963", show_default=True,
              help="vpcd's HOST:PORT; further images go to the following ports "
                   "(reader 'Virtual PCD 00 01' is port+1).")
@click.option("--quiet", is_flag=True, help="Do not report connections and power events.")
@click.option("--wait", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds to wait for vpcd at the start, then exit 4 naming the address "
                   "(0: fail at once, like vicc).")
def card_serve(images: tuple[Path, ...], address: str, quiet: bool, wait: float) -> None:
    """Serve card IMAGES to the system's pcscd through the vsmartcard vpcd driver.

    Each image becomes a card in a "Virtual PCD 00 0N" reader, seen by every PC/SC program
    (pcsc_scan, opensc-tool, pyscard, svcard pcsc:...). Runs until Ctrl-C; every card write
    is atomic, so stopping at any moment leaves the images consistent.
    """
    from .card_serve import serve_images

    try:
        from ...reader.vpcd import parse_address
        host, port = parse_address(address)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    with handled():
        serve_images(list(images), host, port, quiet=quiet, wait=wait)

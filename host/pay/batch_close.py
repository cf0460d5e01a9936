"""``svcard batches close``: the payment server's operator closes every PSAM's batch and hands
it to the concentration folder (``POST /v1/batches/close`` with the admin token), instead of a
hand-written curl that puts the token on a command line.

The admin token comes from ``--admin-token-file`` (the file's first line), else
``$SVCARD_ADMIN_TOKEN``, else the payment server's configuration file (``--config``); it is
never printed. The answer is the batch files and late-proofs files written, as text or
``--json``. Exit codes: 1 the server refused (no or wrong token, no concentration folder);
3 the token file, the configuration or the answer cannot be used; 11 the server cannot be
reached, or its PSAMs stayed busy (the batches closed so far are printed; run it again).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from ..kit.command_line import (
    EXIT_DECLINED,
    EXIT_INPUT,
    EXIT_NETWORK,
    EXIT_USAGE,
    emit,
    fail,
    json_option,
)

TOKEN_ENV = "SVCARD_ADMIN_TOKEN"
MAX_TOKEN_FILE = 4096  # bytes: a token is a line


class CloseError(Exception):
    """The close did not happen (or not wholly): the message and the exit code."""

    def __init__(self, message: str, exit_code: int, answer: dict[str, Any] | None = None,
                 ) -> None:
        super().__init__(message)
        self.exit_code, self.answer = exit_code, answer or {}


def close_batches(url: str, token: str, timeout: float = 120.0) -> dict[str, Any]:
    """``POST URL/v1/batches/close`` with the admin token: the server's answer (the batch and
    late-proofs files written). Anything else is a :class:`CloseError`."""
    import httpx

    endpoint = url.rstrip("/") + "/v1/batches/close"
    try:
        response = httpx.post(endpoint, timeout=timeout,
                              headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as exc:
        raise CloseError(f"cannot reach the payment server at {endpoint}: "
                         f"{exc or type(exc).__name__}", EXIT_NETWORK) from None
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise CloseError(f"{endpoint} answered {response.status_code} without a JSON object: "
                         "is it a payment server?", EXIT_INPUT)
    reason = str(answer.get("reason", ""))[:300]
    status = response.status_code
    if status == 200:
        return answer
    if status in (401, 403):
        raise CloseError(f"refused: {reason or 'admin token required'} (is the token the "
                         "payment server's admin_token?)", EXIT_DECLINED)
    if status in (429, 503) or status >= 500:
        raise CloseError(f"the payment server is busy ({status}): {reason}; run again to "
                         "close the rest", EXIT_NETWORK, answer)
    raise CloseError(f"refused ({status}): {reason}", EXIT_DECLINED, answer)


def admin_token(token_file: Path | None, config_path: Path | None) -> str:
    """The admin token: ``token_file``'s first line, else ``$SVCARD_ADMIN_TOKEN``, else the
    payment server configuration's ``admin_token``."""
    if token_file is not None:
        try:
            with token_file.open("rb") as fh:
                raw = fh.read(MAX_TOKEN_FILE + 1)
        except OSError as exc:
            raise CloseError(f"{token_file}: {exc.strerror or exc}", EXIT_INPUT) from None
        if len(raw) > MAX_TOKEN_FILE:
            raise CloseError(f"{token_file}: larger than {MAX_TOKEN_FILE} bytes: not a token "
                             "file", EXIT_INPUT)
        try:
            lines = raw.decode("utf-8").strip().splitlines()
        except UnicodeDecodeError:
            raise CloseError(f"{token_file}: not UTF-8 text", EXIT_INPUT) from None
        if not lines or not lines[0].strip():
            raise CloseError(f"{token_file}: empty: no admin token", EXIT_INPUT)
        return lines[0].strip()
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip()
    if config_path is not None:
        from ..kit.config import ConfigError
        from .config import payment_config

        try:
            token = payment_config(config_path).admin_token
        except ConfigError as exc:
            raise CloseError(str(exc), EXIT_INPUT) from None
        if not token:
            raise CloseError(f"{config_path}: admin_token: not set, so the server closes no "
                             "batch", EXIT_INPUT)
        return token
    raise CloseError(f"no admin token: give --admin-token-file FILE, set ${TOKEN_ENV}, or "
                     "name the payment server's --config", EXIT_USAGE)


def _listing(answer: dict[str, Any]) -> str:
    batches = [str(b) for b in answer.get("batches", [])]
    late = [str(p) for p in answer.get("late_proofs", [])]
    lines = [f"closed {len(batches)} batch{'es' if len(batches) != 1 else ''}"
             + (":" if batches else " (every open batch was empty)")]
    lines += [f"  {b}" for b in batches]
    if late:
        lines += [f"late proofs: {len(late)} file{'s' if len(late) != 1 else ''}:"]
        lines += [f"  {p}" for p in late]
    return "\n".join(lines)


@click.group("batches")
def batches() -> None:
    """The payment server's PSAM batches (for clearing)."""


@batches.command("close")
@click.option("--url", required=True, metavar="PAYMENT_URL",
              help="The payment server, e.g. http://127.0.0.1:8080.")
@click.option("--admin-token-file", "token_file", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help=f"A file whose first line is the admin token (else ${TOKEN_ENV}, else "
                   "--config).")
@click.option("--config", "config_path", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The payment server's TOML configuration, for its admin_token.")
@click.option("--timeout", default=120.0, show_default=True, type=click.FloatRange(1, 3600),
              help="Seconds to wait for the server (it waits for busy PSAMs).")
@json_option
def batches_close(url: str, token_file: Path | None, config_path: Path | None,
                  timeout: float, as_json: bool) -> None:
    """Close every PSAM's batch at the payment server and hand the batches (and late card
    proofs) to its concentration folder; print the files written.

    Exit 1 if the server refused (wrong token, no concentration folder), 3 if the token or
    configuration cannot be used, 11 if the server cannot be reached or stayed busy.
    """
    try:
        answer = close_batches(url, admin_token(token_file, config_path), timeout)
    except CloseError as exc:
        if exc.answer.get("batches"):
            emit(as_json, exc.answer, _listing(exc.answer))
        fail(str(exc), exc.exit_code)
    emit(as_json, answer, _listing(answer))

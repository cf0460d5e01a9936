"""``svcard goods close-batch``: the goods payment server's operator closes its PSAMs' batches
and writes them, with the TACs of the committed composite purchases, into the concentration
folder that ``svcard clearing run`` reads (docs/goods.md, "The purse-paid goods in clearing").

The request is signed with the payment party's own key (``goods.toml``'s
``parties.payment.private_key_file``: only its operator holds it), the answer checked as that
party's signed decision. Each file is written atomically under the name the server gave (one
of ``batch-TERMINAL-PSAM-NUMBER.json`` / ``proofs-TERMINAL-PSAM-DIGEST.json``); a file already
there with the same bytes is left alone, one with other bytes is never overwritten.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from ...card.storage import write_atomically
from . import wire as W
from .config import PartyConfig
from .server.common import REPLY
from .server.psam_batches import BATCH_CLOSE

MAX_ANSWER = 256 * 1024 * 1024   # bytes of a close's answer (10,000 files at most)
FILE_NAME = re.compile(r"(batch-[0-9A-F]{12}-[0-9A-F]{1,20}-[0-9]{6,10}|"
                       r"proofs-[0-9A-F]{12}-[0-9A-F]{1,20}-[0-9A-F]{20})\.json")


class CloseError(Exception):
    """The close did not happen, or its answer cannot be used."""


def close_batches(config: PartyConfig, out: Path, *, resend: bool = False,
                  timeout: float = 300.0) -> list[Path]:
    """Ask the payment server of ``config`` (the payment party's) to close its PSAMs' batches;
    write the files it answers into ``out``; their paths."""
    import httpx

    if config.role != "payment":
        raise CloseError("the payment party's configuration is needed")
    me = config.me
    body, headers = W.signed(config.private_key, me.id, BATCH_CLOSE,
                             {"resend": resend, "created": int(time.time())})
    url = f"{me.url}/v1/batches/close"
    try:
        with httpx.Client(timeout=timeout) as http:
            answer = http.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        raise CloseError(f"cannot reach the payment server at {url}: "
                         f"{type(exc).__name__}") from None
    if answer.status_code != 200:
        reason = answer.text[:300] if len(answer.content) < 4096 else ""
        raise CloseError(f"the payment server refused ({answer.status_code}): {reason}")
    if (len(answer.content) > MAX_ANSWER or answer.headers.get(W.SIGNER) != me.id
            or not W.verify(me.public_key, REPLY + BATCH_CLOSE, answer.content,
                            answer.headers.get(W.SIGNATURE))):
        raise CloseError(f"{url}: the answer is not signed by {me.id}")
    return write_files(_files(answer.content), out)


def _files(content: bytes) -> list[tuple[str, str]]:
    try:
        doc: Any = json.loads(content)
        items = doc["files"]
        found = [(str(f["name"]), str(f["body"])) for f in items]
    except (ValueError, KeyError, TypeError):
        raise CloseError("the answer is not a list of files") from None
    for name, _ in found:
        if not FILE_NAME.fullmatch(name):
            raise CloseError(f"the answer names a file {name[:120]!r}: not a batch or proofs "
                             "file name")
    return found


def write_files(found: list[tuple[str, str]], out: Path) -> list[Path]:
    """Each file written into ``out`` (a same-bytes file already there is kept)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, body in found:
        path = out / name
        data = body.encode()
        if path.exists():
            if path.read_bytes() != data:
                raise CloseError(f"{path}: exists with other contents; not overwritten")
        else:
            write_atomically(path, data)
        paths.append(path)
    return paths

"""The merchant's copy of a customer's order, sent to the customer's SP (seed 001, "the merchant
sends a copy of the order"; the route is ``POST /v1/pon/via-sp`` in :mod:`.pon`).

The SP answers once it has paid the PON (or refused): JSON with the order, its state and the
bill line, a few hundred bytes. The answer is read as it comes, at most :data:`MAX_ANSWER`
bytes and for at most :data:`ANSWER_SECONDS` in all: an SP (or anyone on the path to it) that
answers without end is cut off with a 502 naming why, instead of being read whole into memory.
Whether the PON was paid is then read from the merchant's own database, never from this answer.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

MAX_ANSWER = 8192       # bytes of the SP's answer read at most
ANSWER_SECONDS = 150.0  # the SP pays before it answers: its whole answer within this


async def send_copy(sp_url: str, body: bytes, headers: dict[str, str], *,
                    limit: int = MAX_ANSWER,
                    seconds: float = ANSWER_SECONDS) -> tuple[int, dict[str, Any]]:
    """POST the signed copy to the SP: (status, its JSON answer); 502 with a ``reason`` if it
    did not answer, answered more than ``limit`` bytes or for longer than ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    got = bytearray()
    try:
        async with httpx.AsyncClient(timeout=min(seconds, 120.0)) as http, \
                http.stream("POST", f"{sp_url.rstrip('/')}/v1/orders/copy", content=body,
                            headers=headers) as sent:
            async for chunk in sent.aiter_bytes():
                got += chunk
                if len(got) > limit:
                    return 502, {"reason": f"the SP's answer is longer than {limit} bytes: "
                                           "not read further"}
                if loop.time() > deadline:
                    return 502, {"reason": f"the SP's answer did not end within "
                                           f"{seconds:g} s: not read further"}
            status = sent.status_code
    except httpx.HTTPError as exc:
        return 502, {"reason": f"no answer from the SP: {type(exc).__name__}"}
    try:
        answer = json.loads(bytes(got))
    except (ValueError, RecursionError):
        answer = None
    if not isinstance(answer, dict):
        return 502 if status < 400 else status, {"reason": "the SP's answer is not JSON"}
    return status, answer

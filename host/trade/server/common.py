"""What the three trading-session servers share: reading a signed message and signing one.

:func:`authenticated` reads a bounded body, checks its fields, finds the key of the party the
``X-Svcard-Signer`` header names (only a party the server knows), verifies the signature
under the message kind's domain label and, for a message with ``created``, that it was made
within :data:`~svcard.host.trade.messages.MAX_SKEW` seconds of the server's clock. Anything
else is refused before any state is read or changed.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ...kit.http import Refused, read_body
from ...kit.request_log import note
from .. import messages as M
from .. import signing as S

KeyLookup = Callable[[str, dict[str, Any]], Awaitable[bytes | None]]


async def authenticated(request: Request, fields: dict[str, Any], what: str, domain: bytes,
                        key_of: KeyLookup, now_s: int) -> tuple[bytes, dict[str, Any], str]:
    """(body, fields, signer) of a message signed by a party the server knows."""
    body = await read_body(request, M.MAX_MESSAGE)
    data = M.parse(body, fields, what)
    signer = request.headers.get(S.SIGNER, "")
    if not M.IDENT(signer):
        raise Refused(401, 401, f"{what}: no valid {S.SIGNER} header")
    note(party=signer)
    key = await key_of(signer, data)
    if key is None:
        raise Refused(403, 403, f"{what}: {signer} is not a party this server knows")
    if not S.verify(key, domain, body, request.headers.get(S.SIGNATURE)):
        raise Refused(401, 401, f"{what}: the signature does not verify")
    created = data.get("created")
    if isinstance(created, int) and abs(now_s - created) > M.MAX_SKEW:
        raise Refused(401, 401, f"{what}: made more than {M.MAX_SKEW} s from this server's "
                                "clock")
    return body, data, signer


def same_pseudonym(given: str | None, expected: str) -> bool:
    """Whether ``given`` (from a request) is the session's pseudonym ``expected``, compared
    in constant time: the pseudonym is what gates a session's status, so the comparison must
    not tell how many leading characters of a guess were right."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                               expected.encode("utf-8", "surrogatepass"))


def signed_json(private: bytes, signer: str, domain: bytes, payload: dict[str, Any],
                status: int = 200) -> Response:
    """A signed answer: the canonical body, its signature and signer in the headers."""
    body, headers = S.signed(private, signer, domain, payload)
    return Response(body, status_code=status, headers=headers,
                    media_type="application/json")


def refused(exc: Refused) -> JSONResponse:
    note(reason=exc.reason)
    return JSONResponse({"reason": exc.reason}, status_code=exc.status, headers=exc.headers)


def verified_answer(answer: httpx.Response, public: bytes, signer: str,
                    domain: bytes) -> bytes | None:
    """The body of ``answer`` if ``signer`` signed it under ``domain``, else None."""
    if answer.headers.get(S.SIGNER) != signer or len(answer.content) > M.MAX_MESSAGE:
        return None
    if not S.verify(public, domain, answer.content, answer.headers.get(S.SIGNATURE)):
        return None
    return answer.content

"""The merchant's check of a client's confirmation (``POST /v1/status/{txn}``): debit result M
must open under DK and match the order; FIG. 8: the card's MAC2 must equal the expected MAC2
that only the merchant can open; FIG. 7: the order's registered client terminal must have signed
it. Every check runs before the one conditional UPDATE that releases the goods (in
:mod:`.server`), with no await among them."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ....protocols import messages as M
from ....protocols import secure
from . import db as MD


class Refusal(Exception):
    """The merchant refuses: an HTTP status and a reason, answered as JSON."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


def check_confirmation(mid: bytes, shared_key: bytes,
                       terminal_keys: Mapping[bytes, Ed25519PublicKey],
                       row: dict[str, Any], txn_id: bytes, body: bytes) -> tuple[str, Any]:
    """Every check of a confirmation of the order ``row`` at merchant ``mid``, with no await:
    (the state it moves the order to, the debit result M)."""
    try:
        conf = M.parse(M.Confirmation, body, "confirmation")
    except M.MessageError as exc:
        raise Refusal(400, str(exc)) from None
    if conf.version != M.VERSION:
        raise Refusal(400, f"confirmation version {conf.version}; this merchant speaks "
                           f"{M.VERSION}")
    if conf.txn_id != txn_id:
        raise Refusal(400, "the confirmation is for another transaction")
    variant = int(row["variant"])
    if conf.variant != variant:
        raise Refusal(400, "the confirmation is for another variant than the order's")
    try:
        result = M.open_result_m(shared_key, mid, txn_id, conf.result_m)
    except (secure.SealError, M.MessageError) as exc:
        raise Refusal(400, f"forged confirmation: {exc}") from None
    expected_status = (M.STATUS_AUTHENTICATED if row["purpose"] == M.PURPOSE_AUTHENTICATION
                       else M.STATUS_OK)
    if result.status != expected_status:
        raise Refusal(402, f"the payment server did not confirm: {result.reason}")
    if (result.merchant_id, result.txn_id, result.amount, result.variant) != (
            mid, txn_id, int(row["amount"]), variant):
        raise Refusal(400, "the confirmation does not match the order")
    if variant == M.FIG8_MERCHANT_COMPARES:
        try:
            expected = secure.open_sealed(secure.derive_key(shared_key, mid, txn_id),
                                          conf.sealed_expected_mac2,
                                          M.expected_mac2_aad(mid, txn_id),
                                          "expected card MAC2")
        except secure.SealError as exc:
            raise Refusal(400, f"forged confirmation: {exc}") from None
        if not hmac.compare_digest(expected, conf.card_mac2):
            raise Refusal(402, "the card's MAC2 is not the one the PSAM expected: the "
                               "card did not pay")
        return MD.PAID, result
    if variant == M.FIG7_CLIENT_COMPARES:
        _check_terminal(terminal_keys, row, conf, mid, txn_id)
        return MD.UNPROVEN, result
    return MD.PAID, result

def _check_terminal(terminal_keys: Mapping[bytes, Ed25519PublicKey], row: dict[str, Any],
                    conf: Any, mid: bytes, txn_id: bytes) -> None:
    """FIG. 7: the order's registered client terminal signed this confirmation."""
    terminal = bytes.fromhex(row["client_terminal"] or "00" * 8)
    if conf.terminal_id != terminal:
        raise Refusal(403, "a FIG. 7 confirmation must come from the client terminal "
                           "named at checkout")
    key = terminal_keys.get(terminal)
    if key is None:
        raise Refusal(403, f"client terminal {terminal.hex().upper()} is no longer "
                           "registered with this merchant")
    if not conf.signature:
        raise Refusal(403, "a FIG. 7 confirmation must be signed by the client terminal")
    try:
        key.verify(conf.signature, M.fig7_signed_data(mid, txn_id, conf.result_m,
                                                      conf.card_mac2, conf.tac))
    except InvalidSignature:
        raise Refusal(403, "the client terminal's signature does not verify") from None

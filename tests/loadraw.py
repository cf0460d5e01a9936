"""One load, step by step, for tests that send what a client (honest or not) would: every
message is built and posted by hand, so a test can change, keep, replay or reorder any of them.
"""

from __future__ import annotations

from typing import Any

import httpx

from svcard.host.load import client as LC
from svcard.host.load.stack import LoadStack
from svcard.host.terminal import apdus
from svcard.host.terminal.purse import call, select_purse
from svcard.protocols import loadmsg as L
from svcard.protocols import messages as M
from svcard.protocols import purse as P
from svcard.protocols import secure
from svcard.reader import Reader

SECRET = "s3cret"


class Raw:
    """One bank order and its load, driven one message at a time."""

    def __init__(self, stack: LoadStack, reader: Reader, http: httpx.Client,
                 amount: int = 5_000, account: str = "alice", secret: str = SECRET) -> None:
        self.reader, self.http, self.amount = reader, http, amount
        self.shared_key = stack.shared_key
        self.params, _ = LC.start_load(http, stack.bank_url, reader, account=account,
                                       secret=secret, amount=amount)
        self.s = LC._LoadSession(self.params)
        self.info = select_purse(reader)

    @property
    def txn_hex(self) -> str:
        return self.s.txn_id.hex()

    # --- the card ---------------------------------------------------------------------------
    def init(self, amount: int | None = None) -> Any:
        """INITIALIZE FOR LOAD (this order's amount, or ``amount``): the card's S1 and state."""
        self.reader.exchange(apdus.select(P.DEFAULT_IEP_AID))
        return P.InitForLoadAnswer.parse(call(self.reader, apdus.initialize(
            P.INIT_LOAD, P.PURSE_EP, 1, self.amount if amount is None else amount,
            self.s.terminal_id), "INITIALIZE FOR LOAD"))

    def credit(self, command: Any, s2: bytes | None = None) -> Any:
        """CREDIT FOR LOAD with a load (or probe) command's S2: the card's raw answer."""
        return self.reader.exchange(apdus.credit_for_load(command.date, command.time,
                                                          s2 or command.s2))

    # --- the load server ----------------------------------------------------------------------
    def request(self, init: Any, **changes: Any) -> bytes:
        return M.build(L.LoadRequest, {
            "issuer_id": bytes.fromhex(self.info.issuer_id),
            "card_serial": self.info.serial_bytes,
            "expiry_date": bytes.fromhex(self.info.expiry_date),
            "currency_code": self.info.currency_code, "amount": self.amount,
            "txn_type": P.TYPE_EP_LOAD, "algorithm_id": init.algorithm_id,
            "key_version": init.key_version, "online_counter": init.online_counter,
            "balance": init.balance, "random": init.random, "s1": init.mac1,
            "bank_time": int(self.params["bank_time"]), **changes})

    def send_request(self, body: bytes) -> Any:
        return M.parse(L.LoadCommand, self.s.post(self.http, "/v1/load/request",
                                                  L.LOAD_REQUEST, body), "load command")

    def result_body(self, result: int, s3: bytes = bytes(4), zero: Any = None,
                    **changes: Any) -> bytes:
        return M.build(L.LoadResult, {
            "result": result, "card_sw": 0x9000, "s3": s3,
            "online_counter": zero.online_counter if zero else 0,
            "balance": zero.balance if zero else 0,
            "random": zero.random if zero else bytes(4), "s1": zero.mac1 if zero else bytes(4),
            **changes})

    def post_result(self, body: bytes) -> tuple[int, bytes]:
        return self.s.exchange(self.http, "/v1/load/result", L.LOAD_RESULT, body)

    def result(self, result: int, s3: bytes = bytes(4), zero: Any = None,
               **changes: Any) -> Any:
        """A result the load server decides at once (S3, or "not loaded" with no S2 issued)."""
        msg_type, body = self.post_result(self.result_body(result, s3, zero, **changes))
        assert msg_type == L.LOAD_ANSWER, f"expected a decision, got message type {msg_type}"
        return M.parse(L.LoadAnswer, body, "load answer")

    def probe(self, zero: Any, **changes: Any) -> Any:
        """"Not loaded" with a zero-value S1: the load server's probe command (S2 for 0)."""
        msg_type, body = self.post_result(self.result_body(L.RESULT_NOT_LOADED, zero=zero,
                                                           **changes))
        assert msg_type == L.LOAD_PROBE, f"expected a probe, got message type {msg_type}"
        command = M.parse(L.LoadCommand, body, "probe command")
        assert command.amount == 0
        return command

    def probe_result_body(self, s3: bytes, card_sw: int = 0x9000) -> bytes:
        return M.build(L.LoadProbeResult, {"card_sw": card_sw, "s3": s3})

    def post_probe_result(self, body: bytes) -> Any:
        return M.parse(L.LoadAnswer, self.s.post(self.http, "/v1/load/probe",
                                                 L.LOAD_PROBE_RESULT, body), "load answer")

    def probe_result(self, s3: bytes, card_sw: int = 0x9000) -> Any:
        return self.post_probe_result(self.probe_result_body(s3, card_sw))

    def not_loaded(self) -> Any:
        """The honest negative result: a zero-value probe load, done for real on the card."""
        command = self.probe(self.init(0))
        answer = self.credit(command)
        assert answer.ok, f"the card refused the probe: {answer.sw:04X}"
        return self.probe_result(answer.data)

    # --- the bank -----------------------------------------------------------------------------
    def to_bank(self, confirmation: bytes, txn_id: bytes | None = None) -> httpx.Response:
        return self.http.post(self.params["status_url"], content=M.build(
            L.BankConfirmation, {"version": 1, "txn_id": txn_id or self.s.txn_id,
                                 "confirmation": confirmation}))

    def confirmation(self, answer: Any) -> Any:
        return M.parse(L.LoadConfirmation, secure.open_sealed(
            secure.derive_key(self.shared_key, self.s.bank_id, self.s.txn_id),
            answer.confirmation, L.confirmation_aad(self.s.bank_id, self.s.txn_id), "c"), "c")


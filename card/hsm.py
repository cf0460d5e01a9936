"""The load HSM, in software, as a card application (so the host reaches it through a reader).

It holds each issuer's load master keys (by key version) and TAC master key, and diversifies
card keys from them exactly as the purse was personalised. Commands (svcard's own, CLA 80):

* ``80 E2 00 00 32`` AUTHORIZE LOAD: verify the card's S1 (load MAC1) and answer S2 (MAC2);
  ``80 E2 01 00`` only verifies S1 (9000 or 9302) and answers nothing;
* ``80 E6 00 00 2C`` VERIFY LOAD TAC: verify the card's S3 (load TAC): 9000 or 9302;
* ``80 E8 P1 00 33`` UNLOAD and ``80 EA P1 00 34`` OVERDRAFT-LIMIT UPDATE (ED): P1 00 verifies
  the card's MAC1 and answers MAC2; P1 01 verifies the card's proof (unload MAC3, update TAC).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..protocols import crypto
from ..protocols import mac_schemes as M
from ..protocols import purse as P
from ..protocols import sw as SW
from ..protocols.apdu import CommandAPDU
from .keys import DEFAULT_SCHEME, IssuerScheme
from .runtime import Application, CardError


@dataclass(frozen=True, slots=True)
class IssuerLoadKeys:
    issuer_id: bytes
    load_keys: dict[int, tuple[int, bytes]]  # key version -> (algorithm, master key)
    tac_key: bytes
    two_level: bool = False
    # unload (MULK) and overdraft-limit update (MUK) master keys: version -> (algorithm, key)
    unload_keys: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    update_keys: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    scheme: IssuerScheme = DEFAULT_SCHEME   # algorithm ids and MAC-scheme profile

    def __repr__(self) -> str:
        return f"IssuerLoadKeys(issuer={self.issuer_id.hex()}, versions={sorted(self.load_keys)})"

    def to_json(self) -> dict[str, Any]:
        return {
            "issuer_id": self.issuer_id.hex().upper(),
            "load_keys": [{"version": v, "algorithm": a, "key": k.hex().upper()}
                          for v, (a, k) in sorted(self.load_keys.items())],
            "tac_key": self.tac_key.hex().upper(),
            "two_level": self.two_level,
            "unload_keys": _keys_to_json(self.unload_keys),
            "update_keys": _keys_to_json(self.update_keys),
            "scheme": self.scheme.to_json(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IssuerLoadKeys:
        keys = {int(k["version"]): (int(k.get("algorithm", 0)), bytes.fromhex(k["key"]))
                for k in d["load_keys"]}
        return cls(bytes.fromhex(d["issuer_id"]), keys, bytes.fromhex(d["tac_key"]),
                   bool(d.get("two_level", False)),
                   _keys_from_json(d.get("unload_keys")), _keys_from_json(d.get("update_keys")),
                   scheme=IssuerScheme.from_json(d.get("scheme")))


def _keys_to_json(keys: dict[int, tuple[int, bytes]]) -> list[dict[str, Any]]:
    return [{"version": v, "algorithm": a, "key": k.hex().upper()}
            for v, (a, k) in sorted(keys.items())]


def _keys_from_json(items: list[dict[str, Any]] | None) -> dict[int, tuple[int, bytes]]:
    """Master keys by version; images written before unload / update keys have none."""
    return {int(k["version"]): (int(k.get("algorithm", 0)), bytes.fromhex(k["key"]))
            for k in items or []}


@dataclass(slots=True)
class HsmState:
    aid: bytes
    issuers: dict[bytes, IssuerLoadKeys]
    label: str = "SVCARD LOAD HSM"

    def __repr__(self) -> str:
        return f"HsmState(issuers={[i.hex() for i in self.issuers]})"

    def to_json(self) -> dict[str, Any]:
        return {"aid": self.aid.hex().upper(), "label": self.label,
                "issuers": [i.to_json() for i in self.issuers.values()]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HsmState:
        issuers = [IssuerLoadKeys.from_json(i) for i in d["issuers"]]
        return cls(bytes.fromhex(d["aid"]), {i.issuer_id: i for i in issuers},
                   str(d.get("label", "SVCARD LOAD HSM")))


class LoadHsm(Application):
    def __init__(self, state: HsmState, persist: Callable[[], None] | None = None) -> None:
        self.state = state
        self.aid = state.aid
        self.persist: Callable[[], None] = persist or (lambda: None)

    def fci(self) -> bytes:
        return P.Fci(self.state.aid, self.state.label).build()

    def to_state(self) -> dict[str, Any]:
        return self.state.to_json()

    def process(self, cmd: CommandAPDU) -> bytes:
        if cmd.ins == P.INS_HSM_AUTHORIZE_LOAD:
            handler = self._authorize_load
        elif cmd.ins == P.INS_HSM_VERIFY_LOAD_TAC:
            handler = self._verify_load_tac
        elif cmd.ins == P.INS_HSM_UNLOAD:
            handler = self._unload
        elif cmd.ins == P.INS_HSM_UPDATE:
            handler = self._update
        else:
            raise CardError(SW.INS_NOT_SUPPORTED)
        if cmd.cla != P.CLA_PBOC:
            raise CardError(SW.CLA_NOT_SUPPORTED)
        return handler(cmd)

    def _issuer(self, issuer_id: bytes) -> IssuerLoadKeys:
        issuer = self.state.issuers.get(issuer_id)
        if issuer is None:
            raise CardError(SW.KEY_INDEX_NOT_SUPPORTED)
        return issuer

    def _authorize_load(self, cmd: CommandAPDU) -> bytes:
        if cmd.p1 not in (0, 1) or cmd.p2:
            raise CardError(SW.WRONG_P1P2)
        if len(cmd.data) != P.HsmAuthorizeLoadData.sizeof():
            raise CardError(SW.WRONG_LENGTH)
        req = P.HsmAuthorizeLoadData.parse(cmd.data)
        if req.txn_type not in (P.TYPE_EP_LOAD, P.TYPE_ED_LOAD):
            raise CardError(SW.INCORRECT_DATA)
        issuer = self._issuer(req.issuer_id)
        entry = issuer.load_keys.get(req.key_version)
        if entry is None or not issuer.scheme.accepts(entry[0], req.algorithm_id):
            raise CardError(SW.KEY_INDEX_NOT_SUPPORTED)
        dlk = crypto.card_key(entry[1], req.card_serial,
                              issuer.issuer_id if issuer.two_level else None)
        scheme = M.scheme(issuer.scheme.mac_scheme)
        sk = M.load_session_key(scheme, dlk, req.random, req.online_counter)
        s1 = M.load_mac1(scheme, sk, req.balance, req.amount, req.txn_type, req.terminal_id)
        if not hmac.compare_digest(s1, req.s1):
            raise CardError(SW.MAC_INVALID)
        if cmd.p1 == 1:
            return b""
        if not (P.valid_date(req.date) and P.valid_time(req.time)):
            raise CardError(SW.INCORRECT_DATA)
        return M.load_mac2(scheme, sk, req.amount, req.txn_type, req.terminal_id, req.date,
                           req.time)

    def _verify_load_tac(self, cmd: CommandAPDU) -> bytes:
        if cmd.p1 or cmd.p2:
            raise CardError(SW.WRONG_P1P2)
        if len(cmd.data) != P.HsmVerifyLoadTacData.sizeof():
            raise CardError(SW.WRONG_LENGTH)
        req = P.HsmVerifyLoadTacData.parse(cmd.data)
        issuer = self._issuer(req.issuer_id)
        dtk = crypto.card_key(issuer.tac_key, req.card_serial,
                              issuer.issuer_id if issuer.two_level else None)
        expected = crypto.tac(dtk, crypto.load_tac_input(
            req.balance_after, req.online_counter, req.amount, req.txn_type, req.terminal_id,
            req.date, req.time))
        if not hmac.compare_digest(expected, req.s3):
            raise CardError(SW.MAC_INVALID)
        return b""

    # --- unload (80 E8) and overdraft-limit update (80 EA): P1 00 checks the card's MAC1 and
    # answers MAC2; P1 01 checks the card's proof (unload MAC3, update TAC) in the last field
    def _session_key(self, cmd: CommandAPDU, layout: P.Layout, kind: str) -> tuple[Any, bytes]:
        if cmd.p1 not in (0, 1) or cmd.p2:
            raise CardError(SW.WRONG_P1P2)
        if len(cmd.data) != layout.sizeof():
            raise CardError(SW.WRONG_LENGTH)
        req = layout.parse(cmd.data)
        issuer = self._issuer(req.issuer_id)
        entry = getattr(issuer, kind).get(req.key_version)
        if entry is None or not issuer.scheme.accepts(entry[0], req.algorithm_id):
            raise CardError(SW.KEY_INDEX_NOT_SUPPORTED)
        if not (P.valid_date(req.date) and P.valid_time(req.time)):
            raise CardError(SW.INCORRECT_DATA)
        key = crypto.card_key(entry[1], req.card_serial,
                              issuer.issuer_id if issuer.two_level else None)
        return req, crypto.load_session_key(key, req.random, req.online_counter)

    @staticmethod
    def _check(expected: bytes, given: bytes) -> None:
        if not hmac.compare_digest(expected, given):
            raise CardError(SW.MAC_INVALID)

    def _unload(self, cmd: CommandAPDU) -> bytes:
        req, sk = self._session_key(cmd, P.HsmUnloadData, "unload_keys")
        if cmd.p1 == 1:
            if req.amount > req.balance:
                raise CardError(SW.INCORRECT_DATA)
            self._check(crypto.mac(sk, crypto.unload_mac3_input(
                req.balance - req.amount, req.online_counter, req.amount, P.TYPE_UNLOAD,
                req.terminal_id, req.date, req.time)), req.mac)
            return b""
        self._check(crypto.mac(sk, crypto.unload_mac1_input(
            req.balance, req.amount, P.TYPE_UNLOAD, req.terminal_id)), req.mac)
        return crypto.mac(sk, crypto.unload_mac2_input(req.amount, P.TYPE_UNLOAD,
                                                       req.terminal_id, req.date, req.time))

    def _update(self, cmd: CommandAPDU) -> bytes:
        req, sk = self._session_key(cmd, P.HsmUpdateData, "update_keys")
        kind = P.TYPE_OVERDRAFT_UPDATE
        if cmd.p1 == 1:
            after = req.balance + req.new_limit - req.old_limit
            if after < 0:
                raise CardError(SW.INCORRECT_DATA)
            issuer = self._issuer(req.issuer_id)
            dtk = crypto.card_key(issuer.tac_key, req.card_serial,
                                  issuer.issuer_id if issuer.two_level else None)
            self._check(crypto.tac(dtk, crypto.update_tac_input(
                after, req.online_counter, req.new_limit, kind, req.terminal_id, req.date,
                req.time)), req.mac)
            return b""
        self._check(crypto.mac(sk, crypto.update_mac1_input(
            req.balance, req.old_limit, kind, req.terminal_id)), req.mac)
        return crypto.mac(sk, crypto.update_mac2_input(req.new_limit, kind, req.terminal_id,
                                                       req.date, req.time))

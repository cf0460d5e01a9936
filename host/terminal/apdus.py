"""Command APDUs the host sends, built in one place from the layouts in ``protocols``."""

from __future__ import annotations

from ...card.iep_commands import capp_purchase as CAPP
from ...card.iep_commands import secure_write as SM
from ...protocols import goods as G
from ...protocols import purse as P
from ...protocols.apdu import build_command


def select(aid: bytes) -> bytes:
    return build_command(P.CLA_ISO, P.INS_SELECT, 0x04, 0x00, aid, 256)


def read_binary(sfi: int, length: int = 256, offset: int = 0) -> bytes:
    return build_command(P.CLA_ISO, P.INS_READ_BINARY, 0x80 | sfi, offset, b"", length)


def read_record(number: int, sfi: int = P.SFI_LOG) -> bytes:
    return build_command(P.CLA_ISO, P.INS_READ_RECORD, number, (sfi << 3) | 4, b"",
                         P.LOG_RECORD_SIZE)


def verify_pin(pin: str) -> bytes:
    text = pin + ("F" if len(pin) % 2 else "")
    return build_command(P.CLA_ISO, P.INS_VERIFY, 0, 0, bytes.fromhex(text))


def get_balance(purse: int) -> bytes:
    return build_command(P.CLA_PBOC, P.INS_GET_BALANCE, 0, purse, b"", 4)


def initialize(kind: int, purse: int, key_index: int, amount: int, terminal_id: bytes) -> bytes:
    data = P.InitializeData.build({"key_index": key_index, "amount": amount,
                                   "terminal_id": terminal_id})
    le = 16 if kind in (P.INIT_LOAD, P.INIT_UNLOAD) else 15   # the online ones add MAC1
    return build_command(P.CLA_PBOC, P.INS_INITIALIZE, kind, purse, data, le)


def initialize_for_update(key_index: int, terminal_id: bytes) -> bytes:
    """INITIALIZE FOR UPDATE (the ED's overdraft limit): no amount in its data."""
    data = P.InitForUpdateData.build({"key_index": key_index, "terminal_id": terminal_id})
    return build_command(P.CLA_PBOC, P.INS_INITIALIZE, P.INIT_UPDATE, P.PURSE_ED, data, 19)


def debit_for_unload(date: bytes, time: bytes, mac2: bytes) -> bytes:
    data = P.DebitForUnloadData.build({"date": date, "time": time, "mac2": mac2})
    return build_command(P.CLA_PBOC, P.INS_DEBIT, P.DEBIT_FOR_UNLOAD, 0, data, 4)


def update_overdraft_limit(new_limit: int, date: bytes, time: bytes, mac2: bytes) -> bytes:
    data = P.UpdateOverdraftData.build({"new_limit": new_limit, "date": date, "time": time,
                                        "mac2": mac2})
    return build_command(P.CLA_PBOC, P.INS_UPDATE_OVERDRAFT_LIMIT, 0, 0, data, 4)


def credit_for_load(date: bytes, time: bytes, mac2: bytes) -> bytes:
    data = P.CreditForLoadData.build({"date": date, "time": time, "mac2": mac2})
    return build_command(P.CLA_PBOC, P.INS_CREDIT_FOR_LOAD, 0, 0, data, 4)


def debit_for_purchase(ttn: int, date: bytes, time: bytes, mac1: bytes) -> bytes:
    data = P.DebitForPurchaseData.build({"terminal_txn_number": ttn, "date": date, "time": time,
                                         "mac1": mac1})
    return build_command(P.CLA_PBOC, P.INS_DEBIT, 0x01, 0x00, data, 8)


def update_capp_data_cache(sfi: int, p1: int, record: bytes, mode: int = G.MODE_RECORD
                           ) -> bytes:
    """UPDATE CAPP DATA CACHE ``80 DC P1 P2``: one goods record cached for the CAPP session's
    DEBIT; P2 = SFI << 3 | mode, P1 a record number (``MODE_RECORD``) or the record's tag
    (``MODE_TAG``)."""
    return build_command(P.CLA_PBOC, G.INS_UPDATE_CAPP_DATA_CACHE, p1, (sfi << 3) | mode,
                         record)


def update_capp_data_cache_sm(sfi: int, p1: int, record: bytes, mac: bytes,
                              mode: int = G.MODE_RECORD) -> bytes:
    """UPDATE CAPP DATA CACHE with secure messaging ``84 DE P1 P2``: P1/P2 as for ``80 DC``,
    the record followed by its 4-byte MAC under the card's goods key, chained from the CAPP
    session's random and counter (host/terminal/goods_key.py computes it)."""
    return build_command(CAPP.CLA_SM_CAPP, CAPP.INS_UPDATE_CAPP_DATA_CACHE_SM, p1,
                         (sfi << 3) | mode, record + mac)


def read_goods_record(number: int, sfi: int) -> bytes:
    """READ RECORD of goods file ``sfi`` (Le: one goods record)."""
    return build_command(P.CLA_ISO, P.INS_READ_RECORD, number, (sfi << 3) | 4, b"",
                         G.RECORD_SIZE)


def get_transaction_prove(txn_type: int, counter: int) -> bytes:
    return build_command(P.CLA_PBOC, P.INS_GET_TRANSACTION_PROVE, 0, txn_type,
                         counter.to_bytes(2, "big"), 8)


def get_challenge(size: int = 4) -> bytes:
    """GET CHALLENGE ``00 84 00 00 Le``: the card's random (4 or 8 bytes) for the next
    secure-messaging command."""
    return build_command(P.CLA_ISO, SM.INS_GET_CHALLENGE, 0, 0, b"", size)


def secure_record_write(ins: int, p1: int, p2: int, record: bytes, mac: bytes) -> bytes:
    """UPDATE RECORD (``04 DC``) or APPEND RECORD (``04 E2``) with secure messaging: the
    record followed by its 4-byte MAC (host/terminal/goods_key.py computes it)."""
    return build_command(SM.CLA_SM, ins, p1, p2, record + mac)


def get_uid() -> bytes:
    """GET DATA ``80 CA 00 00 09``: the card's UID (cards of a UID-in-MAC1 MAC scheme)."""
    return build_command(P.CLA_PBOC, P.INS_GET_DATA, 0, 0, b"", 9)


def init_sam_for_purchase(fields: dict[str, object], *, early: bool = False,
                          issuer_id: bytes | None = None, uid: bytes = b"") -> bytes:
    """INIT SAM FOR PURCHASE; ``uid``, the card's UID when it has one, follows the data."""
    if issuer_id is None:
        data = P.InitSamForPurchaseData.build(fields)
    else:
        data = P.InitSamForPurchaseData24.build({**fields, "issuer_id": issuer_id})
    data += uid
    return build_command(P.CLA_PBOC, P.INS_INIT_SAM_FOR_PURCHASE, 0x01 if early else 0x00, 0,
                         data, 12 if early else 8)


def credit_sam_for_purchase(mac2: bytes, tac: bytes | None = None) -> bytes:
    return build_command(P.CLA_PBOC, P.INS_CREDIT_SAM_FOR_PURCHASE, 0, 0,
                         mac2 + (tac or b""))


def hsm_authorize_load(fields: dict[str, object], *, verify_only: bool = False) -> bytes:
    return build_command(P.CLA_PBOC, P.INS_HSM_AUTHORIZE_LOAD, 1 if verify_only else 0, 0,
                         P.HsmAuthorizeLoadData.build(fields), None if verify_only else 4)


def hsm_unload(fields: dict[str, object], *, verify: bool = False) -> bytes:
    """The HSM's unload command: P1 00 checks MAC1 and answers MAC2, P1 01 checks MAC3."""
    return build_command(P.CLA_PBOC, P.INS_HSM_UNLOAD, 1 if verify else 0, 0,
                         P.HsmUnloadData.build(fields), None if verify else 4)


def hsm_update(fields: dict[str, object], *, verify: bool = False) -> bytes:
    """The HSM's overdraft-update command: P1 00 checks MAC1 and answers MAC2, P1 01 checks
    the card's TAC."""
    return build_command(P.CLA_PBOC, P.INS_HSM_UPDATE, 1 if verify else 0, 0,
                         P.HsmUpdateData.build(fields), None if verify else 4)


def hsm_verify_load_tac(fields: dict[str, object]) -> bytes:
    return build_command(P.CLA_PBOC, P.INS_HSM_VERIFY_LOAD_TAC, 0, 0,
                         P.HsmVerifyLoadTacData.build(fields))


def get_data(tag: int) -> bytes:
    return build_command(P.CLA_PBOC, P.INS_GET_DATA, tag >> 8, tag & 0xFF, b"", 256)


def read_batch_record(batch: int, index: int) -> bytes:
    return build_command(P.CLA_PBOC, P.INS_SAM_READ_BATCH_RECORD, 0, 0,
                         P.ReadBatchRecordData.build({"batch": batch, "index": index}),
                         P.PSAM_RECORD_SIZE)


def sam_previous_signature() -> bytes:
    return build_command(P.CLA_PBOC, P.INS_SAM_PREVIOUS_SIGNATURE, 0, 0, b"", 256)


def sam_close_batch() -> bytes:
    return build_command(P.CLA_PBOC, P.INS_SAM_CLOSE_BATCH, 0, 0, b"", 256)

"""Name and decode purse, PSAM and HSM APDUs for people (``svcard trace show``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import purse as P
from . import sw as SW
from .apdu import APDUFormatError, CommandAPDU, parse_command


@dataclass
class Decoded:
    name: str
    fields: dict[str, Any] = field(default_factory=dict)
    answer: dict[str, Any] = field(default_factory=dict)
    sw: int | None = None
    meaning: str = ""
    records: list[dict[str, Any]] = field(default_factory=list)


def _show(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex().upper()
    return value


def _fields(layout: P.Layout, data: bytes) -> dict[str, Any]:
    if len(data) != layout.sizeof():
        return {"data": data.hex().upper()}
    parsed = layout.parse(data)
    return {name: _show(getattr(parsed, name)) for name in layout.names}


def _name(cmd: CommandAPDU) -> tuple[str, P.Layout | None, P.Layout | None]:
    """Command name, and the layouts of its data and of its answer."""
    key = (cmd.cla, cmd.ins)
    if key == (P.CLA_ISO, P.INS_SELECT):
        return "SELECT", None, None
    if key == (P.CLA_ISO, P.INS_GET_RESPONSE):
        return "GET RESPONSE", None, None
    if key == (P.CLA_ISO, P.INS_VERIFY):
        return "VERIFY PIN", None, None
    if key == (P.CLA_ISO, P.INS_READ_BINARY):
        return "READ BINARY", None, None
    if key == (P.CLA_ISO, P.INS_READ_RECORD):
        return "READ RECORD", None, None
    if key == (P.CLA_PBOC, P.INS_INITIALIZE):
        answer = P.InitForLoadAnswer if cmd.p1 == P.INIT_LOAD else P.InitForPurchaseAnswer
        what = {P.INIT_LOAD: "LOAD", P.INIT_PURCHASE: "PURCHASE",
                P.INIT_CASH_WITHDRAWAL: "CASH WITHDRAWAL"}.get(cmd.p1, f"P1={cmd.p1:02X}")
        return f"INITIALIZE FOR {what}", P.InitializeData, answer
    table: dict[int, tuple[str, P.Layout | None, P.Layout | None]] = {
        P.INS_CREDIT_FOR_LOAD: ("CREDIT FOR LOAD", P.CreditForLoadData, P.CreditForLoadAnswer),
        P.INS_DEBIT: ("DEBIT FOR PURCHASE", P.DebitForPurchaseData, P.DebitForPurchaseAnswer),
        P.INS_GET_BALANCE: ("GET BALANCE", None, P.Balance),
        P.INS_GET_TRANSACTION_PROVE: ("GET TRANSACTION PROVE", None, P.TransactionProveAnswer),
        P.INS_CHANGE_PIN: ("CHANGE PIN", None, None),
        P.INS_CREDIT_SAM_FOR_PURCHASE: ("CREDIT SAM FOR PURCHASE", None, None),
        P.INS_SAM_BLOCKED_LIST: ("PSAM BLOCKED LIST", P.BlockedListData, None),
        P.INS_SAM_PREVIOUS_SIGNATURE: ("PSAM PREVIOUS SIGNATURE", None, P.PreviousSignature),
        P.INS_SAM_GET_TOTALS: ("PSAM TOTALS", None, None),
        P.INS_SAM_READ_BATCH_RECORD: ("PSAM READ BATCH RECORD", P.ReadBatchRecordData,
                                      P.PsamRecord),
        P.INS_SAM_CLOSE_BATCH: ("PSAM CLOSE BATCH", None, P.BatchCloseAnswer),
        P.INS_HSM_AUTHORIZE_LOAD: ("HSM AUTHORIZE LOAD", P.HsmAuthorizeLoadData,
                                   P.HsmAuthorizeLoadAnswer),
        P.INS_HSM_VERIFY_LOAD_TAC: ("HSM VERIFY LOAD TAC", P.HsmVerifyLoadTacData, None),
    }
    if cmd.cla == P.CLA_PBOC and cmd.ins == P.INS_INIT_SAM_FOR_PURCHASE:
        data = P.InitSamForPurchaseData24 if len(cmd.data) == 0x24 else P.InitSamForPurchaseData
        answer = P.InitSamAnswerEarly if cmd.p1 == 1 else P.InitSamAnswer
        return "INIT SAM FOR PURCHASE", data, answer
    if cmd.cla == P.CLA_PBOC and cmd.ins in table:
        return table[cmd.ins]
    return f"{cmd.cla:02X} {cmd.ins:02X}", None, None


def decode(command: bytes, response: bytes) -> Decoded:
    """What a command is, its fields, the status word's meaning and the answer's fields."""
    try:
        cmd = parse_command(command)
    except APDUFormatError as exc:
        return Decoded(f"malformed command ({exc})")
    name, data_layout, answer_layout = _name(cmd)
    out = Decoded(name)
    out.fields["P1P2"] = f"{cmd.p1:02X}{cmd.p2:02X}"
    if name == "SELECT":
        out.fields["aid"] = cmd.data.hex().upper()
    elif name in ("GET BALANCE",) or name.startswith("INITIALIZE"):
        out.fields["purse"] = {P.PURSE_ED: "ED", P.PURSE_EP: "EP"}.get(cmd.p2, f"{cmd.p2:02X}")
    if name == "GET TRANSACTION PROVE":
        out.fields["txn_type"] = P.TYPE_NAMES.get(cmd.p2, f"{cmd.p2:02X}")
        out.fields["counter"] = int.from_bytes(cmd.data, "big")
    if name == "VERIFY PIN":
        out.fields["pin"] = "(hidden)" if cmd.data else "(ask for tries left)"
    if name == "READ BINARY" and cmd.p1 & 0x80:
        out.fields["sfi"] = f"{cmd.p1 & 0x1F:02X}"
    if name == "READ RECORD":
        out.fields["record"] = cmd.p1
        out.fields["sfi"] = f"{cmd.p2 >> 3:02X}"
    if data_layout is not None and cmd.data:
        out.fields.update(_fields(data_layout, cmd.data))
    elif cmd.data and name not in ("SELECT", "VERIFY PIN", "GET TRANSACTION PROVE"):
        out.fields["data"] = cmd.data.hex().upper()
    if len(response) < 2:
        return out
    data, out.sw = response[:-2], int.from_bytes(response[-2:], "big")
    out.meaning = SW.meaning(out.sw)
    if not data:
        return out
    if name == "SELECT":
        try:
            fci = P.Fci.parse(data)
            out.answer = {"df_name": fci.df_name.hex().upper(), "label": fci.label,
                          "currency_code": fci.currency_code,
                          "currency_exponent": fci.currency_exponent}
        except ValueError:
            out.answer = {"data": data.hex().upper()}
    elif name == "READ RECORD" and cmd.p2 >> 3 == P.SFI_LOG and len(data) == P.LOG_RECORD_SIZE:
        rec = _fields(P.LogRecord, data)
        rec["type_name"] = P.TYPE_NAMES.get(rec["txn_type"], "?")
        out.records.append(rec)
    elif name == "READ BINARY" and cmd.p1 == 0x80 | P.SFI_PUBLIC_DATA and len(data) == 30:
        out.answer = _fields(P.PublicAppData, data)
    elif answer_layout is not None:
        out.answer = _fields(answer_layout, data)
    else:
        out.answer = {"data": data.hex().upper()}
    return out


def render(d: Decoded) -> str:
    parts = [d.name]
    if d.fields:
        parts.append(" ".join(f"{k}={v}" for k, v in d.fields.items()))
    line = "  ".join(parts)
    if d.sw is not None:
        line += f"\n    -> {d.sw:04X} {d.meaning}"
    if d.answer:
        line += "\n       " + " ".join(f"{k}={v}" for k, v in d.answer.items())
    for rec in d.records:
        line += (f"\n       log: {rec['type_name']} amount={rec['amount']} "
                 f"counter={rec['counter']} terminal={rec['terminal_id']} "
                 f"{rec['date']} {rec['time']}")
    return line

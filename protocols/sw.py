"""ISO 7816-4 and PBOC ED/EP status words, with their meanings."""

from __future__ import annotations

OK = 0x9000
INSUFFICIENT_FUNDS = 0x9401
COUNTER_AT_MAXIMUM = 0x9402
KEY_INDEX_NOT_SUPPORTED = 0x9403
NO_SUCH_PROOF = 0x9406
MAC_INVALID = 0x9302
APPLICATION_LOCKED = 0x9303
WARNING_END_OF_FILE = 0x6282
WRONG_LENGTH = 0x6700
SECURITY_STATUS = 0x6982
PIN_BLOCKED = 0x6983
CONDITIONS_NOT_SATISFIED = 0x6985
SM_DATA_INCORRECT = 0x6988   # a secure-messaging MAC that does not verify (goods writes)
INCORRECT_DATA = 0x6A80
FUNCTION_NOT_SUPPORTED = 0x6A81
FILE_NOT_FOUND = 0x6A82
RECORD_NOT_FOUND = 0x6A83
WRONG_P1P2 = 0x6A86
DATA_NOT_FOUND = 0x6A88
WRONG_OFFSET = 0x6B00
INS_NOT_SUPPORTED = 0x6D00
CLA_NOT_SUPPORTED = 0x6E00
NO_PRECISE_DIAGNOSIS = 0x6F00

MEANINGS: dict[int, str] = {
    OK: "success",
    INSUFFICIENT_FUNDS: "insufficient funds",
    COUNTER_AT_MAXIMUM: "transaction counter at its maximum",
    KEY_INDEX_NOT_SUPPORTED: "key index not supported",
    NO_SUCH_PROOF: "no proof: that transaction did not happen",
    MAC_INVALID: "MAC invalid",
    APPLICATION_LOCKED: "application permanently locked",
    WARNING_END_OF_FILE: "end of file reached before Le bytes",
    WRONG_LENGTH: "wrong length",
    SECURITY_STATUS: "security status not satisfied",
    PIN_BLOCKED: "authentication method blocked",
    CONDITIONS_NOT_SATISFIED: "conditions of use not satisfied",
    SM_DATA_INCORRECT: "incorrect secure messaging data objects (MAC)",
    INCORRECT_DATA: "incorrect parameters in the data field",
    FUNCTION_NOT_SUPPORTED: "function not supported",
    FILE_NOT_FOUND: "file or application not found",
    RECORD_NOT_FOUND: "record not found",
    WRONG_P1P2: "incorrect P1-P2",
    DATA_NOT_FOUND: "referenced data not found",
    WRONG_OFFSET: "wrong parameters (offset outside the file)",
    INS_NOT_SUPPORTED: "instruction not supported",
    CLA_NOT_SUPPORTED: "class not supported",
    NO_PRECISE_DIAGNOSIS: "no precise diagnosis",
}


def meaning(sw: int) -> str:
    """A human reading of a status word, including the 61xx/6Cxx/63Cx families."""
    if sw in MEANINGS:
        return MEANINGS[sw]
    sw1, sw2 = sw >> 8, sw & 0xFF
    if sw1 == 0x61:
        return f"{sw2 or 256} more bytes available (GET RESPONSE)"
    if sw1 == 0x6C:
        return f"wrong Le: {sw2 or 256} bytes available"
    if sw1 == 0x63 and sw2 & 0xF0 == 0xC0:
        return f"verification failed, {sw2 & 0x0F} tries left"
    return "unknown status word"


def is_valid(sw: int) -> bool:
    """True for a status word a card may send (SW1 in 61..6F or 90..9F)."""
    sw1 = sw >> 8
    return 0x61 <= sw1 <= 0x6F or 0x90 <= sw1 <= 0x9F

"""svcard's IEP purse as a Java Card 2.2.2 applet: building it, and what a card needs to hold one.

The applet's Java source is in ``card/javacard/src/org/svcard/iep/`` (see docs/javacard.md). It
follows :mod:`svcard.card.iep` command for command (unload and the overdraft-limit update
included) in the ``pboc`` and ``changsha-metro`` MAC-scheme profiles, with either log counter.

- :func:`build_applet` compiles it with the JDK's ``javac`` against a jar that carries the
  ``javacard.*`` API (jCardSim's jar does), for Java 8 class files;
- :func:`install_params` is what a GlobalPlatform INSTALL gives the applet (tag C9): the number
  of purchase, load, unload and update key slots it allocates;
- :func:`personalisation_apdus` is everything an IEP image holds, as the applet's proprietary
  personalisation commands (``80 F0``, then ``80 FE`` END PERSONALISATION), a SELECT first.

Those APDUs carry key bytes: they are for the personalisation machine (or jCardSim) only and are
never logged or shown here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ..protocols import mac_schemes
from ..protocols import purse as P
from .iep import IepState, Purse
from .iep_commands.pin import encode_pin
from .iep_commands.records import LOG_COUNTER_AFTER, LOG_COUNTER_BEFORE
from .keys import KeyEntry

APPLET_CLASS = "org.svcard.iep.IepApplet"
SOURCE_DIR = Path(__file__).parent / "javacard" / "src"
JAVA_PACKAGE = "org/svcard/iep"

CLA = 0x80
INS_PUT = 0xF0             # PUT PERSONALISATION DATA, P1 = the item
INS_END = 0xFE             # END PERSONALISATION
END_PERSONALISATION = bytes((CLA, INS_END, 0x00, 0x00))

# P1 of PUT PERSONALISATION DATA
ITEM_LABEL = 0x01
ITEM_CURRENCY = 0x02
ITEM_PUBLIC_DATA = 0x03
ITEM_HOLDER_DATA = 0x04
ITEM_BALANCE_LIMIT = 0x05
ITEM_PURCHASE_KEY = 0x06
ITEM_LOAD_KEY = 0x07
ITEM_TAC_KEY = 0x08
ITEM_PIN = 0x09
ITEM_MAC_FAILURE_LIMIT = 0x0A
ITEM_PURSE = 0x0B
ITEM_FIXED_RANDOM = 0x0C
ITEM_LOG_RECORD = 0x0D
ITEM_PROOF = 0x0E
ITEM_UID = 0x0F
ITEM_UNLOAD_KEY = 0x10
ITEM_UPDATE_KEY = 0x11
ITEM_LOG_COUNTER = 0x12
ITEM_MAC_SCHEME = 0x13

# the values of ITEM_LOG_COUNTER and ITEM_MAC_SCHEME
LOG_COUNTER_CODES = {LOG_COUNTER_BEFORE: 0x00, LOG_COUNTER_AFTER: 0x01}
MAC_SCHEME_CODES = {"pboc": 0x00, "changsha-metro": 0x01}

MAX_KEY_SLOTS = 16
LABEL_MAX = 16
JAVAC_TIMEOUT = 300


class AppletBuildError(RuntimeError):
    """javac is missing or the applet did not compile (javac's messages are kept)."""


class AppletStateError(ValueError):
    """An IEP image the applet cannot hold (the message names the field; never key bytes)."""


def java_sources() -> list[Path]:
    """The applet's ``.java`` files."""
    return sorted((SOURCE_DIR / JAVA_PACKAGE).glob("*.java"))


def build_applet(out_dir: Path, jar: str) -> Path:
    """Compile the applet against ``jar`` (its ``javacard.*`` classes stand in for the Java
    Card API) into ``out_dir`` as Java 8 class files; returns the class folder to put on the
    class path."""
    javac = shutil.which("javac")
    if javac is None:
        raise AppletBuildError("javac not found: install a JDK (8 or newer) to build the applet")
    if not Path(jar).is_file():
        raise AppletBuildError(f"{jar}: no such jar (the Java Card API to compile against)")
    sources = java_sources()
    if not sources:
        raise AppletBuildError(f"{SOURCE_DIR / JAVA_PACKAGE}: no .java files")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # -g: the local variable tables a Java Card converter reads the types of locals from
    command = [javac, "--release", "8", "-g", "-nowarn", "-encoding", "UTF-8", "-cp", jar,
               "-d", str(out), *map(str, sources)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=JAVAC_TIMEOUT,
                              check=False)
    except subprocess.TimeoutExpired:
        raise AppletBuildError(f"javac took longer than {JAVAC_TIMEOUT} s") from None
    if done.returncode != 0:
        raise AppletBuildError(f"javac failed ({done.returncode}):\n"
                               f"{(done.stderr or done.stdout).strip()}")
    return out


INSTALL_CBC_MAC = 0x01     # install flag: MACs by DES-CBC with padding by hand


def install_params(state: IepState, *, cbc_mac: bool = False) -> bytes:
    """The applet's install parameters (GP tag C9): purchase key slots 1, load key slots 1,
    flags 1, unload key slots 1, update key slots 1. ``cbc_mac`` makes the applet compute its
    MACs with DES-CBC and pad them (and finish a retail MAC) itself, as it does anyway on a
    card without ``Signature.ALG_DES_MAC8_ISO9797_M2`` or ``ALG_DES_MAC8_ISO9797_1_M2_ALG3``
    (the same bytes)."""
    _check_supported(state)
    return bytes((max(1, len(state.purchase_keys)), max(1, len(state.load_keys)),
                  INSTALL_CBC_MAC if cbc_mac else 0, len(state.unload_keys),
                  len(state.update_keys)))


def _put(item: int, data: bytes, p2: int = 0) -> bytes:
    return bytes((CLA, INS_PUT, item, p2, len(data))) + data


def _key(item: int, key: KeyEntry, failures: int) -> bytes:
    return _put(item, bytes((key.index, key.version, key.algorithm, failures)) + key.key)


def _purse(purse: Purse) -> bytes:
    return (purse.balance.to_bytes(4, "big") + purse.online_counter.to_bytes(2, "big")
            + purse.offline_counter.to_bytes(2, "big") + purse.overdraft_limit.to_bytes(3, "big"))


def personalisation_apdus(state: IepState) -> list[bytes]:
    """Everything ``state`` holds, as the applet's personalisation APDUs: SELECT (by the AID),
    then PUT PERSONALISATION DATA for each item, then END PERSONALISATION. A pending log record
    (a power cut between the two writes) goes into the log, as the Python card's recovery does.
    ``fixed_random`` (tests only: every session's card random is then that value) is sent when
    the image has one."""
    _check_supported(state)
    s = state
    out = [bytes((0x00, 0xA4, 0x04, 0x00, len(s.aid))) + s.aid]
    label = s.label.encode("ascii")
    out.append(_put(ITEM_LABEL, label))
    out.append(_put(ITEM_CURRENCY, P.bcd_currency(s.currency_code)
                    + bytes((s.currency_exponent,))))
    out.append(_put(ITEM_PUBLIC_DATA, s.public_data))
    out.append(_put(ITEM_HOLDER_DATA, s.holder_data))
    out.append(_put(ITEM_BALANCE_LIMIT, s.balance_limit.to_bytes(4, "big")))
    limit = s.mac_failure_limit
    for key in s.purchase_keys.values():
        out.append(_key(ITEM_PURCHASE_KEY, key, min(s.purchase_mac_failures.get(key.index, 0),
                                                     limit)))
    for key in s.load_keys.values():
        out.append(_key(ITEM_LOAD_KEY, key, min(s.load_mac_failures.get(key.index, 0), limit)))
    for key in s.unload_keys.values():
        out.append(_key(ITEM_UNLOAD_KEY, key, min(s.unload_mac_failures.get(key.index, 0),
                                                   limit)))
    for key in s.update_keys.values():
        out.append(_key(ITEM_UPDATE_KEY, key, min(s.update_mac_failures.get(key.index, 0),
                                                   limit)))
    out.append(_put(ITEM_TAC_KEY, s.tac_key))
    pin = encode_pin(s.pin) if s.pin is not None else b""
    out.append(_put(ITEM_PIN, bytes((s.pin_try_limit, s.pin_tries_left)) + pin))
    out.append(_put(ITEM_MAC_FAILURE_LIMIT, bytes((limit,))))
    out.append(_put(ITEM_PURSE, _purse(s.ed), P.PURSE_ED))
    out.append(_put(ITEM_PURSE, _purse(s.ep), P.PURSE_EP))
    if s.fixed_random is not None:
        out.append(_put(ITEM_FIXED_RANDOM, s.fixed_random))
    if s.uid is not None:
        out.append(_put(ITEM_UID, s.uid))
    if s.log_counter != LOG_COUNTER_BEFORE:
        out.append(_put(ITEM_LOG_COUNTER, bytes((LOG_COUNTER_CODES[s.log_counter],))))
    if s.mac_scheme != mac_schemes.DEFAULT:
        out.append(_put(ITEM_MAC_SCHEME, bytes((MAC_SCHEME_CODES[s.mac_scheme],))))
    records = list(reversed(s.log))             # oldest first: each becomes the newest
    if s.pending_log is not None:
        records.append(s.pending_log)
    for record in records[-P.LOG_RECORDS:]:
        out.append(_put(ITEM_LOG_RECORD, record))
    if s.proof is not None:
        p = s.proof
        out.append(_put(ITEM_PROOF, bytes((p.txn_type,)) + p.counter.to_bytes(2, "big")
                        + p.mac + p.tac))
    out.append(END_PERSONALISATION)
    return out


_ITEM_NAMES = {ITEM_LABEL: "label", ITEM_CURRENCY: "currency", ITEM_PUBLIC_DATA: "EF 0x15",
               ITEM_HOLDER_DATA: "EF 0x16", ITEM_BALANCE_LIMIT: "balance limit",
               ITEM_PURCHASE_KEY: "purchase key", ITEM_LOAD_KEY: "load key",
               ITEM_TAC_KEY: "TAC key", ITEM_PIN: "PIN", ITEM_MAC_FAILURE_LIMIT:
               "MAC-failure limit", ITEM_PURSE: "purse", ITEM_FIXED_RANDOM:
               "fixed random (tests only)", ITEM_LOG_RECORD: "log record",
               ITEM_PROOF: "proof", ITEM_UID: "UID", ITEM_UNLOAD_KEY: "unload key",
               ITEM_UPDATE_KEY: "update key", ITEM_LOG_COUNTER: "log counter",
               ITEM_MAC_SCHEME: "MAC scheme"}


def personalisation_script(state: IepState) -> str:
    """:func:`personalisation_apdus` as a script for the ``jcardsim:CLASS:AID:PARAMS@SCRIPT``
    reader spec (one APDU in hex a line, ``#`` comments). It holds the card's keys: keep it
    as secret as the card image."""
    lines = ["# svcard IEP applet personalisation (holds the card's keys: keep it secret)"]
    for apdu in personalisation_apdus(state):
        if apdu[:2] == bytes((CLA, INS_PUT)):
            name = _ITEM_NAMES.get(apdu[2], "item")
        else:
            name = "END PERSONALISATION" if apdu == END_PERSONALISATION else "SELECT"
        lines.append(f"{apdu.hex().upper()}  # {name}")
    return "\n".join(lines) + "\n"


def _check_supported(state: IepState) -> None:
    """Refuse what the applet does not hold (a MAC-scheme profile it does not know)."""
    s = state
    if s.mac_scheme not in MAC_SCHEME_CODES:
        raise AppletStateError(f"mac_scheme {s.mac_scheme!r}: the applet implements "
                               f"{', '.join(repr(n) for n in MAC_SCHEME_CODES)}")
    scheme = mac_schemes.scheme(s.mac_scheme)
    if scheme.uid_size and (s.uid is None or len(s.uid) != scheme.uid_size):
        raise AppletStateError(f"uid: the {s.mac_scheme} scheme takes a {scheme.uid_size}-byte "
                               "card UID")
    if s.log_counter not in LOG_COUNTER_CODES:
        raise AppletStateError('log_counter: "before" or "after"')
    if not 1 <= len(s.aid) <= 16:
        raise AppletStateError("aid: 1 to 16 bytes")
    if len(s.label) > LABEL_MAX or not s.label.isascii():
        raise AppletStateError(f"label: at most {LABEL_MAX} ASCII characters")
    for name, keys in (("purchase_keys", s.purchase_keys), ("load_keys", s.load_keys),
                       ("unload_keys", s.unload_keys), ("update_keys", s.update_keys)):
        if len(keys) > MAX_KEY_SLOTS:
            raise AppletStateError(f"{name}: at most {MAX_KEY_SLOTS} keys")
        if any(not 0 <= k.index <= 255 or len(k.key) != 16 for k in keys.values()):
            raise AppletStateError(f"{name}: a key has an index 0..255 and 16 bytes")
    if not 0 <= s.pin_tries_left <= s.pin_try_limit <= 127:
        raise AppletStateError("pin_tries_left / pin_try_limit: 0 <= tries left <= limit <= 127")
    if s.uid is not None and not 1 <= len(s.uid) <= 16:
        raise AppletStateError("uid: 1 to 16 bytes")
    if s.fixed_random is not None and len(s.fixed_random) != 4:
        raise AppletStateError("fixed_random: 4 bytes")

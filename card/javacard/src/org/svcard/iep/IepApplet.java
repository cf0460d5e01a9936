package org.svcard.iep;

import javacard.framework.APDU;
import javacard.framework.Applet;
import javacard.framework.ISO7816;
import javacard.framework.ISOException;
import javacard.framework.JCSystem;
import javacard.framework.Util;
import javacard.security.CryptoException;
import javacard.security.DESKey;
import javacard.security.KeyBuilder;
import javacard.security.RandomData;
import javacard.security.Signature;
import javacardx.crypto.Cipher;

/**
 * svcard's IEP purse (PBOC ED/EP) as a Java Card 2.2.2 applet: the same commands, status words,
 * MACs, TAC, log and proof as the Python card (card/iep.py and card/iep_commands/), unload and
 * the overdraft-limit update included, in the pboc and changsha-metro MAC-scheme profiles.
 *
 * <p>Install data in GlobalPlatform layout (len AID, len privileges, len parameters); the
 * parameters, when present: purchase key slots, load key slots (1..16 each, default 8 and 8),
 * flags, unload key slots, update key slots (0..16 each, default 2 and 2). Everything is
 * allocated here, at install; after it nothing is allocated.
 * The issuer then sends PUT PERSONALISATION DATA (80 F0) commands and END PERSONALISATION
 * (80 FE); before END every purse command answers 6985, after it the two personalisation
 * commands answer 6D00 like any unknown instruction (docs/javacard.md).
 *
 * <p>Every value change (balance, counter, proof, log record, the key's MAC-failure count) is
 * written inside one JCSystem transaction. No command returns key bytes.
 */
public class IepApplet extends Applet {

    // --- instructions ---------------------------------------------------------------------
    private static final byte CLA_ISO = (byte) 0x00;
    private static final byte CLA_PBOC = (byte) 0x80;
    private static final byte INS_VERIFY = (byte) 0x20;
    private static final byte INS_INITIALIZE = (byte) 0x50;
    private static final byte INS_CREDIT_FOR_LOAD = (byte) 0x52;
    private static final byte INS_DEBIT = (byte) 0x54;
    private static final byte INS_UPDATE_OVERDRAFT = (byte) 0x58;
    private static final byte INS_GET_TRANSACTION_PROVE = (byte) 0x5A;
    private static final byte INS_GET_BALANCE = (byte) 0x5C;
    private static final byte INS_CHANGE_PIN = (byte) 0x5E;
    private static final byte INS_SELECT = (byte) 0xA4;
    private static final byte INS_READ_BINARY = (byte) 0xB0;
    private static final byte INS_READ_RECORD = (byte) 0xB2;
    private static final byte INS_GET_RESPONSE = (byte) 0xC0;
    private static final byte INS_GET_DATA = (byte) 0xCA;
    private static final byte INS_PUT_PERSO = (byte) 0xF0;
    private static final byte INS_END_PERSO = (byte) 0xFE;

    private static final byte INIT_LOAD = 0x00;
    private static final byte INIT_PURCHASE = 0x01;
    private static final byte INIT_CASH_WITHDRAWAL = 0x02;
    private static final byte INIT_UPDATE = 0x04;
    private static final byte INIT_UNLOAD = 0x05;
    private static final byte DEBIT_FOR_UNLOAD = 0x03;
    private static final byte PURSE_ED = 0x01;
    private static final byte PURSE_EP = 0x02;
    private static final byte TYPE_ED_LOAD = 0x01;
    private static final byte TYPE_EP_LOAD = 0x02;
    private static final byte TYPE_UNLOAD = 0x03;
    private static final byte TYPE_ED_CASH_WITHDRAWAL = 0x04;
    private static final byte TYPE_ED_PURCHASE = 0x05;
    private static final byte TYPE_EP_PURCHASE = 0x06;
    private static final byte TYPE_OVERDRAFT_UPDATE = 0x07;

    // --- status words (the PBOC ones ISO7816 does not name) --------------------------------
    private static final short SW_INSUFFICIENT_FUNDS = (short) 0x9401;
    private static final short SW_COUNTER_AT_MAXIMUM = (short) 0x9402;
    private static final short SW_KEY_NOT_SUPPORTED = (short) 0x9403;
    private static final short SW_NO_SUCH_PROOF = (short) 0x9406;
    private static final short SW_MAC_INVALID = (short) 0x9302;
    private static final short SW_BLOCKED = (short) 0x6983;
    private static final short SW_SM_NOT_SUPPORTED = (short) 0x6882;
    private static final short SW_DATA_NOT_FOUND = (short) 0x6A88;
    private static final short SW_NOT_ENOUGH_MEMORY = (short) 0x6A84;

    // --- files ---------------------------------------------------------------------------
    private static final byte SFI_PUBLIC_DATA = 0x15;
    private static final byte SFI_HOLDER_DATA = 0x16;
    private static final byte SFI_LOG = 0x18;
    private static final short PUBLIC_DATA_SIZE = 30;
    private static final short HOLDER_DATA_SIZE = 55;
    private static final short RECORD_SIZE = 23;
    private static final short LOG_RECORDS = 10;
    private static final short LABEL_MAX = 16;

    // a purse: balance 4, online counter 2, offline counter 2, overdraft limit 3
    private static final short P_BALANCE = 0;
    private static final short P_ONLINE = 4;
    private static final short P_OFFLINE = 6;
    private static final short P_OVERDRAFT = 8;
    private static final short PURSE_SIZE = 11;

    // a key slot's description: used, index, version, algorithm id, MAC failures
    private static final short K_USED = 0;
    private static final short K_INDEX = 1;
    private static final short K_VERSION = 2;
    private static final short K_ALGORITHM = 3;
    private static final short K_FAILURES = 4;
    private static final short K_SIZE = 5;

    // the proof of the last value transaction: present, type, counter 2, MAC 4, TAC 4
    private static final short PR_PRESENT = 0;
    private static final short PR_TYPE = 1;
    private static final short PR_COUNTER = 2;
    private static final short PR_MAC = 4;
    private static final short PR_TAC = 8;
    private static final short PROOF_SIZE = 12;

    // the session (transient, cleared on deselect): an INITIALIZE waiting for its completion
    private static final short S_ACTIVE = 0;
    private static final short S_KIND = 1;
    private static final short S_PURSE = 2;
    private static final short S_TYPE = 3;
    private static final short S_SLOT = 4;
    private static final short S_AMOUNT = 5;
    private static final short S_TERMINAL = 9;
    private static final short S_RANDOM = 15;
    private static final short S_COUNTER = 19;
    private static final short S_BALANCE = 21;
    private static final short S_PIN_OK = 25;      // VERIFY passed since the purse was selected
    private static final short SESSION_SIZE = 26;

    // scratch space (transient): MAC input (with its padding), MAC output or a derived key,
    // a key-derivation block (two blocks for a 16-byte session key)
    private static final short W_INPUT = 0;
    private static final short W_MAC = 48;
    private static final short W_BLOCK = 64;
    private static final short WORK_SIZE = 80;

    // install parameters: purchase key slots, load key slots, flags, unload key slots, update
    // key slots
    private static final byte INSTALL_CBC_MAC = 0x01;   // MACs by DES-CBC even if M2 MACs exist
    private static final short DEFAULT_KEY_SLOTS = 8;
    private static final short DEFAULT_ED_KEY_SLOTS = 2;  // unload and update keys
    private static final short MAX_KEY_SLOTS = 16;

    // MAC-scheme profiles (docs/protocol.md): how the purchase session key and MACs are made
    private static final byte SCHEME_PBOC = 0x00;
    private static final byte SCHEME_CHANGSHA_METRO = 0x01;
    private static final short METRO_UID_SIZE = 9;       // the UID bytes MAC1 takes

    // personalisation items (P1 of PUT PERSONALISATION DATA)
    private static final byte PI_LABEL = 0x01;
    private static final byte PI_CURRENCY = 0x02;
    private static final byte PI_PUBLIC_DATA = 0x03;
    private static final byte PI_HOLDER_DATA = 0x04;
    private static final byte PI_BALANCE_LIMIT = 0x05;
    private static final byte PI_PURCHASE_KEY = 0x06;
    private static final byte PI_LOAD_KEY = 0x07;
    private static final byte PI_TAC_KEY = 0x08;
    private static final byte PI_PIN = 0x09;
    private static final byte PI_MAC_FAILURE_LIMIT = 0x0A;
    private static final byte PI_PURSE = 0x0B;
    private static final byte PI_FIXED_RANDOM = 0x0C;
    private static final byte PI_LOG_RECORD = 0x0D;
    private static final byte PI_PROOF = 0x0E;
    private static final byte PI_UID = 0x0F;
    private static final byte PI_UNLOAD_KEY = 0x10;
    private static final byte PI_UPDATE_KEY = 0x11;
    private static final byte PI_LOG_COUNTER = 0x12;
    private static final byte PI_MAC_SCHEME = 0x13;
    private static final short UID_MAX = 16;
    // what END PERSONALISATION needs to have been given
    private static final short NEED_CURRENCY = 0x01;
    private static final short NEED_PUBLIC = 0x02;
    private static final short NEED_HOLDER = 0x04;
    private static final short NEED_LIMIT = 0x08;
    private static final short NEED_TAC = 0x10;
    private static final short NEED_ALL = 0x1F;

    // --- persistent state (all allocated in the constructor) --------------------------------
    private final byte[] publicData = new byte[PUBLIC_DATA_SIZE];
    private final byte[] holderData = new byte[HOLDER_DATA_SIZE];
    private final byte[] label = new byte[LABEL_MAX];
    private byte labelLength;
    private final byte[] currency = new byte[3];         // code (n3 in 2 BCD bytes), exponent
    private final byte[] balanceLimit = new byte[4];
    private final byte[] ep = new byte[PURSE_SIZE];
    private final byte[] ed = new byte[PURSE_SIZE];
    private final byte[] purchaseMeta;
    private final DESKey[] purchaseKeys;
    private final byte[] loadMeta;
    private final DESKey[] loadKeys;
    private final byte[] unloadMeta;
    private final DESKey[] unloadKeys;
    private final byte[] updateMeta;
    private final DESKey[] updateKeys;
    private final DESKey tacKey;
    private final byte[] pin = new byte[6];               // BCD, odd digit counts padded with F
    private byte pinLength;                                // 0: no PIN (VERIFY answers 6985)
    private byte pinTryLimit;
    private byte pinTriesLeft;
    private byte macFailureLimit = 15;
    private final byte[] log = new byte[(short) (RECORD_SIZE * LOG_RECORDS)];
    private byte logNewest;                                // slot of record 1
    private byte logCount;
    private final byte[] proof = new byte[PROOF_SIZE];
    private final byte[] uid = new byte[UID_MAX];           // GET DATA 00 00
    private byte uidLength;
    private final byte[] fixedRandom = new byte[5];       // set flag, random 4 (tests only)
    private boolean logCounterAfter;                       // the log record's counter + 1
    private byte macScheme = SCHEME_PBOC;
    private short personalised;                            // NEED_* bits given
    private boolean locked;                                // END PERSONALISATION done

    // --- transient state and crypto objects -----------------------------------------------
    private final byte[] session;
    private final byte[] work;
    private final DESKey sessionKey;
    private final DESKey sessionKey16;     // changsha-metro purchase session key (16 bytes)
    private final Cipher ecb;
    private final Signature macSig;        // null: MACs by DES-CBC (macCbc) and padding by hand
    private final Signature retailSig;     // null: retail MACs by DES-CBC and a 3DES last block
    private final Cipher macCbc;
    private final RandomData rng;

    public static void install(byte[] bArray, short bOffset, byte bLength) {
        new IepApplet(bArray, bOffset, bLength);
    }

    protected IepApplet(byte[] bArray, short bOffset, byte bLength) {
        short aidLen = (short) (bArray[bOffset] & 0xFF);
        short purchaseSlots = DEFAULT_KEY_SLOTS;
        short loadSlots = DEFAULT_KEY_SLOTS;
        short unloadSlots = DEFAULT_ED_KEY_SLOTS;
        short updateSlots = DEFAULT_ED_KEY_SLOTS;
        boolean cbcMac = false;
        if (bLength > 0) {
            short at = (short) (bOffset + 1 + aidLen);
            at = (short) (at + 1 + (short) (bArray[at] & 0xFF));   // privileges
            short paramLen = (short) (bArray[at] & 0xFF);
            if (paramLen >= 2 && bArray[(short) (at + 1)] == (byte) 0xC9
                    && (short) (bArray[(short) (at + 2)] & 0xFF) == (short) (paramLen - 2)) {
                // a card manager that passes the C9 TLV itself rather than its value
                at = (short) (at + 2);
                paramLen = (short) (paramLen - 2);
            }
            if (paramLen >= 2) {
                purchaseSlots = (short) (bArray[(short) (at + 1)] & 0xFF);
                loadSlots = (short) (bArray[(short) (at + 2)] & 0xFF);
            }
            if (paramLen >= 3) {
                cbcMac = (bArray[(short) (at + 3)] & INSTALL_CBC_MAC) != 0;
            }
            if (paramLen >= 5) {
                unloadSlots = (short) (bArray[(short) (at + 4)] & 0xFF);
                updateSlots = (short) (bArray[(short) (at + 5)] & 0xFF);
            }
        }
        if (purchaseSlots < 1 || purchaseSlots > MAX_KEY_SLOTS || loadSlots < 1
                || loadSlots > MAX_KEY_SLOTS || unloadSlots > MAX_KEY_SLOTS
                || updateSlots > MAX_KEY_SLOTS) {
            ISOException.throwIt(ISO7816.SW_WRONG_DATA);
        }
        purchaseMeta = new byte[(short) (purchaseSlots * K_SIZE)];
        purchaseKeys = new DESKey[purchaseSlots];
        buildKeys(purchaseKeys);
        loadMeta = new byte[(short) (loadSlots * K_SIZE)];
        loadKeys = new DESKey[loadSlots];
        buildKeys(loadKeys);
        unloadMeta = new byte[(short) (unloadSlots * K_SIZE)];
        unloadKeys = new DESKey[unloadSlots];
        buildKeys(unloadKeys);
        updateMeta = new byte[(short) (updateSlots * K_SIZE)];
        updateKeys = new DESKey[updateSlots];
        buildKeys(updateKeys);
        tacKey = (DESKey) KeyBuilder.buildKey(KeyBuilder.TYPE_DES, KeyBuilder.LENGTH_DES, false);
        sessionKey = (DESKey) KeyBuilder.buildKey(KeyBuilder.TYPE_DES_TRANSIENT_DESELECT,
                KeyBuilder.LENGTH_DES, false);
        sessionKey16 = (DESKey) KeyBuilder.buildKey(KeyBuilder.TYPE_DES_TRANSIENT_DESELECT,
                KeyBuilder.LENGTH_DES3_2KEY, false);
        session = JCSystem.makeTransientByteArray(SESSION_SIZE, JCSystem.CLEAR_ON_DESELECT);
        work = JCSystem.makeTransientByteArray(WORK_SIZE, JCSystem.CLEAR_ON_DESELECT);
        ecb = Cipher.getInstance(Cipher.ALG_DES_ECB_NOPAD, false);
        // a card without the ISO 9797-1 M2 DES MAC (optional in 2.2.2) gets the same bytes from
        // DES-CBC with the padding done here; install parameter bit 01 asks for it too
        Signature sig = null;
        if (!cbcMac) {
            try {
                sig = Signature.getInstance(Signature.ALG_DES_MAC8_ISO9797_M2, false);
            } catch (CryptoException e) {
                sig = null;
            }
        }
        macSig = sig;
        // the retail MAC (ISO 9797-1 algorithm 3) of the changsha-metro profile: a Signature
        // where the card has one, else DES-CBC under the key's left half and a 3DES last block
        Signature retail = null;
        if (!cbcMac) {
            try {
                retail = Signature.getInstance(Signature.ALG_DES_MAC8_ISO9797_1_M2_ALG3, false);
            } catch (CryptoException e) {
                retail = null;
            }
        }
        retailSig = retail;
        macCbc = sig == null || retail == null
                ? Cipher.getInstance(Cipher.ALG_DES_CBC_NOPAD, false) : null;
        rng = RandomData.getInstance(RandomData.ALG_SECURE_RANDOM);
        if (aidLen > 0) {
            register(bArray, (short) (bOffset + 1), (byte) aidLen);
        } else {
            register();
        }
    }

    /** Called from the constructor only: a 16-byte DES key object in every slot. */
    private static void buildKeys(DESKey[] keys) {
        short slots = (short) keys.length;
        for (short i = 0; i < slots; i++) {
            keys[i] = (DESKey) KeyBuilder.buildKey(KeyBuilder.TYPE_DES,
                    KeyBuilder.LENGTH_DES3_2KEY, false);
        }
    }

    public boolean select() {
        clearSession();
        session[S_PIN_OK] = 0;
        return true;
    }

    public void deselect() {
        clearSession();
        session[S_PIN_OK] = 0;
    }

    // --- dispatch ---------------------------------------------------------------------------
    public void process(APDU apdu) {
        byte[] buf = apdu.getBuffer();
        byte cla = buf[ISO7816.OFFSET_CLA];
        byte ins = buf[ISO7816.OFFSET_INS];
        if (selectingApplet()) {
            answerSelect(apdu, true);
            return;
        }
        if (cla == CLA_ISO && ins == INS_GET_RESPONSE) {
            getResponse(apdu);              // nothing to fetch: T=1 answers come whole
            return;
        }
        if (cla == CLA_ISO && ins == INS_SELECT && buf[ISO7816.OFFSET_P1] == 0x04) {
            answerSelect(apdu, false);
            return;
        }
        if ((cla & 0x0C) != 0) {
            ISOException.throwIt(SW_SM_NOT_SUPPORTED);
        }
        if (cla != CLA_ISO && cla != CLA_PBOC) {
            ISOException.throwIt(ISO7816.SW_CLA_NOT_SUPPORTED);
        }
        if (!locked) {
            personalisation(apdu, cla, ins);
            return;
        }
        if (cla == CLA_PBOC) {
            switch (ins) {
                case INS_CREDIT_FOR_LOAD:
                    try {
                        creditForLoad(apdu);
                    } finally {
                        clearSessionKeys();
                    }
                    return;
                case INS_DEBIT:
                    try {
                        if (buf[ISO7816.OFFSET_P1] == DEBIT_FOR_UNLOAD) {
                            debitForUnload(apdu);
                        } else {
                            debit(apdu);
                        }
                    } finally {
                        clearSessionKeys();
                    }
                    return;
                case INS_UPDATE_OVERDRAFT:
                    try {
                        updateOverdraftLimit(apdu);
                    } finally {
                        clearSessionKeys();
                    }
                    return;
                default:
                    break;
            }
            clearSession();
            switch (ins) {
                case INS_INITIALIZE:
                    initialize(apdu);
                    return;
                case INS_GET_TRANSACTION_PROVE:
                    getTransactionProve(apdu);
                    return;
                case INS_GET_BALANCE:
                    getBalance(apdu);
                    return;
                case INS_CHANGE_PIN:
                    changePin(apdu);
                    return;
                case INS_GET_DATA:
                    getData(apdu);
                    return;
                case INS_VERIFY:
                case INS_READ_BINARY:
                case INS_READ_RECORD:
                    ISOException.throwIt(ISO7816.SW_CLA_NOT_SUPPORTED);
                    return;
                default:
                    ISOException.throwIt(ISO7816.SW_INS_NOT_SUPPORTED);
                    return;
            }
        }
        clearSession();
        switch (ins) {
            case INS_VERIFY:
                verify(apdu);
                return;
            case INS_READ_BINARY:
                readBinary(apdu);
                return;
            case INS_READ_RECORD:
                readRecord(apdu);
                return;
            case INS_INITIALIZE:
            case INS_CREDIT_FOR_LOAD:
            case INS_DEBIT:
            case INS_UPDATE_OVERDRAFT:
            case INS_GET_TRANSACTION_PROVE:
            case INS_GET_BALANCE:
            case INS_CHANGE_PIN:
            case INS_GET_DATA:
                ISOException.throwIt(ISO7816.SW_CLA_NOT_SUPPORTED);
                return;
            default:
                ISOException.throwIt(ISO7816.SW_INS_NOT_SUPPORTED);
        }
    }

    private void clearSession() {
        session[S_ACTIVE] = 0;
        clearSessionKeys();
    }

    private void clearSessionKeys() {
        sessionKey.clearKey();
        sessionKey16.clearKey();
    }

    /**
     * Receives the command data and answers its length. A command that takes no data is
     * checked for data only where the runtime knows the APDU case (T=1, contactless, or a
     * simulator that says so): under T=0 its P3 is its Le, and asking for incoming data would
     * break the exchange, so there it is taken as data-less.
     */
    private static short receive(APDU apdu, boolean takesData) {
        if (!takesData && (APDU.getProtocol() & APDU.PROTOCOL_TYPE_MASK) == APDU.PROTOCOL_T0) {
            return 0;
        }
        return apdu.setIncomingAndReceive();
    }

    /** Sends len bytes of the APDU buffer; a short case 2 command with a smaller Le gets 6Cxx
     * (the exact length), as the Python card answers. */
    private static void send(APDU apdu, short len, short lc) {
        if (len == 0) {
            return;
        }
        short le = apdu.setOutgoing();
        if (lc == 0 && le != 0 && le < len) {
            ISOException.throwIt((short) (0x6C00 | (len & 0xFF)));
        }
        apdu.setOutgoingLength(len);
        apdu.sendBytes((short) 0, len);
    }

    // --- SELECT, GET RESPONSE -------------------------------------------------------------
    private void answerSelect(APDU apdu, boolean selecting) {
        byte[] buf = apdu.getBuffer();
        byte p2 = buf[ISO7816.OFFSET_P2];
        if (p2 != 0x00 && p2 != 0x0C) {
            ISOException.throwIt(ISO7816.SW_INCORRECT_P1P2);
        }
        short lc = apdu.setIncomingAndReceive();
        if (lc < 1 || lc > 16) {
            ISOException.throwIt(ISO7816.SW_WRONG_LENGTH);
        }
        if (!selecting) {
            // a SELECT the runtime left to the selected applet: this AID (or a prefix) or none
            short aidLen = JCSystem.getAID().getBytes(work, W_INPUT);
            if (lc > aidLen || Util.arrayCompare(buf, ISO7816.OFFSET_CDATA, work, W_INPUT, lc)
                    != 0) {
                ISOException.throwIt(ISO7816.SW_FILE_NOT_FOUND);
            }
            select();
        }
        if (p2 == 0x0C || !locked) {
            return;
        }
        send(apdu, buildFci(buf), lc);
    }

    /** 6F { 84 AID, A5 { 50 label, 5F2A currency, 5F36 exponent, 9F0C EF 0x15 } } */
    private short buildFci(byte[] buf) {
        buf[0] = 0x6F;
        buf[2] = (byte) 0x84;
        short aidLen = JCSystem.getAID().getBytes(buf, (short) 4);
        buf[3] = (byte) aidLen;
        short off = (short) (4 + aidLen);
        buf[off] = (byte) 0xA5;
        short lenAt = (short) (off + 1);
        off = (short) (off + 2);
        short start = off;
        if (labelLength > 0) {
            buf[off++] = 0x50;
            buf[off++] = labelLength;
            off = Util.arrayCopyNonAtomic(label, (short) 0, buf, off, labelLength);
        }
        buf[off++] = 0x5F;
        buf[off++] = 0x2A;
        buf[off++] = 0x02;
        buf[off++] = currency[0];
        buf[off++] = currency[1];
        buf[off++] = 0x5F;
        buf[off++] = 0x36;
        buf[off++] = 0x01;
        buf[off++] = currency[2];
        buf[off++] = (byte) 0x9F;
        buf[off++] = 0x0C;
        buf[off++] = (byte) PUBLIC_DATA_SIZE;
        off = Util.arrayCopyNonAtomic(publicData, (short) 0, buf, off, PUBLIC_DATA_SIZE);
        buf[lenAt] = (byte) (off - start);
        buf[1] = (byte) (off - 2);
        return off;
    }

    private static void getResponse(APDU apdu) {
        byte[] buf = apdu.getBuffer();
        if (buf[ISO7816.OFFSET_P1] != 0 || buf[ISO7816.OFFSET_P2] != 0) {
            ISOException.throwIt(ISO7816.SW_INCORRECT_P1P2);
        }
        ISOException.throwIt(ISO7816.SW_CONDITIONS_NOT_SATISFIED);
    }

    // --- INITIALIZE FOR LOAD / PURCHASE / CASH WITHDRAWAL / UPDATE / UNLOAD ------------------
    private void initialize(APDU apdu) {
        byte[] buf = apdu.getBuffer();
        byte kind = buf[ISO7816.OFFSET_P1];
        byte p2 = buf[ISO7816.OFFSET_P2];
        boolean routed;
        if (kind == INIT_LOAD || kind == INIT_PURCHASE) {
            routed = p2 == PURSE_ED || p2 == PURSE_EP;
        } else {
            routed = (kind == INIT_CASH_WITHDRAWAL || kind == INIT_UPDATE
                    || kind == INIT_UNLOAD) && p2 == PURSE_ED;
        }
        if (!routed) {
            ISOException.throwIt(ISO7816.SW_INCORRECT_P1P2);
        }
        boolean update = kind == INIT_UPDATE;
        short lc = receive(apdu, true);
        if (lc != (update ? 7 : 11)) {
            ISOException.throwIt(ISO7816.SW_WRONG_LENGTH);
        }
        byte[] purse = purseFor(p2);
        boolean load = kind == INIT_LOAD;
        // online: a load, an unload or an update (the issuer's MACs, the online counter)
        boolean online = load || update || kind == INIT_UNLOAD;
        byte[] meta = metaFor(kind);
        short slot = findKey(meta, buf[ISO7816.OFFSET_CDATA]);
        if (slot < 0) {
            ISOException.throwIt(SW_KEY_NOT_SUPPORTED);
        }
        short m = (short) (slot * K_SIZE);
        if ((short) (meta[(short) (m + K_FAILURES)] & 0xFF) >= (short) (macFailureLimit & 0xFF)) {
            ISOException.throwIt(SW_BLOCKED);
        }
        short counterAt = online ? P_ONLINE : P_OFFLINE;
        if (Util.getShort(purse, counterAt) == (short) 0xFFFF) {
            ISOException.throwIt(SW_COUNTER_AT_MAXIMUM);
        }
        short amountAt = (short) (ISO7816.OFFSET_CDATA + 1);
        if (load) {
            if (Num.addU32(purse, P_BALANCE, buf, amountAt, work, W_INPUT)
                    || Num.compareU32(work, W_INPUT, balanceLimit, (short) 0) > 0) {
                ISOException.throwIt(ISO7816.SW_CONDITIONS_NOT_SATISFIED);
            }
        } else if (kind == INIT_UNLOAD) {
            // the holder's own value only (balance - overdraft limit): the credit stays
            work[W_INPUT] = 0;
            Util.arrayCopyNonAtomic(purse, P_OVERDRAFT, work, (short) (W_INPUT + 1), (short) 3);
            if (Num.compareU32(purse, P_BALANCE, work, W_INPUT) < 0) {
                ISOException.throwIt(SW_INSUFFICIENT_FUNDS);
            }
            Num.subU32(purse, P_BALANCE, work, W_INPUT, work, W_INPUT);
            if (Num.compareU32(buf, amountAt, work, W_INPUT) > 0) {
                ISOException.throwIt(SW_INSUFFICIENT_FUNDS);
            }
        } else if (!update && Num.compareU32(buf, amountAt, purse, P_BALANCE) > 0) {
            ISOException.throwIt(SW_INSUFFICIENT_FUNDS);
        }
        byte type;
        if (load) {
            type = p2 == PURSE_ED ? TYPE_ED_LOAD : TYPE_EP_LOAD;
        } else if (update) {
            type = TYPE_OVERDRAFT_UPDATE;
        } else if (kind == INIT_UNLOAD) {
            type = TYPE_UNLOAD;
        } else if (kind == INIT_CASH_WITHDRAWAL) {
            type = TYPE_ED_CASH_WITHDRAWAL;
        } else {
            type = p2 == PURSE_ED ? TYPE_ED_PURCHASE : TYPE_EP_PURCHASE;
        }
        session[S_KIND] = kind;
        session[S_PURSE] = p2;
        session[S_TYPE] = type;
        session[S_SLOT] = (byte) slot;
        if (update) {
            // key index 1, terminal id 6; an update moves no amount (its log record says 0)
            Util.arrayFillNonAtomic(session, S_AMOUNT, (short) 4, (byte) 0);
            Util.arrayCopyNonAtomic(buf, amountAt, session, S_TERMINAL, (short) 6);
        } else {
            Util.arrayCopyNonAtomic(buf, amountAt, session, S_AMOUNT, (short) 4);
            Util.arrayCopyNonAtomic(buf, (short) (amountAt + 4), session, S_TERMINAL, (short) 6);
        }
        newRandom(session, S_RANDOM);
        Util.arrayCopyNonAtomic(purse, counterAt, session, S_COUNTER, (short) 2);
        Util.arrayCopyNonAtomic(purse, P_BALANCE, session, S_BALANCE, (short) 4);

        // answer: balance 4, counter 2, [overdraft 3,] key version 1, algorithm 1, random 4,
        // [MAC1 4]: a purchase and an update tell the overdraft limit, the online ones MAC1
        short off = Util.arrayCopyNonAtomic(purse, P_BALANCE, buf, (short) 0, (short) 4);
        off = Util.arrayCopyNonAtomic(purse, counterAt, buf, off, (short) 2);
        if (!online || update) {
            off = Util.arrayCopyNonAtomic(purse, P_OVERDRAFT, buf, off, (short) 3);
        }
        buf[off++] = meta[(short) (m + K_VERSION)];
        buf[off++] = meta[(short) (m + K_ALGORITHM)];
        off = Util.arrayCopyNonAtomic(session, S_RANDOM, buf, off, (short) 4);
        if (online) {
            // session key = 3DES_key(random || online counter || 80 00) under the DLK, DULK
            // or DUK; MAC1 over balance, amount (an update: the current limit, 3 bytes), type,
            // terminal id
            Util.arrayCopyNonAtomic(session, S_RANDOM, work, W_BLOCK, (short) 6);
            work[(short) (W_BLOCK + 6)] = (byte) 0x80;
            work[(short) (W_BLOCK + 7)] = 0x00;
            deriveSessionKey(keysFor(kind)[slot]);
            short n = Util.arrayCopyNonAtomic(session, S_BALANCE, work, W_INPUT, (short) 4);
            if (update) {
                n = Util.arrayCopyNonAtomic(purse, P_OVERDRAFT, work, n, (short) 3);
            } else {
                n = Util.arrayCopyNonAtomic(session, S_AMOUNT, work, n, (short) 4);
            }
            work[n++] = type;
            n = Util.arrayCopyNonAtomic(session, S_TERMINAL, work, n, (short) 6);
            mac(sessionKey, n, buf, off);
            off = (short) (off + 4);
        }
        session[S_ACTIVE] = 1;
        send(apdu, off, lc);
    }

    /** The key descriptions of the keys an INITIALIZE of this kind (its P1) uses. */
    private byte[] metaFor(byte kind) {
        if (kind == INIT_LOAD) {
            return loadMeta;
        }
        if (kind == INIT_UNLOAD) {
            return unloadMeta;
        }
        if (kind == INIT_UPDATE) {
            return updateMeta;
        }
        return purchaseMeta;
    }

    private DESKey[] keysFor(byte kind) {
        if (kind == INIT_LOAD) {
            return loadKeys;
        }
        if (kind == INIT_UNLOAD) {
            return unloadKeys;
        }
        if (kind == INIT_UPDATE) {
            return updateKeys;
        }
        return purchaseKeys;
    }

    /** The purse P2 names: the EP, or the ED once VERIFY has passed. */
    private byte[] purseFor(byte p2) {
        if (p2 == PURSE_EP) {
            return ep;
        }
        if (p2 == PURSE_ED) {
            if (session[S_PIN_OK] == 0) {
                ISOException.throwIt(ISO7816.SW_SECURITY_STATUS_NOT_SATISFIED);
            }
            return ed;
        }
        ISOException.throwIt(ISO7816.SW_INCORRECT_P1P2);
        return null;
    }

    private static short findKey(byte[] meta, byte index) {
        short slots = (short) (meta.length / K_SIZE);
        for (short i = 0; i < slots; i++) {
            short m = (short) (i * K_SIZE);
            if (meta[(short) (m + K_USED)] != 0 && meta[(short) (m + K_INDEX)] == index) {
                return i;
            }
        }
        return -1;
    }

    private void newRandom(byte[] out, short off) {
        if (fixedRandom[0] != 0) {
            Util.arrayCopyNonAtomic(fixedRandom, (short) 1, out, off, (short) 4);
        } else {
            rng.generateData(out, off, (short) 4);
        }
    }

    /** sessionKey = 3DES ECB of the 8-byte block at work[W_BLOCK] under the card key. */
    private void deriveSessionKey(DESKey cardKey) {
        ecb.init(cardKey, Cipher.MODE_ENCRYPT);
        ecb.doFinal(work, W_BLOCK, (short) 8, work, W_MAC);
        sessionKey.setKey(work, W_MAC);
        Util.arrayFillNonAtomic(work, W_MAC, (short) 16, (byte) 0);
    }

    /** The purse MAC: single-DES CBC-MAC (zero ICV, 80 padding) of work[W_INPUT..len], 4
     * bytes to out[outOff]. */
    private void mac(DESKey key, short len, byte[] out, short outOff) {
        if (macSig != null) {
            macSig.init(key, Signature.MODE_SIGN);
            macSig.sign(work, W_INPUT, len, work, W_MAC);
        } else {
            macCbc.init(key, Cipher.MODE_ENCRYPT);   // zero ICV
            short last = (short) (padM2(len) - 8);
            for (short at = W_INPUT; at < last; at = (short) (at + 8)) {
                macCbc.update(work, at, (short) 8, work, W_MAC);
            }
            macCbc.doFinal(work, last, (short) 8, work, W_MAC);
        }
        Util.arrayCopyNonAtomic(work, W_MAC, out, outOff, (short) 4);
    }

    /** ISO 9797-1 padding method 2 of work[W_INPUT..len]: always 80, then 00 up to a whole
     * block; answers where the padded input ends. */
    private short padM2(short len) {
        short end = (short) (W_INPUT + len);
        work[end++] = (byte) 0x80;
        while ((short) ((short) (end - W_INPUT) % 8) != 0) {
            work[end++] = 0;
        }
        return end;
    }

    /** The changsha-metro purchase session key: 3DES_DPK ECB of the block at work[W_BLOCK]
     * and 80 00 .. 00, 16 bytes; sessionKey holds its left half (the retail MAC's chain). */
    private void derivePurchaseKey16(DESKey dpk) {
        work[(short) (W_BLOCK + 8)] = (byte) 0x80;
        Util.arrayFillNonAtomic(work, (short) (W_BLOCK + 9), (short) 7, (byte) 0);
        ecb.init(dpk, Cipher.MODE_ENCRYPT);
        ecb.doFinal(work, W_BLOCK, (short) 16, work, W_MAC);
        sessionKey16.setKey(work, W_MAC);
        sessionKey.setKey(work, W_MAC);
        Util.arrayFillNonAtomic(work, W_MAC, (short) 16, (byte) 0);
    }

    /** MAC1 and MAC2 of a purchase under the session key of the card's MAC-scheme profile. */
    private void purchaseMac(short len, byte[] out, short outOff) {
        if (macScheme == SCHEME_CHANGSHA_METRO) {
            retailMac(len, out, outOff);
        } else {
            mac(sessionKey, len, out, outOff);
        }
    }

    /** ISO 9797-1 MAC algorithm 3 (retail MAC, padding method 2, zero ICV) of
     * work[W_INPUT..len] under sessionKey16, 4 bytes to out[outOff]. By hand: single-DES CBC
     * under the left half over every block but the last, then that chain xor the last block
     * enciphered with the whole 16-byte key (3DES EDE: left, right, left). */
    private void retailMac(short len, byte[] out, short outOff) {
        if (retailSig != null) {
            retailSig.init(sessionKey16, Signature.MODE_SIGN);
            retailSig.sign(work, W_INPUT, len, work, W_MAC);
        } else {
            short last = (short) (padM2(len) - 8);
            if (last > W_INPUT) {
                macCbc.init(sessionKey, Cipher.MODE_ENCRYPT);   // zero ICV
                short chainEnd = (short) (last - 8);
                for (short at = W_INPUT; at < chainEnd; at = (short) (at + 8)) {
                    macCbc.update(work, at, (short) 8, work, W_MAC);
                }
                macCbc.doFinal(work, chainEnd, (short) 8, work, W_MAC);
                for (short i = 0; i < 8; i++) {
                    work[(short) (last + i)] ^= work[(short) (W_MAC + i)];
                }
            }
            ecb.init(sessionKey16, Cipher.MODE_ENCRYPT);
            ecb.doFinal(work, last, (short) 8, work, W_MAC);
        }
        Util.arrayCopyNonAtomic(work, W_MAC, out, outOff, (short) 4);
    }

    /** Constant-time comparison of 4 MAC bytes. */
    private static boolean sameMac(byte[] a, short aOff, byte[] b, short bOff) {
        byte diff = 0;
        for (short i = 0; i < 4; i++) {
            diff |= (byte) (a[(short) (aOff + i)] ^ b[(short) (bOff + i)]);
        }
        return diff == 0;
    }

    /** A wrong MAC: the key's failure count goes up by one (at most the limit), written at
     * once (a single persistent byte write is atomic), then 9302. */
    private void macFailed(byte[] meta) {
        short at = (short) ((short) (session[S_SLOT] * K_SIZE) + K_FAILURES);
        short count = (short) ((short) (meta[at] & 0xFF) + 1);
        short limit = (short) (macFailureLimit & 0xFF);
        meta[at] = (byte) (count > limit ? limit : count);
        ISOException.throwIt(SW_MAC_INVALID);
    }

    /** Takes the session (it ends whatever the answer): true when one was waiting. */
    private boolean takeSession() {
        boolean active = session[S_ACTIVE] != 0;
        session[S_ACTIVE] = 0;
        return active;
    }

    // --- CREDIT FOR LOAD --------------------------------------------------------------------
    private void creditForLoad(APDU apdu) {
        byte[] buf = apdu.getBuffer();
        boolean active = takeSession();
        if (buf[ISO7816.OFFSET_P1] != 0 || buf[ISO7816.OFFSET_P2] != 0) {
            ISOException.throwIt(ISO7816.SW_INCORRECT_P1P2);
        }
        if (!active || session[S_KIND] != INIT_LOAD) {
            ISOException.throwIt(ISO7816.SW_CONDITIONS_NOT_SATISFIED);
        }
        short lc = receive(apdu, true);
        if (lc != 11) {
            ISOException.throwIt(ISO7816.SW_WRONG_LENGTH);
        }
        short dateAt = ISO7816.OFFSET_CDATA;
        short timeAt = (short) (dateAt + 4);
        short mac2At = (short) (dateAt + 7);
        if (!Num.validDate(buf, dateAt) || !Num.validTime(buf, timeAt)) {
            ISOException.throwIt(ISO7816.SW_WRONG_DATA);
        }
        // MAC2 (S2) over amount, type, terminal id, date, time
        short n = Util.arrayCopyNonAtomic(session, S_AMOUNT, work, W_INPUT, (short) 4);
        work[n++] = session[S_TYPE];
        n = Util.arrayCopyNonAtomic(session, S_TERMINAL, work, n, (short) 6);
        n = Util.arrayCopyNonAtomic(buf, dateAt, work, n, (short) 7);
        mac(sessionKey, n, work, W_BLOCK);
        if (!sameMac(work, W_BLOCK, buf, mac2At)) {
            macFailed(loadMeta);
        }
        byte[] purse = session[S_PURSE] == PURSE_ED ? ed : ep;
        // TAC (S3) over balance after, online counter, amount, type, terminal id, date, time
        Num.addU32(session, S_BALANCE, session, S_AMOUNT, work, W_INPUT);
        n = Util.arrayCopyNonAtomic(session, S_COUNTER, work, (short) (W_INPUT + 4), (short) 2);
        n = Util.arrayCopyNonAtomic(session, S_AMOUNT, work, n, (short) 4);
        work[n++] = session[S_TYPE];
        n = Util.arrayCopyNonAtomic(session, S_TERMINAL, work, n, (short) 6);
        n = Util.arrayCopyNonAtomic(buf, dateAt, work, n, (short) 7);
        mac(tacKey, n, work, W_BLOCK);          // TAC at work[W_BLOCK]
        // the proof keeps the MAC2 the card accepted; the log keeps the record
        commit(purse, P_ONLINE, buf, mac2At, buf, dateAt, loadMeta, null, (short) 0);
        Util.arrayCopyNonAtomic(work, W_BLOCK, buf, (short) 0, (short) 4);
        send(apdu, (short) 4, lc);
    }

    // --- DEBIT FOR PURCHASE / CASH WITHDRAWAL -----------------------------------------------
    private void debit(APDU apdu) {
        byte[] buf = apdu.getBuffer();
        boolean active = takeSession();
        // a session of another kind is refused before the header is looked at
        if (active && session[S_KIND] != INIT_PURCHASE && session[S_KIND] != INIT_CASH_WITHDRAWAL) {
            ISOException.throwIt(ISO7816.SW_CONDITIONS_NOT_SATISFIED);
        }
        if (buf[ISO7816.OFFSET_P1] != 0x01 || buf[ISO7816.OFFSET_P2] != 0) {
            ISOException.throwIt(ISO7816.SW_INCORRECT_P1P2);
        }
        if (!active) {
            ISOException.throwIt(ISO7816.SW_CONDITIONS_NOT_SATISFIED);
        }
        short lc = receive(apdu, true);
        if (lc != 15) {
            ISOException.throwIt(ISO7816.SW_WRONG_LENGTH);
        }
        short ttnAt = ISO7816.OFFSET_CDATA;
        short dateAt = (short) (ttnAt + 4);
        short timeAt = (short) (ttnAt + 8);
        short mac1At = (short) (ttnAt + 11);
        if (!Num.validDate(buf, dateAt) || !Num.validTime(buf, timeAt)) {
            ISOException.throwIt(ISO7816.SW_WRONG_DATA);
        }
        // purchase session key from random || offline counter || TTN's last 2 bytes: pboc
        // 3DES_DPK of that block (8 bytes), changsha-metro of it and a padding block (16)
        Util.arrayCopyNonAtomic(session, S_RANDOM, work, W_BLOCK, (short) 6);
        Util.arrayCopyNonAtomic(buf, (short) (ttnAt + 2), work, (short) (W_BLOCK + 6), (short) 2);
        DESKey dpk = purchaseKeys[session[S_SLOT]];
        if (macScheme == SCHEME_CHANGSHA_METRO) {
            derivePurchaseKey16(dpk);
        } else {
            deriveSessionKey(dpk);
        }
        // MAC1 over amount, type, terminal id, date, time (changsha-metro: then the UID)
        short n = Util.arrayCopyNonAtomic(session, S_AMOUNT, work, W_INPUT, (short) 4);
        work[n++] = session[S_TYPE];
        n = Util.arrayCopyNonAtomic(session, S_TERMINAL, work, n, (short) 6);
        n = Util.arrayCopyNonAtomic(buf, dateAt, work, n, (short) 7);
        if (macScheme == SCHEME_CHANGSHA_METRO) {
            n = Util.arrayCopyNonAtomic(uid, (short) 0, work, n, METRO_UID_SIZE);
        }
        purchaseMac(n, work, W_BLOCK);
        if (!sameMac(work, W_BLOCK, buf, mac1At)) {
            macFailed(purchaseMeta);
        }
        byte[] purse = session[S_PURSE] == PURSE_ED ? ed : ep;
        // MAC2 over the amount, kept at work[W_BLOCK + 4]
        Util.arrayCopyNonAtomic(session, S_AMOUNT, work, W_INPUT, (short) 4);
        purchaseMac((short) 4, work, (short) (W_BLOCK + 4));
        // TAC over amount, type, terminal id, TTN, date, time, at work[W_BLOCK]
        n = Util.arrayCopyNonAtomic(session, S_AMOUNT, work, W_INPUT, (short) 4);
        work[n++] = session[S_TYPE];
        n = Util.arrayCopyNonAtomic(session, S_TERMINAL, work, n, (short) 6);
        n = Util.arrayCopyNonAtomic(buf, ttnAt, work, n, (short) 4);
        n = Util.arrayCopyNonAtomic(buf, dateAt, work, n, (short) 7);
        mac(tacKey, n, work, W_BLOCK);
        Num.subU32(session, S_BALANCE, session, S_AMOUNT, work, W_INPUT);
        commit(purse, P_OFFLINE, work, (short) (W_BLOCK + 4), buf, dateAt, purchaseMeta, null,
                (short) 0);
        Util.arrayCopyNonAtomic(work, W_BLOCK, buf, (short) 0, (short) 8);   // TAC, MAC2
        send(apdu, (short) 8, lc);
    }

    // --- DEBIT FOR UNLOAD (80 54 03 00), UPDATE OVERDRAFT LIMIT (80 58 00 00) -----------------
    /** Date, time and the issuer's MAC2; a right MAC2 debits the ED and answers MAC3 (under
     * the unload session key, over the balance after, online counter, amount, type, terminal
     * id, date, time). */
    private void debitForUnload(APDU apdu) {
        byte[] buf = apdu.getBuffer();
        boolean active = takeSession();
        if (buf[ISO7816.OFFSET_P2] != 0) {
            ISOException.throwIt(ISO7816.SW_INCORRECT_P1P2);
        }
        if (!active || session[S_KIND] != INIT_UNLOAD) {
            ISOException.throwIt(ISO7816.SW_CONDITIONS_NOT_SATISFIED);
        }
        short lc = receive(apdu, true);
        if (lc != 11) {
            ISOException.throwIt(ISO7816.SW_WRONG_LENGTH);
        }
        short dateAt = ISO7816.OFFSET_CDATA;
        short mac2At = (short) (dateAt + 7);
        if (!Num.validDate(buf, dateAt) || !Num.validTime(buf, (short) (dateAt + 4))) {
            ISOException.throwIt(ISO7816.SW_WRONG_DATA);
        }
        // MAC2 over amount, type, terminal id, date, time
        short n = Util.arrayCopyNonAtomic(session, S_AMOUNT, work, W_INPUT, (short) 4);
        work[n++] = session[S_TYPE];
        n = Util.arrayCopyNonAtomic(session, S_TERMINAL, work, n, (short) 6);
        n = Util.arrayCopyNonAtomic(buf, dateAt, work, n, (short) 7);
        mac(sessionKey, n, work, W_BLOCK);
        if (!sameMac(work, W_BLOCK, buf, mac2At)) {
            macFailed(unloadMeta);
        }
        // MAC3 at work[W_BLOCK]; the new balance stays at work[W_INPUT] for the commit
        Num.subU32(session, S_BALANCE, session, S_AMOUNT, work, W_INPUT);
        n = Util.arrayCopyNonAtomic(session, S_COUNTER, work, (short) (W_INPUT + 4), (short) 2);
        n = Util.arrayCopyNonAtomic(session, S_AMOUNT, work, n, (short) 4);
        work[n++] = session[S_TYPE];
        n = Util.arrayCopyNonAtomic(session, S_TERMINAL, work, n, (short) 6);
        n = Util.arrayCopyNonAtomic(buf, dateAt, work, n, (short) 7);
        mac(sessionKey, n, work, W_BLOCK);
        // the proof keeps the MAC2 the card accepted and MAC3
        commit(ed, P_ONLINE, buf, mac2At, buf, dateAt, unloadMeta, null, (short) 0);
        Util.arrayCopyNonAtomic(work, W_BLOCK, buf, (short) 0, (short) 4);
        send(apdu, (short) 4, lc);
    }

    /** New limit 3, date, time and the issuer's MAC2; a right MAC2 moves the ED balance by
     * (new limit - old limit), sets the limit and answers the TAC. A balance that would go
     * below 0 answers 9401 and changes nothing. */
    private void updateOverdraftLimit(APDU apdu) {
        byte[] buf = apdu.getBuffer();
        boolean active = takeSession();
        if (buf[ISO7816.OFFSET_P1] != 0 || buf[ISO7816.OFFSET_P2] != 0) {
            ISOException.throwIt(ISO7816.SW_INCORRECT_P1P2);
        }
        if (!active || session[S_KIND] != INIT_UPDATE) {
            ISOException.throwIt(ISO7816.SW_CONDITIONS_NOT_SATISFIED);
        }
        short lc = receive(apdu, true);
        if (lc != 14) {
            ISOException.throwIt(ISO7816.SW_WRONG_LENGTH);
        }
        short limitAt = ISO7816.OFFSET_CDATA;
        short dateAt = (short) (limitAt + 3);
        short mac2At = (short) (limitAt + 10);
        if (!Num.validDate(buf, dateAt) || !Num.validTime(buf, (short) (dateAt + 4))) {
            ISOException.throwIt(ISO7816.SW_WRONG_DATA);
        }
        // MAC2 over new limit 3, type, terminal id, date, time
        short n = Util.arrayCopyNonAtomic(buf, limitAt, work, W_INPUT, (short) 3);
        work[n++] = session[S_TYPE];
        n = Util.arrayCopyNonAtomic(session, S_TERMINAL, work, n, (short) 6);
        n = Util.arrayCopyNonAtomic(buf, dateAt, work, n, (short) 7);
        mac(sessionKey, n, work, W_BLOCK);
        if (!sameMac(work, W_BLOCK, buf, mac2At)) {
            macFailed(updateMeta);
        }
        // the new balance (at work[W_INPUT]) = balance + new limit - old limit, the limits as
        // 4-byte numbers at work[W_BLOCK + 8] (new) and work[W_BLOCK + 12] (old)
        short newLimit = (short) (W_BLOCK + 8);
        short oldLimit = (short) (W_BLOCK + 12);
        work[newLimit] = 0;
        Util.arrayCopyNonAtomic(buf, limitAt, work, (short) (newLimit + 1), (short) 3);
        work[oldLimit] = 0;
        Util.arrayCopyNonAtomic(ed, P_OVERDRAFT, work, (short) (oldLimit + 1), (short) 3);
        if (Num.compareU32(work, newLimit, work, oldLimit) >= 0) {
            Num.subU32(work, newLimit, work, oldLimit, work, newLimit);
            if (Num.addU32(session, S_BALANCE, work, newLimit, work, W_INPUT)) {
                ISOException.throwIt(ISO7816.SW_WRONG_DATA);       // past 4 bytes
            }
        } else {
            Num.subU32(work, oldLimit, work, newLimit, work, oldLimit);
            if (Num.compareU32(session, S_BALANCE, work, oldLimit) < 0) {
                ISOException.throwIt(SW_INSUFFICIENT_FUNDS);
            }
            Num.subU32(session, S_BALANCE, work, oldLimit, work, W_INPUT);
        }
        // TAC at work[W_BLOCK] over balance after, online counter, new limit, type, terminal
        // id, date, time
        n = Util.arrayCopyNonAtomic(session, S_COUNTER, work, (short) (W_INPUT + 4), (short) 2);
        n = Util.arrayCopyNonAtomic(buf, limitAt, work, n, (short) 3);
        work[n++] = session[S_TYPE];
        n = Util.arrayCopyNonAtomic(session, S_TERMINAL, work, n, (short) 6);
        n = Util.arrayCopyNonAtomic(buf, dateAt, work, n, (short) 7);
        mac(tacKey, n, work, W_BLOCK);
        commit(ed, P_ONLINE, buf, mac2At, buf, dateAt, updateMeta, buf, limitAt);
        Util.arrayCopyNonAtomic(work, W_BLOCK, buf, (short) 0, (short) 4);
        send(apdu, (short) 4, lc);
    }

    /**
     * One JCSystem transaction: the new balance (work[W_INPUT], 4 bytes), the counter + 1, the
     * new overdraft limit (3 bytes at limit[limitOff], an update only; limit null otherwise),
     * the proof (type, counter, the MAC at mac[macOff], the TAC or MAC3 at work[W_BLOCK]), the
     * log record (with date and time at dt[dtOff], 7 bytes) and the key's MAC-failure count
     * back to 0.
     */
    private void commit(byte[] purse, short counterAt, byte[] macSrc, short macOff, byte[] dt,
                        short dtOff, byte[] meta, byte[] limit, short limitOff) {
        short slot = logCount == 0 ? 0 : (short) ((short) (logNewest + 1) % LOG_RECORDS);
        short r = (short) (slot * RECORD_SIZE);
        JCSystem.beginTransaction();
        Util.arrayCopy(work, W_INPUT, purse, P_BALANCE, (short) 4);
        Util.setShort(purse, counterAt, (short) (Util.getShort(purse, counterAt) + 1));
        if (limit != null) {
            Util.arrayCopy(limit, limitOff, purse, P_OVERDRAFT, (short) 3);
        }
        proof[PR_PRESENT] = 1;
        proof[PR_TYPE] = session[S_TYPE];
        Util.arrayCopy(session, S_COUNTER, proof, PR_COUNTER, (short) 2);
        Util.arrayCopy(macSrc, macOff, proof, PR_MAC, (short) 4);
        Util.arrayCopy(work, W_BLOCK, proof, PR_TAC, (short) 4);
        // record: counter 2, overdraft limit 3, amount 4, type 1, terminal id 6, date 4, time 3;
        // the counter INITIALIZE answered, or (log counter "after") the one after the increment
        if (logCounterAfter) {
            Util.arrayCopy(purse, counterAt, log, r, (short) 2);
        } else {
            Util.arrayCopy(session, S_COUNTER, log, r, (short) 2);
        }
        Util.arrayCopy(purse, P_OVERDRAFT, log, (short) (r + 2), (short) 3);
        Util.arrayCopy(session, S_AMOUNT, log, (short) (r + 5), (short) 4);
        log[(short) (r + 9)] = session[S_TYPE];
        Util.arrayCopy(session, S_TERMINAL, log, (short) (r + 10), (short) 6);
        Util.arrayCopy(dt, dtOff, log, (short) (r + 16), (short) 7);
        logNewest = (byte) slot;
        if (logCount < LOG_RECORDS) {
            logCount++;
        }
        meta[(short) ((short) (session[S_SLOT] * K_SIZE) + K_FAILURES)] = 0;
        JCSystem.commitTransaction();
    }

    // --- GET TRANSACTION PROVE, GET BALANCE, GET DATA, READ BINARY, READ RECORD --------------
    private void getTransactionProve(APDU apdu) {
        byte[] buf = apdu.getBuffer();
        byte type = buf[ISO7816.OFFSET_P2];
        if (buf[ISO7816.OFFSET_P1] != 0 || type < 1 || type > 9 || type == 8) {
            ISOException.throwIt(ISO7816.SW_INCORRECT_P1P2);
        }
        short lc = receive(apdu, true);
        if (lc != 2) {
            ISOException.throwIt(ISO7816.SW_WRONG_LENGTH);
        }
        if (proof[PR_PRESENT] == 0 || proof[PR_TYPE] != type
                || Util.arrayCompare(proof, PR_COUNTER, buf, ISO7816.OFFSET_CDATA, (short) 2)
                != 0) {
            ISOException.throwIt(SW_NO_SUCH_PROOF);
        }
        Util.arrayCopyNonAtomic(proof, PR_MAC, buf, (short) 0, (short) 8);
        send(apdu, (short) 8, lc);
    }

    private void getBalance(APDU apdu) {
        byte[] buf = apdu.getBuffer();
        if (buf[ISO7816.OFFSET_P1] != 0) {
            ISOException.throwIt(ISO7816.SW_INCORRECT_P1P2);
        }
        byte p2 = buf[ISO7816.OFFSET_P2];
        if (receive(apdu, false) != 0) {
            ISOException.throwIt(ISO7816.SW_WRONG_LENGTH);
        }
        short le = apdu.setOutgoing();
        if (le != 0 && le != 4 && le != 256) {
            ISOException.throwIt((short) 0x6C04);
        }
        byte[] purse = purseFor(p2);
        Util.arrayCopyNonAtomic(purse, P_BALANCE, buf, (short) 0, (short) 4);
        apdu.setOutgoingLength((short) 4);
        apdu.sendBytes((short) 0, (short) 4);
    }

    private void getData(APDU apdu) {
        byte[] buf = apdu.getBuffer();
        if (buf[ISO7816.OFFSET_P1] == 0 && buf[ISO7816.OFFSET_P2] == 0) {
            getUid(apdu);
            return;
        }
        if (buf[ISO7816.OFFSET_P1] != (byte) 0x9F || buf[ISO7816.OFFSET_P2] != 0x77) {
            ISOException.throwIt(SW_DATA_NOT_FOUND);
        }
        short lc = receive(apdu, false);
        if (lc != 0) {
            ISOException.throwIt(ISO7816.SW_WRONG_LENGTH);
        }
        buf[0] = (byte) 0x9F;
        buf[1] = 0x77;
        buf[2] = 0x04;
        Util.arrayCopyNonAtomic(balanceLimit, (short) 0, buf, (short) 3, (short) 4);
        send(apdu, (short) 7, lc);
    }

    /** GET DATA 00 00: the card's UID, when personalised with one (else 6A88). */
    private void getUid(APDU apdu) {
        if (uidLength == 0) {
            ISOException.throwIt(SW_DATA_NOT_FOUND);
        }
        if (receive(apdu, false) != 0) {
            ISOException.throwIt(ISO7816.SW_WRONG_LENGTH);
        }
        short le = apdu.setOutgoing();
        if (le != 0 && le != 256 && le != uidLength) {
            ISOException.throwIt((short) (0x6C00 | uidLength));
        }
        byte[] buf = apdu.getBuffer();
        Util.arrayCopyNonAtomic(uid, (short) 0, buf, (short) 0, uidLength);
        apdu.setOutgoingLength(uidLength);
        apdu.sendBytes((short) 0, uidLength);
    }

    private void readBinary(APDU apdu) {
        byte[] buf = apdu.getBuffer();
        byte p1 = buf[ISO7816.OFFSET_P1];
        if ((p1 & 0x80) == 0) {
            ISOException.throwIt(ISO7816.SW_FILE_NOT_FOUND);    // files are addressed by SFI
        }
        if ((p1 & 0x60) != 0) {
            ISOException.throwIt(ISO7816.SW_INCORRECT_P1P2);
        }
        if (receive(apdu, false) != 0) {
            ISOException.throwIt(ISO7816.SW_WRONG_LENGTH);
        }
        byte[] file;
        short sfi = (short) (p1 & 0x1F);
        if (sfi == SFI_PUBLIC_DATA) {
            file = publicData;
        } else if (sfi == SFI_HOLDER_DATA) {
            file = holderData;
        } else {
            ISOException.throwIt(ISO7816.SW_FILE_NOT_FOUND);
            return;
        }
        short offset = (short) (buf[ISO7816.OFFSET_P2] & 0xFF);
        short size = (short) file.length;
        if (offset >= size) {
            ISOException.throwIt(ISO7816.SW_WRONG_P1P2);
        }
        short len = (short) (size - offset);
        short le = apdu.setOutgoing();
        if (le != 0 && le < len) {
            len = le;
        }
        Util.arrayCopyNonAtomic(file, offset, buf, (short) 0, len);
        apdu.setOutgoingLength(len);
        apdu.sendBytes((short) 0, len);
    }

    private void readRecord(APDU apdu) {
        byte[] buf = apdu.getBuffer();
        short n = (short) (buf[ISO7816.OFFSET_P1] & 0xFF);
        short p2 = (short) (buf[ISO7816.OFFSET_P2] & 0xFF);
        if ((short) (p2 & 0x07) != 0x04 || n == 0) {
            ISOException.throwIt(ISO7816.SW_INCORRECT_P1P2);
        }
        if (receive(apdu, false) != 0) {
            ISOException.throwIt(ISO7816.SW_WRONG_LENGTH);
        }
        if ((short) (p2 >> 3) != SFI_LOG) {
            ISOException.throwIt(ISO7816.SW_FILE_NOT_FOUND);
        }
        short le = apdu.setOutgoing();
        if (le != 0 && le != RECORD_SIZE && le != 256) {
            ISOException.throwIt((short) (0x6C00 | RECORD_SIZE));
        }
        if (n > logCount) {
            ISOException.throwIt(ISO7816.SW_RECORD_NOT_FOUND);
        }
        short slot = (short) ((short) (logNewest - (short) (n - 1) + LOG_RECORDS) % LOG_RECORDS);
        Util.arrayCopyNonAtomic(log, (short) (slot * RECORD_SIZE), buf, (short) 0, RECORD_SIZE);
        apdu.setOutgoingLength(RECORD_SIZE);
        apdu.sendBytes((short) 0, RECORD_SIZE);
    }

    // --- VERIFY, CHANGE PIN -----------------------------------------------------------------
    private void verify(APDU apdu) {
        byte[] buf = apdu.getBuffer();
        if (buf[ISO7816.OFFSET_P1] != 0 || buf[ISO7816.OFFSET_P2] != 0) {
            ISOException.throwIt(ISO7816.SW_INCORRECT_P1P2);
        }
        short lc = receive(apdu, true);
        if (lc == 0) {                       // the tries left
            if (pinTriesLeft == 0) {
                ISOException.throwIt(SW_BLOCKED);
            }
            if (session[S_PIN_OK] != 0) {
                return;
            }
            ISOException.throwIt((short) (0x63C0 | (pinTriesLeft & 0xFF)));
        }
        if (lc < 2 || lc > 6) {
            ISOException.throwIt(ISO7816.SW_WRONG_LENGTH);
        }
        checkPin(buf, ISO7816.OFFSET_CDATA, lc);
    }

    /** The try is counted before the comparison (a power cut during it cannot save a try);
     * a match gives the tries back and opens the ED until the purse is deselected. */
    private void checkPin(byte[] candidate, short off, short len) {
        if (pinLength == 0) {
            ISOException.throwIt(ISO7816.SW_CONDITIONS_NOT_SATISFIED);
        }
        if (pinTriesLeft == 0) {
            ISOException.throwIt(SW_BLOCKED);
        }
        pinTriesLeft--;
        byte diff = (byte) (len == pinLength ? 0 : 1);
        short n = len < pinLength ? len : pinLength;
        for (short i = 0; i < n; i++) {
            diff |= (byte) (candidate[(short) (off + i)] ^ pin[i]);
        }
        if (diff == 0) {
            pinTriesLeft = pinTryLimit;
            session[S_PIN_OK] = 1;
            return;
        }
        session[S_PIN_OK] = 0;
        if (pinTriesLeft == 0) {
            ISOException.throwIt(SW_BLOCKED);
        }
        ISOException.throwIt((short) (0x63C0 | (pinTriesLeft & 0xFF)));
    }

    /** CHANGE PIN 80 5E 01 00: old PIN || FF || new PIN, both BCD. */
    private void changePin(APDU apdu) {
        byte[] buf = apdu.getBuffer();
        if (buf[ISO7816.OFFSET_P1] != 0x01 || buf[ISO7816.OFFSET_P2] != 0) {
            ISOException.throwIt(ISO7816.SW_INCORRECT_P1P2);
        }
        short lc = receive(apdu, true);
        short start = ISO7816.OFFSET_CDATA;
        short sep = -1;
        for (short i = 0; i < lc; i++) {
            if (buf[(short) (start + i)] == (byte) 0xFF) {
                sep = i;
                break;
            }
        }
        short newLen = (short) (lc - sep - 1);
        if (sep < 2 || sep > 6 || newLen < 2 || newLen > 6) {
            ISOException.throwIt(ISO7816.SW_WRONG_LENGTH);
        }
        short newAt = (short) (start + sep + 1);
        // digits: the new PIN's nibbles without its trailing F nibbles, 4..12 of them, all 0-9
        short digits = (short) (newLen * 2);
        while (digits > 0 && nibble(buf, newAt, (short) (digits - 1)) == 0x0F) {
            digits--;
        }
        if (digits < 4 || digits > 12) {
            ISOException.throwIt(ISO7816.SW_WRONG_DATA);
        }
        for (short i = 0; i < digits; i++) {
            if (nibble(buf, newAt, i) > 9) {
                ISOException.throwIt(ISO7816.SW_WRONG_DATA);
            }
        }
        checkPin(buf, start, sep);
        short bytes = (short) ((short) (digits + 1) / 2);
        JCSystem.beginTransaction();
        Util.arrayCopy(buf, newAt, pin, (short) 0, bytes);
        if ((short) (digits & 1) != 0) {
            pin[(short) (bytes - 1)] |= 0x0F;
        }
        pinLength = (byte) bytes;
        JCSystem.commitTransaction();
    }

    private static short nibble(byte[] b, short off, short i) {
        byte v = b[(short) (off + (short) (i >> 1))];
        return (short) ((i & 1) == 0 ? (v >> 4) & 0x0F : v & 0x0F);
    }

    // --- personalisation (until END PERSONALISATION) ----------------------------------------
    private void personalisation(APDU apdu, byte cla, byte ins) {
        if (cla != CLA_PBOC || (ins != INS_PUT_PERSO && ins != INS_END_PERSO)) {
            ISOException.throwIt(ISO7816.SW_CONDITIONS_NOT_SATISFIED);
        }
        byte[] buf = apdu.getBuffer();
        short lc = apdu.setIncomingAndReceive();
        byte p1 = buf[ISO7816.OFFSET_P1];
        byte p2 = buf[ISO7816.OFFSET_P2];
        short d = ISO7816.OFFSET_CDATA;
        if (ins == INS_END_PERSO) {
            if (p1 != 0 || p2 != 0) {
                ISOException.throwIt(ISO7816.SW_INCORRECT_P1P2);
            }
            if (lc != 0) {
                ISOException.throwIt(ISO7816.SW_WRONG_LENGTH);
            }
            if (personalised != NEED_ALL
                    || (macScheme == SCHEME_CHANGSHA_METRO && uidLength != METRO_UID_SIZE)) {
                ISOException.throwIt(ISO7816.SW_CONDITIONS_NOT_SATISFIED);
            }
            locked = true;
            return;
        }
        switch (p1) {
            case PI_LABEL:
                need(lc, (short) 0, LABEL_MAX);
                Util.arrayCopy(buf, d, label, (short) 0, lc);
                labelLength = (byte) lc;
                return;
            case PI_CURRENCY:
                need(lc, (short) 3, (short) 3);
                Util.arrayCopy(buf, d, currency, (short) 0, lc);
                personalised |= NEED_CURRENCY;
                return;
            case PI_PUBLIC_DATA:
                need(lc, PUBLIC_DATA_SIZE, PUBLIC_DATA_SIZE);
                Util.arrayCopy(buf, d, publicData, (short) 0, lc);
                personalised |= NEED_PUBLIC;
                return;
            case PI_HOLDER_DATA:
                need(lc, HOLDER_DATA_SIZE, HOLDER_DATA_SIZE);
                Util.arrayCopy(buf, d, holderData, (short) 0, lc);
                personalised |= NEED_HOLDER;
                return;
            case PI_BALANCE_LIMIT:
                need(lc, (short) 4, (short) 4);
                Util.arrayCopy(buf, d, balanceLimit, (short) 0, lc);
                personalised |= NEED_LIMIT;
                return;
            case PI_PURCHASE_KEY:
                putKey(buf, lc, purchaseMeta, purchaseKeys);
                return;
            case PI_LOAD_KEY:
                putKey(buf, lc, loadMeta, loadKeys);
                return;
            case PI_UNLOAD_KEY:
                putKey(buf, lc, unloadMeta, unloadKeys);
                return;
            case PI_UPDATE_KEY:
                putKey(buf, lc, updateMeta, updateKeys);
                return;
            case PI_LOG_COUNTER:
                // 00: the counter INITIALIZE answered (default), 01: the one after the increment
                need(lc, (short) 1, (short) 1);
                if (buf[d] != 0 && buf[d] != 1) {
                    ISOException.throwIt(ISO7816.SW_WRONG_DATA);
                }
                logCounterAfter = buf[d] == 1;
                return;
            case PI_MAC_SCHEME:
                // 00: pboc (default), 01: changsha-metro (END then needs a 9-byte UID)
                need(lc, (short) 1, (short) 1);
                if (buf[d] != SCHEME_PBOC && buf[d] != SCHEME_CHANGSHA_METRO) {
                    ISOException.throwIt(ISO7816.SW_WRONG_DATA);
                }
                macScheme = buf[d];
                return;
            case PI_TAC_KEY:
                // the TAC is keyed with DTK left xor right: only that 8-byte key is kept
                need(lc, (short) 16, (short) 16);
                for (short i = 0; i < 8; i++) {
                    buf[(short) (d + i)] ^= buf[(short) (d + 8 + i)];
                }
                tacKey.setKey(buf, d);
                Util.arrayFillNonAtomic(buf, d, (short) 16, (byte) 0);
                personalised |= NEED_TAC;
                return;
            case PI_PIN:
                // try limit 1, tries left 1, PIN (BCD, 0..6 bytes: none for no PIN)
                need(lc, (short) 2, (short) 8);
                if (buf[(short) (d + 1)] > buf[d] || buf[d] < 0 || buf[(short) (d + 1)] < 0) {
                    ISOException.throwIt(ISO7816.SW_WRONG_DATA);
                }
                pinTryLimit = buf[d];
                pinTriesLeft = buf[(short) (d + 1)];
                Util.arrayCopy(buf, (short) (d + 2), pin, (short) 0, (short) (lc - 2));
                pinLength = (byte) (lc - 2);
                Util.arrayFillNonAtomic(buf, d, lc, (byte) 0);
                return;
            case PI_MAC_FAILURE_LIMIT:
                need(lc, (short) 1, (short) 1);
                if (buf[d] == 0) {
                    ISOException.throwIt(ISO7816.SW_WRONG_DATA);
                }
                macFailureLimit = buf[d];
                return;
            case PI_PURSE:
                need(lc, PURSE_SIZE, PURSE_SIZE);
                if (p2 != PURSE_ED && p2 != PURSE_EP) {
                    ISOException.throwIt(ISO7816.SW_INCORRECT_P1P2);
                }
                Util.arrayCopy(buf, d, p2 == PURSE_ED ? ed : ep, (short) 0, PURSE_SIZE);
                return;
            case PI_FIXED_RANDOM:
                need(lc, (short) 4, (short) 4);
                Util.arrayCopy(buf, d, fixedRandom, (short) 1, (short) 4);
                fixedRandom[0] = 1;
                return;
            case PI_LOG_RECORD:
                // appended as the newest record: send the log oldest first
                need(lc, RECORD_SIZE, RECORD_SIZE);
                short slot = logCount == 0 ? 0
                        : (short) ((short) (logNewest + 1) % LOG_RECORDS);
                Util.arrayCopy(buf, d, log, (short) (slot * RECORD_SIZE), RECORD_SIZE);
                logNewest = (byte) slot;
                if (logCount < LOG_RECORDS) {
                    logCount++;
                }
                return;
            case PI_PROOF:
                need(lc, (short) 11, (short) 11);
                Util.arrayCopy(buf, d, proof, PR_TYPE, (short) 11);
                proof[PR_PRESENT] = 1;
                return;
            case PI_UID:
                need(lc, (short) 1, UID_MAX);
                Util.arrayCopy(buf, d, uid, (short) 0, lc);
                uidLength = (byte) lc;
                return;
            default:
                ISOException.throwIt(ISO7816.SW_INCORRECT_P1P2);
        }
    }

    private static void need(short lc, short min, short max) {
        if (lc < min || lc > max) {
            ISOException.throwIt(ISO7816.SW_WRONG_LENGTH);
        }
    }

    /** index 1, version 1, algorithm id 1, MAC failures 1, key 16; the slot of that index or
     * a free one. */
    private static void putKey(byte[] buf, short lc, byte[] meta, DESKey[] keys) {
        need(lc, (short) 20, (short) 20);
        short d = ISO7816.OFFSET_CDATA;
        short slot = findKey(meta, buf[d]);
        if (slot < 0) {
            short slots = (short) keys.length;
            for (short i = 0; i < slots; i++) {
                if (meta[(short) (i * K_SIZE + K_USED)] == 0) {
                    slot = i;
                    break;
                }
            }
        }
        if (slot < 0) {
            ISOException.throwIt(SW_NOT_ENOUGH_MEMORY);
        }
        keys[slot].setKey(buf, (short) (d + 4));
        Util.arrayFillNonAtomic(buf, (short) (d + 4), (short) 16, (byte) 0);
        short m = (short) (slot * K_SIZE);
        meta[(short) (m + K_INDEX)] = buf[d];
        meta[(short) (m + K_VERSION)] = buf[(short) (d + 1)];
        meta[(short) (m + K_ALGORITHM)] = buf[(short) (d + 2)];
        meta[(short) (m + K_FAILURES)] = buf[(short) (d + 3)];
        meta[(short) (m + K_USED)] = 1;
    }
}

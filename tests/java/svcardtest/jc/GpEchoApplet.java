package svcardtest.jc;

import javacard.framework.APDU;
import javacard.framework.Applet;
import javacard.framework.ISO7816;
import javacard.framework.ISOException;
import javacard.framework.Util;

/**
 * A tiny GlobalPlatform-style Java Card applet of svcard's tests, for the real jCardSim: install
 * reads the instance AID from the install data (len | AID | len | privileges | len | parameters,
 * from bOffset on) and registers under it, as ordinary applets do. The same commands as
 * AppletStandIn: INS 10 answers the application parameters, INS 12 the whole install data as
 * install() saw it, INS 14 bOffset and the install array's length (two bytes each), INS 20
 * stores its data (P1 must be 00, else 6A86), INS 22 answers it.
 */
public class GpEchoApplet extends Applet {
    private final byte[] installData;
    private final byte[] params;
    private final byte[] where = new byte[4];
    private final byte[] stored = new byte[64];
    private short storedLength = 0;

    private GpEchoApplet(byte[] bArray, short bOffset, byte bLength) {
        installData = new byte[bLength];
        Util.arrayCopy(bArray, bOffset, installData, (short) 0, bLength);
        Util.setShort(where, (short) 0, bOffset);
        Util.setShort(where, (short) 2, (short) bArray.length);
        short privilegesAt = (short) (bOffset + 1 + bArray[bOffset]);
        short paramsAt = (short) (privilegesAt + 1 + bArray[privilegesAt]);
        params = new byte[bArray[paramsAt]];
        Util.arrayCopy(bArray, (short) (paramsAt + 1), params, (short) 0, bArray[paramsAt]);
    }

    public static void install(byte[] bArray, short bOffset, byte bLength) {
        new GpEchoApplet(bArray, bOffset, bLength)
            .register(bArray, (short) (bOffset + 1), bArray[bOffset]);
    }

    private static void send(APDU apdu, byte[] data, short length) {
        byte[] buffer = apdu.getBuffer();
        Util.arrayCopyNonAtomic(data, (short) 0, buffer, (short) 0, length);
        apdu.setOutgoingAndSend((short) 0, length);
    }

    public void process(APDU apdu) {
        if (selectingApplet()) {
            return;
        }
        byte[] buffer = apdu.getBuffer();
        switch (buffer[ISO7816.OFFSET_INS]) {
            case 0x10:
                send(apdu, params, (short) params.length);
                return;
            case 0x12:
                send(apdu, installData, (short) installData.length);
                return;
            case 0x14:
                send(apdu, where, (short) where.length);
                return;
            case 0x20:
                if (buffer[ISO7816.OFFSET_P1] != 0) {
                    ISOException.throwIt(ISO7816.SW_INCORRECT_P1P2);
                }
                short length = apdu.setIncomingAndReceive();
                if (length > stored.length) {
                    ISOException.throwIt(ISO7816.SW_WRONG_LENGTH);
                }
                Util.arrayCopy(buffer, ISO7816.OFFSET_CDATA, stored, (short) 0, length);
                storedLength = length;
                return;
            case 0x22:
                send(apdu, stored, storedLength);
                return;
            default:
                ISOException.throwIt(ISO7816.SW_INS_NOT_SUPPORTED);
        }
    }
}

package svcardtest;

/**
 * A STAND-IN for a GlobalPlatform-style Java Card applet, run by SimulatorStandIn (no javacard.*
 * classes needed): its static install reads the instance AID from the install data
 * (len | AID | len | privileges | len | parameters, from bOffset on) and registers under it, as
 * jc/GpEchoApplet does in the real jCardSim. Commands (any CLA): INS 10 answers the application
 * parameters, INS 12 the whole install data as install() saw it, INS 14 bOffset and the install
 * array's length (two bytes each), INS 20 stores its data (P1 must be 00, else 6A86), INS 22
 * answers what INS 20 stored.
 */
public class AppletStandIn {
    private final byte[] installData;
    private final byte[] params;
    private final byte[] where;
    private byte[] stored = new byte[0];

    protected AppletStandIn(byte[] bArray, short bOffset, byte bLength) {
        installData = copy(bArray, bOffset, bLength);
        where = new byte[] {(byte) (bOffset >> 8), (byte) bOffset, (byte) (bArray.length >> 8),
                            (byte) bArray.length};
        int aidLength = bArray[bOffset];
        int privilegesAt = bOffset + 1 + aidLength;
        int paramsAt = privilegesAt + 1 + bArray[privilegesAt];
        params = copy(bArray, paramsAt + 1, bArray[paramsAt]);
    }

    public static void install(byte[] bArray, short bOffset, byte bLength) {
        AppletStandIn applet = new AppletStandIn(bArray, bOffset, bLength);
        applet.register(bArray, (short) (bOffset + 1), bArray[bOffset]);
    }

    protected final void register(byte[] bArray, short bOffset, byte bLength) {
        StringBuilder hex = new StringBuilder();
        for (int i = 0; i < bLength; i++) {
            hex.append(String.format("%02X", bArray[bOffset + i]));
        }
        SimulatorStandIn.register(hex.toString(), this);
    }

    private static byte[] copy(byte[] from, int offset, int length) {
        byte[] out = new byte[length];
        System.arraycopy(from, offset, out, 0, length);
        return out;
    }

    private static byte[] withOk(byte[] data) {
        byte[] out = new byte[data.length + 2];
        System.arraycopy(data, 0, out, 0, data.length);
        out[data.length] = (byte) 0x90;
        return out;
    }

    /** One command APDU in, data || SW out. */
    public byte[] process(byte[] apdu) {
        switch (apdu[1] & 0xFF) {
            case 0x10:
                return withOk(params);
            case 0x12:
                return withOk(installData);
            case 0x14:
                return withOk(where);
            case 0x20:
                if (apdu[2] != 0) {
                    return new byte[] {0x6A, (byte) 0x86};
                }
                stored = apdu.length > 5 ? copy(apdu, 5, apdu[4] & 0xFF) : new byte[0];
                return new byte[] {(byte) 0x90, 0x00};
            case 0x22:
                return withOk(stored);
            default:
                return new byte[] {0x6D, 0x00};
        }
    }
}

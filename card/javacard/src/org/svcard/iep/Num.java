package org.svcard.iep;

/**
 * Unsigned 4-byte amounts and BCD dates and times, on byte arrays only (Java Card 2.2.2 has no
 * int on most chips, so every value here stays a byte array or a short).
 */
final class Num {

    private Num() {
    }

    /** Compares two unsigned big-endian 4-byte numbers: -1, 0 or 1. */
    static short compareU32(byte[] a, short aOff, byte[] b, short bOff) {
        for (short i = 0; i < 4; i++) {
            short x = (short) (a[(short) (aOff + i)] & 0xFF);
            short y = (short) (b[(short) (bOff + i)] & 0xFF);
            if (x != y) {
                return x < y ? (short) -1 : (short) 1;
            }
        }
        return 0;
    }

    /** out = a + b over 4 bytes; true when the sum does not fit 4 bytes (a carry out). */
    static boolean addU32(byte[] a, short aOff, byte[] b, short bOff, byte[] out, short outOff) {
        short carry = 0;
        for (short i = 3; i >= 0; i--) {
            short sum = (short) ((short) (a[(short) (aOff + i)] & 0xFF)
                    + (short) (b[(short) (bOff + i)] & 0xFF) + carry);
            out[(short) (outOff + i)] = (byte) sum;
            carry = (short) ((sum >> 8) & 1);
        }
        return carry != 0;
    }

    /** out = a - b over 4 bytes (the caller knows a >= b). */
    static void subU32(byte[] a, short aOff, byte[] b, short bOff, byte[] out, short outOff) {
        short borrow = 0;
        for (short i = 3; i >= 0; i--) {
            short diff = (short) ((short) (a[(short) (aOff + i)] & 0xFF)
                    - (short) (b[(short) (bOff + i)] & 0xFF) - borrow);
            out[(short) (outOff + i)] = (byte) diff;
            borrow = diff < 0 ? (short) 1 : (short) 0;
        }
    }

    /** The value 0..99 of one BCD byte, or -1 when a nibble is not a decimal digit. */
    static short bcd(byte b) {
        short hi = (short) ((b >> 4) & 0x0F);
        short lo = (short) (b & 0x0F);
        if (hi > 9 || lo > 9) {
            return -1;
        }
        return (short) (hi * 10 + lo);
    }

    /** A real calendar date in BCD YYYYMMDD (4 bytes). */
    static boolean validDate(byte[] d, short off) {
        short c = bcd(d[off]);
        short y = bcd(d[(short) (off + 1)]);
        short month = bcd(d[(short) (off + 2)]);
        short day = bcd(d[(short) (off + 3)]);
        if (c < 0 || y < 0 || month < 1 || month > 12 || day < 1) {
            return false;
        }
        short max = 31;
        if (month == 4 || month == 6 || month == 9 || month == 11) {
            max = 30;
        } else if (month == 2) {
            max = 28;
            boolean leap;
            if (y == 0) {
                leap = (short) (c % 4) == 0;     // a century year: leap when divisible by 400
            } else {
                leap = (short) (y % 4) == 0;
            }
            if (leap) {
                max = 29;
            }
        }
        return day <= max;
    }

    /** A real time of day in BCD hhmmss (3 bytes). */
    static boolean validTime(byte[] t, short off) {
        short h = bcd(t[off]);
        short m = bcd(t[(short) (off + 1)]);
        short s = bcd(t[(short) (off + 2)]);
        return h >= 0 && h < 24 && m >= 0 && m < 60 && s >= 0 && s < 60;
    }
}

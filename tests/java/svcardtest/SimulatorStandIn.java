package svcardtest;

import java.util.HashMap;
import java.util.HashSet;
import java.util.Map;
import java.util.Set;

/**
 * A STAND-IN for jCardSim's com.licel.jcardsim.base.Simulator, written for svcard's tests:
 * the same method names and shapes (installApplet, transmitCommand, getATR, reset), none of
 * jCardSim's behaviour. It answers SELECT for installed AIDs, reports how many Java threads have
 * called it (INS CC), and throws on INS EE so the bridge's exception mapping can be checked.
 */
public class SimulatorStandIn {
    private final Map<String, String> applets = new HashMap<>();
    private final Set<Long> callers = new HashSet<>();
    private String selected = null;

    private void seen() {
        callers.add(Thread.currentThread().getId());
    }

    public void installApplet(Object aid, Class<?> appletClass) {
        seen();
        applets.put(aid.toString(), appletClass.getName());
    }

    public byte[] getATR() {
        seen();
        return new byte[] {0x3B, 0x00};
    }

    public void reset() {
        seen();
        selected = null;
    }

    public byte[] transmitCommand(byte[] apdu) {
        seen();
        if (apdu.length < 4) {
            return new byte[] {0x67, 0x00};
        }
        int ins = apdu[1] & 0xFF;
        if (ins == 0xA4 && apdu.length >= 5) {
            StringBuilder hex = new StringBuilder();
            for (int i = 5; i < 5 + (apdu[4] & 0xFF) && i < apdu.length; i++) {
                hex.append(String.format("%02X", apdu[i]));
            }
            if (applets.containsKey(hex.toString())) {
                selected = hex.toString();
                return new byte[] {(byte) 0x90, 0x00};
            }
            return new byte[] {0x6A, (byte) 0x82};
        }
        if (selected == null) {
            return new byte[] {0x69, (byte) 0x85};
        }
        if (ins == 0xCC) {
            return new byte[] {(byte) callers.size(), (byte) 0x90, 0x00};
        }
        if (ins == 0xEE) {
            throw new IllegalStateException("stand-in failure on purpose");
        }
        return new byte[] {0x6D, 0x00};
    }
}

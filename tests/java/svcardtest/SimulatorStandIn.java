package svcardtest;

import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;
import java.util.HashMap;
import java.util.HashSet;
import java.util.Map;
import java.util.Set;

/**
 * A STAND-IN for jCardSim's com.licel.jcardsim.base.Simulator, written for svcard's tests:
 * the same method names and shapes (installApplet with and without install data,
 * transmitCommand, getATR, reset) and, like jCardSim, install data handed to the applet's static
 * install(byte[], short, byte) untouched (the two-argument installApplet gives an empty array)
 * and the instance kept under the AID it registers with. None of jCardSim's other behaviour: it
 * answers SELECT for registered AIDs, reports how many Java threads have called it (INS CC),
 * throws on INS EE so the bridge's exception mapping can be checked, and hands every other
 * command to the selected AppletStandIn.
 */
public class SimulatorStandIn {
    private static final ThreadLocal<SimulatorStandIn> INSTALLING = new ThreadLocal<>();

    private final Map<String, AppletStandIn> applets = new HashMap<>();
    private final Set<Long> callers = new HashSet<>();
    private AppletStandIn selected = null;
    private String registeredAid = null;

    private void seen() {
        callers.add(Thread.currentThread().getId());
    }

    /** Called by AppletStandIn.register during install. */
    static void register(String aidHex, AppletStandIn applet) {
        SimulatorStandIn simulator = INSTALLING.get();
        if (simulator == null || simulator.registeredAid != null) {
            throw new IllegalStateException("register outside install, or twice");
        }
        simulator.registeredAid = aidHex;
        simulator.applets.put(aidHex, applet);
    }

    public void installApplet(Object aid, Class<?> appletClass) {
        installApplet(aid, appletClass, new byte[0], (short) 0, (byte) 0);
    }

    public void installApplet(Object aid, Class<?> appletClass, byte[] bArray, short bOffset,
                              byte bLength) {
        seen();
        registeredAid = null;
        INSTALLING.set(this);
        try {
            Method install = appletClass.getMethod("install", byte[].class, short.class,
                                                   byte.class);
            install.invoke(null, bArray, bOffset, bLength);
        } catch (InvocationTargetException e) {
            throw new IllegalStateException("applet install failed: " + e.getCause(), e.getCause());
        } catch (ReflectiveOperationException e) {
            throw new IllegalStateException("no static install(byte[], short, byte): " + e);
        } finally {
            INSTALLING.remove();
        }
        if (registeredAid == null) {
            throw new IllegalStateException("the applet did not register");
        }
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
                selected = applets.get(hex.toString());
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
        return selected.process(apdu);
    }
}

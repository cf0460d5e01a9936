package svcardtest;

/** A STAND-IN for jCardSim's AIDUtil: an "AID" here is just its hex string. */
public final class AIDUtilStandIn {
    private AIDUtilStandIn() {
    }

    public static String create(String hex) {
        return hex.toUpperCase();
    }
}

package svcardtest;

/** A STAND-IN applet class: the stand-in simulator only records its name. */
public class AppletStandIn {
}

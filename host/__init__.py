"""Host software: terminals, servers and the ``svcard`` command line. Cards only via readers."""

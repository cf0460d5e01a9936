"""Trust between parties that never meet (seed 004): temporary certificates that carry only a
session's public key across two financial institutions (``certs.py``), and the FIG. 4 secure
delivery of a digital product through the trusted party (``delivery.py``, the library), carried
by the servers: the mediating agent's trusted-party role on its database (``party.py``), the
merchant agent's offers (``shop.py``), the customer agent's side (``buyer.py``) and its
commands (``commands.py``)."""

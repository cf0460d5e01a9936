"""The ``svcard`` command line: the group, and the commands that belong to no one system (card,
apdu, readers, trace, terminal, demo)."""

"""The electronic payment web server of seed 003: members, sessions, the wallet page."""

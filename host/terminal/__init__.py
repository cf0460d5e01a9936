"""The card side every system shares: command APDUs, the local terminal's conversation with a
purse card, the client journal, reader specs, and a server's refusal as a client sees it."""

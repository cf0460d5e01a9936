"""The IEP purse's commands, one module per command group, and the rules those groups share.

:class:`~svcard.card.iep.Iep` (``card/iep.py``) holds the purse's state and routes each command
APDU here by CLA and INS (and, for INITIALIZE, by P1 and P2). Each handler is a function
``handler(iep, cmd) -> answer data`` that refuses with :class:`~svcard.card.runtime.CardError`.

- :mod:`.session`: the INITIALIZE waiting for its completion, and what every INITIALIZE reads;
- :mod:`.lockout`: the count of consecutive wrong MACs per key, and the key lock it leads to;
- :mod:`.load`: INITIALIZE FOR LOAD, CREDIT FOR LOAD;
- :mod:`.purchase`: INITIALIZE FOR PURCHASE / CASH WITHDRAWAL, DEBIT FOR PURCHASE / CASH
  WITHDRAWAL;
- :mod:`.records`: the log and the proof of the last value transaction (READ RECORD, GET
  TRANSACTION PROVE);
- :mod:`.pin`: VERIFY, CHANGE PIN;
- :mod:`.queries`: GET BALANCE, GET DATA, READ BINARY.

Commands not written yet get modules of their own here: unload (``unload.py``), the
overdraft-limit update (``overdraft.py``) and the composite (CAPP) purchase
(``capp_purchase.py``, beside :mod:`.purchase`); PIN reload/unblock join :mod:`.pin`. Each new
INITIALIZE form is one more route in the Iep's INITIALIZE table.

This module imports nothing, so a command module can be imported on its own (the Iep imports
them; they import the Iep only for type hints).
"""

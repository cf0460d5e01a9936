"""Deposit-backed trading sessions (seed 004: FIG. 2 initiation, FIG. 3 conclusion):
a customer agent opens a session with a merchant agent through its account manager, which
reserves a deposit and hands it to the merchant operator's mediating trusted agent (the value
acquirer); purchases then run inside the deposit between customer and merchant only, paid by
PayWord hash-chain links under one signed commitment. ``money.py``: ISO 4217 amounts,
exchange tables, conversion with a rounding account; ``payword.py``: the hash chain."""

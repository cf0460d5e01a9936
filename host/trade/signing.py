"""Every trading-session message is signed by its sender's Ed25519 key (``cryptography``).

A message is a JSON object sent as its canonical text (sorted keys, no spaces, ASCII), so
the bytes signed are the bytes sent. The signature covers a domain label naming the message
kind, then those bytes: a signature made for one kind of message (an initiation, an
acknowledgement, a purchase order) never verifies as another. It travels in the
``X-Svcard-Signature`` header as hex; ``X-Svcard-Signer`` names the party whose key the
receiver must use (the receiver looks the key up itself: the header only says which).
"""

from __future__ import annotations

from ...protocols import signatures

# the mechanics, shared by every system (protocols/signatures.py)
SIGNATURE = signatures.SIGNATURE
SIGNER = signatures.SIGNER
SigningError = signatures.SigningError
canonical = signatures.canonical
public_from_hex = signatures.public_from_hex
public_of = signatures.public_of
read_private_key = signatures.read_private_key
sign = signatures.sign
signed = signatures.signed
verify = signatures.verify
write_private_key = signatures.write_private_key
new_key = signatures.new_pair


# the domain labels, one per message kind (docs/trade.md lists them)
INITIATION = b"svcard-trade-initiation/1\n"     # customer agent -> customer account manager
AMENDED = b"svcard-trade-amended/1\n"           # account manager -> mediating trusted agent
INFORMATION = b"svcard-trade-information/1\n"   # mediating agent -> merchant agent
MERCHANT_ACK = b"svcard-trade-merchant-ack/1\n"  # merchant agent -> mediating agent
AGENT_ACK = b"svcard-trade-agent-ack/1\n"       # mediating agent -> account manager
LOOKUP = b"svcard-trade-lookup/1\n"             # account manager -> mediating agent
TABLE = b"svcard-trade-table/1\n"               # a bank's exchange table, to the devices
OPENED = b"svcard-trade-opened/1\n"             # account manager -> customer agent
COMMITMENT = b"svcard-trade-commitment/1\n"     # customer (session key) -> merchant
ORDER = b"svcard-trade-order/1\n"               # customer (session key): sign(order)^c
TERMINATE = b"svcard-trade-terminate/1\n"       # customer (session key) -> merchant
RECORD = b"svcard-trade-record/1\n"             # a side's transaction record (FIG. 3)
FORWARD = b"svcard-trade-forward/1\n"           # account manager -> mediating agent
END = b"svcard-trade-end/1\n"                   # mediating agent -> merchant: end it
CLEARING = b"svcard-trade-clearing/1\n"         # mediating agent -> both account managers
RECEIPT = b"svcard-trade-receipt/1\n"           # an account manager took the clearing

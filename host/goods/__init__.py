"""Digital goods bought on a communication device and stored onto the card (seed 000, claims 1,
16, 23): the merchant server, the payment server, the authentication server, the financial
institution and the fulfilment server (``server/``, each its own process), and the device
(``device.py``). Messages between parties are Ed25519-signed canonical JSON (``wire.py``);
docs/goods.md describes the flow, the messages and the attacker's view."""

"""The local card helper (``svcard helper``): a shop's web page pays with the card in this
computer's reader through it.

The helper listens on loopback only. It answers only the web origins it was told to trust
(``--allow-origin``) and only requests that carry its pairing token. Its small JSON API runs
the whole payment client of :mod:`..pay.client` (the journal included) with the card in its
reader spec, and it asks for the ED purse's PIN itself, so the page never sees a key or a PIN.

* :mod:`.pairing`: the pairing token file, origins, loopback addresses;
* :mod:`.app`: the HTTP API (origin guard, CORS, token, one payment at a time);
* :mod:`.payments`: running one payment in the background and its live state;
* :mod:`.cli`: the ``svcard helper`` command.
"""

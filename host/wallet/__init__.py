"""Anonymous prepaid cards in a browser wallet (seed 003): the electronic payment web server
(``web/``), the payment gateway (``gateway/``), the financial system (``fin/``) and a demo mall
(``mall.py``). FIG. 1-3 (registration, issuing, charging) and FIG. 4 (embodiment 1: the
affiliated mall, whose approval request the gateway matches against the wallet's purchase).
"""

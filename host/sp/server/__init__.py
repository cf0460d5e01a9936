"""The SP server: the order steps (``orders.py``, ``payment.py``) and the app."""

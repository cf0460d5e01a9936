"""The service provider of seed 001 (WO 02/14973): customers without a purse card order through
the SP, which pays the merchant from its own purse pool as any card holder would (FIG. 3A) and
bills them on its regular bill. ``server/`` is the SP server, ``billing.py`` its billing unit,
``purses/`` the pool of purse cards it pays with."""

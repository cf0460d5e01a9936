"""The financial system of seed 003: prepaid card balances, accounts, credit cards."""

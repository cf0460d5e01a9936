"""The payment gateway of seed 003: the members' wallets and embodiment 1's matching."""

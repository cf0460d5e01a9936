"""The bank: customer accounts, load orders and their settlement, and its database."""

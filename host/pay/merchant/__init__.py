"""The merchant server: checkout, orders and goods, and its order database."""

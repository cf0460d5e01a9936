"""Loading a purse over the Internet (seed 002, FIG. 17-18): the bank, the load server with its
load HSMs, the client side (``svcard load``) and their databases."""

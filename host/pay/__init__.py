"""Card payment over the Internet (seed 002, FIG. 5-8): the payment server with its PSAM pool, the
merchant server, the client terminal (``svcard pay``) and their databases."""

"""The load server: load requests, results and probes with a pool of load HSMs, and its load
database."""

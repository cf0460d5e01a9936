"""Every system together on loopback: ``svcard demo``'s story and the system the tests and
benchmarks start."""

"""What every system shares on its server side and its command line: reading configuration files,
request reading and refusals, the database helpers, the pool of readers, serving an ASGI app on
loopback, and the command line's exit codes and ``--json``. Imports no other host package."""

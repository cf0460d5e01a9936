"""What every server shares: configuration files, request reading and refusals, the database
helpers, the pool of readers, and serving an ASGI app on loopback. Imports no system."""

"""sidegate's policies, each an aiohttp middleware factory taking typed settings."""

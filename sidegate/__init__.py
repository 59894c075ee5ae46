"""sidegate: an embeddable LLM API gateway for aiohttp."""

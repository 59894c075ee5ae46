"""sidegate: an embeddable LLM API gateway for aiohttp.

The public surface, imported lazily so that ``import sidegate.config`` stays free of aiohttp.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_app": "sidegate.proxy.app",
    "setup": "sidegate.proxy.app",
    "reload_config": "sidegate.proxy.reload",
    "load_config": "sidegate.config",
    "ConfigError": "sidegate.config",
    "SidegateConfig": "sidegate.config.models",
    "Call": "sidegate.middlewares.contract",
    "Principal": "sidegate.middlewares.contract",
    "CALL_KEY": "sidegate.middlewares.contract",
    "PRINCIPAL_KEY": "sidegate.middlewares.contract",
    "SidegateError": "sidegate.middlewares.errors",
    "error_middleware": "sidegate.middlewares.errors",
    "access_log_middleware": "sidegate.middlewares.access_log",
    "auth_middleware": "sidegate.middlewares.auth",
    "limits_middleware": "sidegate.middlewares.limits",
    "embeddings_cache_middleware": "sidegate.middlewares.embeddings_cache",
    "ratelimit_headers_middleware": "sidegate.middlewares.ratelimit_headers",
    "retry_middleware": "sidegate.middlewares.retry",
    "key_rotation_middleware": "sidegate.middlewares.keys",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sidegate' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

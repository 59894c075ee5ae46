"""Configuration: the YAML contract, loading, interpolation, errors that point at lines.

:func:`load_config` turns a YAML file into a validated :class:`SidegateConfig` or raises
:class:`ConfigError` listing every :class:`Problem` with its YAML path and line.
"""

from .loader import load_config, load_config_text
from .models import (
    Alias,
    ApiKeyEntry,
    AuthConfig,
    Budget,
    CacheConfig,
    EmbeddingsCacheConfig,
    JwtConfig,
    MemoryStore,
    ModelEntry,
    Price,
    RateLimit,
    RateLimitHeadersConfig,
    RedisStore,
    RetryConfig,
    ServerConfig,
    SidegateConfig,
    SqliteStore,
    Team,
    Timeouts,
    Upstream,
    UpstreamKey,
)
from .problems import ConfigError, Problem
from .schema import config_json_schema

__all__ = [
    "Alias",
    "ApiKeyEntry",
    "AuthConfig",
    "Budget",
    "CacheConfig",
    "ConfigError",
    "EmbeddingsCacheConfig",
    "JwtConfig",
    "MemoryStore",
    "ModelEntry",
    "Price",
    "Problem",
    "RateLimit",
    "RateLimitHeadersConfig",
    "RedisStore",
    "RetryConfig",
    "ServerConfig",
    "SidegateConfig",
    "SqliteStore",
    "Team",
    "Timeouts",
    "Upstream",
    "UpstreamKey",
    "config_json_schema",
    "load_config",
    "load_config_text",
]

"""Config section of the embeddings cache: ``cache.embeddings``.

Merged into :class:`~sidegate.config.models.CacheConfig`. The middleware reads it through a
Protocol of its own (:class:`sidegate.middlewares.embeddings_cache.EmbeddingsCacheSettings`), so
nothing here imports aiohttp or redis.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

__all__ = ["EmbeddingsCacheBackend", "EmbeddingsCacheConfig", "EmbeddingsCacheScope"]

EmbeddingsCacheBackend = Literal["memory", "redis"]
EmbeddingsCacheScope = Literal["team", "shared"]
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class EmbeddingsCacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ttl_s: PositiveInt = Field(
        default=86_400, description="How long a cached vector lives after it was last stored."
    )
    max_bytes: PositiveInt = Field(
        default=268_435_456,
        description="memory backend: at most this many bytes of vectors (as kept, see "
        "float_answers) and keys; "
        "least recently used entries make room. Redis is bounded by its own maxmemory.",
    )
    scope: EmbeddingsCacheScope = Field(
        default="team",
        description="team: each team has its own entries (no cross-team probing); "
        "shared: one cache for every team.",
    )
    float_answers: Literal["text", "float32"] = Field(
        default="text",
        description="How a vector the upstream sent as JSON numbers is kept. text: as its JSON "
        "numbers (about 4.4x the bytes of float32), copied into a float answer as they are, the "
        "cheapest to serve; float32: 4 bytes a number, formatted anew on every float hit "
        "(about 1 ms of CPU for 16 x 1536). base64 answers are always kept as float32.",
    )
    backend: EmbeddingsCacheBackend = Field(
        default="memory",
        description="memory: per process; redis: shared by every replica using redis_url.",
    )
    redis_url: str | None = Field(
        default=None, description="The Redis of the redis backend (required with it)."
    )
    redis_prefix: str = Field(
        default="sg:emb:", min_length=1, description="Prefix of the redis backend's keys."
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(_REDIS_SCHEMES):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return url

    @model_validator(mode="after")
    def _redis_needs_url(self) -> EmbeddingsCacheConfig:
        if self.backend == "redis" and self.redis_url is None:
            raise ValueError("backend 'redis' needs a redis_url")
        if self.backend == "memory" and self.redis_url is not None:
            raise ValueError("redis_url is only used with backend: redis")
        return self

"""Pydantic models of the YAML contract (see DESIGN.md).

Every section forbids unknown keys; secrets are ``SecretStr``. Sections owned by later work
(auth, teams, pricing, retry, cache, rate-limit headers) are modelled with what the contract
names today and grow with their policies. Cross-references between sections (aliases, team
model lists) are checked by :mod:`sidegate.config.checks` so that every problem is reported at once.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from .auth import JwtConfig
from .budgets import Budget, BudgetSettings, Price, RateLimit, TeamLimits
from .cache import EmbeddingsCacheConfig
from .resilience import (
    KeyRotationFields,
    RateLimitHeadersConfig,
    RetryConfig,
    UpstreamRotationFields,
)

__all__ = [
    "Alias",
    "ApiKeyEntry",
    "AuthConfig",
    "Budget",
    "CacheConfig",
    "EmbeddingsCacheConfig",
    "JwtConfig",
    "MemoryStore",
    "ModelEntry",
    "Price",
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
]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: PositiveInt = 26_214_400
    shutdown_grace_s: NonNegativeFloat = Field(
        default=30.0,
        description="On SIGTERM: how long requests and streams in flight may take to finish.",
    )
    watch_config: bool = Field(
        default=True, description="Reload when the config file changes on disk."
    )
    watch_interval_s: PositiveFloat = 1.0


class MemoryStore(Section):
    kind: Literal["memory"]


_BATCH_S = Field(
    default=0.0,
    ge=0,
    le=60,
    description=(
        "0: every request's admission and settlement are written before it is answered. "
        "Above 0: each process admits from leases (slices of budgets and rate windows it "
        "reserves in the store) and writes settlements in batches every batch_s seconds; "
        "a process that dies loses the spend it had not written yet."
    ),
)


class SqliteStore(Section):
    kind: Literal["sqlite"]
    path: str = "sidegate.db"
    batch_s: float = _BATCH_S


class RedisStore(Section):
    kind: Literal["redis"]
    url: str = "redis://127.0.0.1:6379/0"
    batch_s: float = _BATCH_S


Store = Annotated[MemoryStore | SqliteStore | RedisStore, Field(discriminator="kind")]


class UpstreamKey(Section, KeyRotationFields):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    secret: SecretStr


class Timeouts(Section):
    connect_s: PositiveFloat = Field(
        default=10.0, description="Establishing the TCP/TLS connection."
    )
    read_s: PositiveFloat = Field(
        default=120.0, description="Idle time between two reads (a stream may run longer in total)."
    )
    total_s: PositiveFloat = Field(default=600.0, description="The whole upstream exchange.")


class ModelEntry(Section):
    """A model (Meridian) or service (Meivan) an upstream serves; a bare string is the id."""

    id: str = Field(min_length=1)
    capabilities: list[str] = Field(default_factory=list)
    max_context_tokens: PositiveInt | None = None
    regions: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"id": value}
        if not isinstance(value, dict | ModelEntry):
            raise ValueError("expected a model id or a mapping with 'id'")
        return value

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"anyOf": [{"type": "string", "minLength": 1}, handler(core_schema)]}


class Upstream(Section, UpstreamRotationFields):
    kind: Literal["meridian", "meivan"]
    base_url: AnyHttpUrl | None = Field(
        default=None,
        description="Where the vendor's API lives; the path part must not include /v1.",
    )
    mock: bool = Field(
        default=False,
        description="Serve this upstream with sidegate's built-in mock (demo, tests).",
    )
    keys: list[UpstreamKey] = Field(default_factory=list)
    models: list[ModelEntry] = Field(min_length=1)
    timeouts: Timeouts = Timeouts()
    auth_header: str = Field(
        default="Authorization", description="The header that carries the upstream key."
    )
    auth_scheme: str = Field(
        default="Bearer", description="Prefix of the key in auth_header; empty for the bare key."
    )

    @model_validator(mode="after")
    def _target(self) -> Upstream:
        if self.mock and self.base_url is not None:
            raise ValueError("set either base_url or mock: true, not both")
        if not self.mock and self.base_url is None:
            raise ValueError("base_url is required (or mock: true for the built-in mock)")
        if not self.mock and not self.keys:
            raise ValueError("at least one key is required")
        return self


class Alias(Section):
    upstream: str
    model: str


class ApiKeyEntry(Section):
    """A proxy-issued API key, stored as its hash only (``sidegate keys new`` prints both)."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    team: str = Field(min_length=1)
    hash: str = Field(
        pattern=r"^(sha256|hmac-sha256):[0-9a-f]{64}$",
        description="sha256:<hex of SHA-256(key)>, or hmac-sha256:<hex> with auth.pepper.",
    )
    models: list[str] | None = Field(
        default=None, description="A subset of the team's models; all of the team's if absent."
    )
    roles: list[str] = Field(default_factory=list, description="e.g. [admin]")
    expires: AwareDatetime | None = Field(
        default=None, description="After this instant the key is refused (give a time zone)."
    )
    disabled: bool = False


class AuthConfig(Section):
    pepper: SecretStr | None = Field(
        default=None, description="Secret for hmac-sha256 key hashes (at least 16 bytes)."
    )
    api_keys: list[ApiKeyEntry] = Field(default_factory=list)
    jwt: JwtConfig | None = None
    metrics_role: str | None = Field(
        default=None, description="Role needed for GET /metrics; open when absent."
    )

    @model_validator(mode="after")
    def _pepper(self) -> AuthConfig:
        if self.pepper is not None and len(self.pepper.get_secret_value().encode()) < 16:
            raise ValueError("pepper must be at least 16 bytes")
        if self.pepper is None and any(k.hash.startswith("hmac-") for k in self.api_keys):
            raise ValueError("hmac-sha256 key hashes need auth.pepper")
        return self


class Team(TeamLimits):
    """A team: its model allowlist (all models when absent), budget and rate limits."""

    models: list[str] | None = None


class CacheConfig(Section):
    embeddings: EmbeddingsCacheConfig | None = None


class SidegateConfig(Section):
    """The whole file. Built once per load and swapped whole on reload."""

    server: ServerConfig = ServerConfig()
    store: Store = SqliteStore(kind="sqlite")
    upstreams: dict[str, Upstream] = Field(min_length=1)
    models: dict[str, Alias] = Field(default_factory=dict)
    pricing: dict[str, Price] = Field(default_factory=dict)
    auth: AuthConfig = AuthConfig()
    teams: dict[str, Team] = Field(default_factory=dict)
    budgets: BudgetSettings = BudgetSettings()
    retry: RetryConfig = RetryConfig()
    cache: CacheConfig = CacheConfig()
    rate_limit_headers: RateLimitHeadersConfig = RateLimitHeadersConfig()

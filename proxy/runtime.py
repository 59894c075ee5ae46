"""Everything sidegate derives from one config, built once per load and swapped whole on reload.

A request takes the :class:`Runtime` current when it arrives and keeps it to the end, so requests
in flight finish on the config they started with.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

from sidegate.config.models import Budget, ModelEntry, RateLimit, SidegateConfig, Upstream
from sidegate.middlewares.api_keys import ApiKey, ApiKeyTable
from sidegate.middlewares.auth import TokenVerifier
from sidegate.middlewares.contract import Principal, Vendor
from sidegate.middlewares.limits import BudgetRule, Limits, LimitsSettings, RateRule
from sidegate.middlewares.pricing import rates, usd_to_nano

__all__ = ["ModelTarget", "Runtime", "UpstreamTarget", "build_runtime"]

MOCK_KEY = ("mock", "sidegate-mock-key")


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    name: str
    vendor: Vendor
    base_url: str
    key_id: str | None
    auth: tuple[tuple[str, str], ...]
    timeout: aiohttp.ClientTimeout
    _urls: dict[str, URL] = field(default_factory=dict)

    def url(self, path: str, query_string: str = "") -> URL:
        """The upstream URL for an already normalised ``path`` and raw query string."""
        if query_string:
            return URL(f"{self.base_url}{path}?{query_string}", encoded=True)
        url = self._urls.get(path)
        if url is None:
            url = URL(self.base_url + path, encoded=True)
            if len(self._urls) < 64:
                self._urls[path] = url
        return url


@dataclass(frozen=True, slots=True)
class ModelTarget:
    public: str
    upstream: UpstreamTarget
    upstream_model: str
    entry: ModelEntry


@dataclass(eq=False)
class Runtime:
    config: SidegateConfig
    upstreams: dict[str, UpstreamTarget]
    models: dict[str, ModelTarget]
    api_keys: ApiKeyTable
    jwt: TokenVerifier | None
    team_models: dict[str, frozenset[str] | None]
    limits: LimitsSettings
    secrets: frozenset[str]
    loaded_at: float = field(default_factory=time.time)
    _listings: dict[tuple[Vendor, frozenset[str] | None], list[ModelTarget]] = field(
        default_factory=dict
    )

    def listing(self, vendor: Vendor, principal: Principal | None) -> list[ModelTarget]:
        """The models (Meridian) or services (Meivan) ``principal`` may use, in config order."""
        key = (vendor, principal.models if principal is not None else None)
        listed = self._listings.get(key)
        if listed is None:
            listed = [
                target
                for target in self.models.values()
                if target.upstream.vendor is vendor
                and (principal is None or principal.may_use(target.public, target.upstream_model))
            ]
            if len(self._listings) < 256:
                self._listings[key] = listed
        return listed


def _target(name: str, upstream: Upstream, mock_urls: Mapping[str, str]) -> UpstreamTarget:
    """Where an upstream is; its keys are sent by the key pool, except the mock's stand-in key."""
    base = mock_urls[name] if upstream.mock else str(upstream.base_url)
    auth: tuple[tuple[str, str], ...] = ()
    key_id = None
    if not upstream.keys:
        key_id, secret = MOCK_KEY
        value = f"{upstream.auth_scheme} {secret}" if upstream.auth_scheme else secret
        auth = ((upstream.auth_header, value),)
    timeouts = upstream.timeouts
    return UpstreamTarget(
        name=name,
        vendor=Vendor(upstream.kind),
        base_url=base.rstrip("/"),
        key_id=key_id,
        auth=auth,
        timeout=aiohttp.ClientTimeout(
            total=timeouts.total_s, sock_connect=timeouts.connect_s, sock_read=timeouts.read_s
        ),
    )


def _limits(budget: Budget | None, rate: RateLimit | None) -> Limits | None:
    if budget is None and rate is None:
        return None
    return Limits(
        budget=(
            BudgetRule(usd_to_nano(budget.usd), budget.period, budget.fail_open)
            if budget is not None
            else None
        ),
        rate=(
            RateRule(rate.requests_per_minute, rate.tokens_per_minute, rate.fail_open)
            if rate is not None
            else None
        ),
    )


def limits_settings(config: SidegateConfig) -> LimitsSettings:
    """Budgets, rate limits and prices as the limits policy takes them (integer nano-USD)."""
    teams = {
        name: limits
        for name, team in config.teams.items()
        if (limits := _limits(team.budget, team.rate_limit)) is not None
    }
    keys = {
        (name, key_id): limits
        for name, team in config.teams.items()
        for key_id, key in team.keys.items()
        if (limits := _limits(key.budget, key.rate_limit)) is not None
    }
    settings = config.budgets
    return LimitsSettings(
        teams=teams,
        keys=keys,
        prices={name: rates(price) for name, price in config.pricing.items()},
        passthrough_reserve_nano=usd_to_nano(settings.passthrough_reserve_usd),
        default_max_output_tokens=settings.default_max_output_tokens,
        reservation_ttl_s=settings.reservation_ttl_s,
    )


def build_runtime(
    config: SidegateConfig, mock_urls: Mapping[str, str], *, jwt: TokenVerifier | None = None
) -> Runtime:
    """Derive routing tables, listings and auth tables from ``config``.

    ``mock_urls`` gives the address of the built-in mock serving each ``mock: true`` upstream;
    ``jwt`` verifies tokens when ``auth.jwt`` is configured.
    """
    upstreams = {
        name: _target(name, upstream, mock_urls) for name, upstream in config.upstreams.items()
    }
    entries = {
        entry.id: entry for upstream in config.upstreams.values() for entry in upstream.models
    }
    models: dict[str, ModelTarget] = {}
    for name, upstream in config.upstreams.items():
        for entry in upstream.models:
            models[entry.id] = ModelTarget(entry.id, upstreams[name], entry.id, entry)
    for alias, spec in config.models.items():
        models[alias] = ModelTarget(
            alias, upstreams[spec.upstream], spec.model, entries[spec.model]
        )
    auth = config.auth
    pepper = auth.pepper.get_secret_value().encode() if auth.pepper is not None else None
    api_keys = ApiKeyTable(
        (
            ApiKey(
                id=key.id,
                team=key.team,
                digest=key.hash,
                models=frozenset(key.models) if key.models is not None else None,
                roles=frozenset(key.roles),
                expires=key.expires,
                disabled=key.disabled,
            )
            for key in auth.api_keys
        ),
        pepper=pepper,
    )
    team_models = {
        name: frozenset(team.models) if team.models is not None else None
        for name, team in config.teams.items()
    }
    secrets = {key.secret.get_secret_value() for u in config.upstreams.values() for key in u.keys}
    if auth.pepper is not None:
        secrets.add(auth.pepper.get_secret_value())
    if auth.jwt is not None and auth.jwt.secret is not None:
        secrets.add(auth.jwt.secret.get_secret_value())
    return Runtime(
        config=config,
        upstreams=upstreams,
        models=models,
        api_keys=api_keys,
        jwt=jwt,
        team_models=team_models,
        limits=limits_settings(config),
        secrets=frozenset(secrets),
    )

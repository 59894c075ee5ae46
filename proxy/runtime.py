"""Everything sidegate derives from one config, built once per load and swapped whole on reload.

A request takes the :class:`Runtime` current when it arrives and keeps it to the end, so requests
in flight finish on the config they started with.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from sidegate.config.models import SidegateConfig, Upstream
from sidegate.middlewares.contract import Vendor

from .dialects import meridian

__all__ = ["ModelTarget", "Runtime", "UpstreamTarget", "build_runtime"]

MOCK_KEY = ("mock", "sidegate-mock-key")


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    name: str
    vendor: Vendor
    base_url: str
    key_id: str
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


@dataclass(eq=False)
class Runtime:
    config: SidegateConfig
    upstreams: dict[str, UpstreamTarget]
    models: dict[str, ModelTarget]
    meridian_ids: tuple[str, ...]
    services: tuple[dict[str, Any], ...]
    models_body: bytes
    loaded_at: float = field(default_factory=time.time)


def _target(name: str, upstream: Upstream, mock_urls: Mapping[str, str]) -> UpstreamTarget:
    base = mock_urls[name] if upstream.mock else str(upstream.base_url)
    if upstream.keys:
        key_id, secret = upstream.keys[0].id, upstream.keys[0].secret.get_secret_value()
    else:
        key_id, secret = MOCK_KEY
    value = f"{upstream.auth_scheme} {secret}" if upstream.auth_scheme else secret
    timeouts = upstream.timeouts
    return UpstreamTarget(
        name=name,
        vendor=Vendor(upstream.kind),
        base_url=base.rstrip("/"),
        key_id=key_id,
        auth=((upstream.auth_header, value),),
        timeout=aiohttp.ClientTimeout(
            total=timeouts.total_s, sock_connect=timeouts.connect_s, sock_read=timeouts.read_s
        ),
    )


def build_runtime(config: SidegateConfig, mock_urls: Mapping[str, str]) -> Runtime:
    """Derive routing tables and listings from ``config``; ``mock_urls`` serves ``mock: true``."""
    upstreams = {
        name: _target(name, upstream, mock_urls) for name, upstream in config.upstreams.items()
    }
    models: dict[str, ModelTarget] = {}
    meridian_ids: list[str] = []
    services: list[dict[str, Any]] = []
    for name, upstream in config.upstreams.items():
        for entry in upstream.models:
            models[entry.id] = ModelTarget(entry.id, upstreams[name], entry.id)
    for alias, spec in config.models.items():
        models[alias] = ModelTarget(alias, upstreams[spec.upstream], spec.model)
    entries = {
        entry.id: entry for upstream in config.upstreams.values() for entry in upstream.models
    }
    for public, target in models.items():
        if target.upstream.vendor is Vendor.MERIDIAN:
            meridian_ids.append(public)
            continue
        entry = entries[target.upstream_model]
        services.append(
            {
                "service_id": public,
                "provider": target.upstream.name,
                "capabilities": list(entry.capabilities),
                "max_context_tokens": entry.max_context_tokens,
                "regions": list(entry.regions),
            }
        )
    loaded_at = time.time()
    return Runtime(
        config=config,
        upstreams=upstreams,
        models=models,
        meridian_ids=tuple(meridian_ids),
        services=tuple(services),
        models_body=meridian.models_list(meridian_ids, created=int(loaded_at)),
        loaded_at=loaded_at,
    )

"""Fixtures for the config tests: the DESIGN.md example and a loader that returns problems."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from sidegate.config import ConfigError, Problem, load_config_text

# The example from DESIGN.md, with a real jwks_url (the "..." there is not a URL) and the secret
# file placed in tmp_path.
EXAMPLE = textwrap.dedent("""\
    server: {host: 127.0.0.1, port: 8080, max_body_bytes: 26214400}
    store: {kind: sqlite, path: sidegate.db}        # or {kind: redis, url: redis://127.0.0.1:6379/0}
    upstreams:
      meridian:
        kind: meridian
        base_url: https://api.meridian.so
        keys:
          - {id: primary, secret: "${MERIDIAN_KEY_1}"}
          - {id: backup, secret: "${file:SECRET_FILE}"}
        models: [meridian-1, meridian-1-turbo, meridian-embed-3, meridian-whisper-1]
      meivan:
        kind: meivan
        base_url: https://api.meivan.example
        keys: [{id: main, secret: "${MEIVAN_KEY}"}]
        models: [llm.general.v1]                    # Meivan service_ids
    models:                                         # optional aliases
      fast: {upstream: meridian, model: meridian-1-turbo}
    pricing:                                        # USD per 1M tokens (or per image / per request)
      meridian-1: {input: 2.50, output: 10.00}
      meridian-embed-3: {input: 0.02}
    auth:
      api_keys:
        - id: search-prod
          team: search
          hash: "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
      jwt: {issuer: "https://idp.example", audience: sidegate, algorithms: [RS256],
            jwks_url: "https://idp.example/jwks.json", team_claim: team}
    teams:
      search:
        budget: {usd: 500, period: monthly}
        rate_limit: {requests_per_minute: 600, tokens_per_minute: 200000}
        models: [meridian-1, meridian-embed-3]
    retry: {max_attempts: 4, base_delay_s: 0.25, max_delay_s: 8, deadline_s: 60}
    cache: {embeddings: {ttl_s: 86400, max_bytes: 268435456, scope: team}}
    rate_limit_headers: {mode: team}
    """)

MINIMAL = textwrap.dedent("""\
    upstreams:
      meridian:
        kind: meridian
        base_url: https://api.meridian.so
        keys: [{id: primary, secret: "sk-test"}]
        models: [meridian-1, meridian-embed-3]
    """)


@pytest.fixture
def minimal() -> str:
    """The smallest config that loads; tests append to it or replace parts of it."""
    return MINIMAL


@pytest.fixture
def example_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The DESIGN.md example written to tmp_path, with its env vars and secret file in place."""
    secret = tmp_path / "secrets" / "meridian_2"
    secret.parent.mkdir()
    secret.write_text("sk-meridian-backup\n")
    monkeypatch.setenv("MERIDIAN_KEY_1", "sk-meridian-primary")
    monkeypatch.setenv("MEIVAN_KEY", "mv-key")
    path = tmp_path / "sidegate.yaml"
    path.write_text(EXAMPLE.replace("SECRET_FILE", str(secret)))
    return path


@pytest.fixture
def problems() -> Callable[[str], list[Problem]]:
    """Load YAML text that must fail; return its problems in the order ConfigError gives them."""

    def load(text: str) -> list[Problem]:
        with pytest.raises(ConfigError) as info:
            load_config_text(textwrap.dedent(text))
        assert info.value.problems, "a ConfigError without problems"
        return info.value.problems

    return load

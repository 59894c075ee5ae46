"""Verify bearer JWTs against a :class:`~sidegate.config.auth.JwtConfig`.

Contract: :meth:`JwtVerifier.verify` returns :class:`Claims` only for a token whose algorithm is
configured, whose header names no critical extension, whose signature verifies with the configured
key, and whose ``iss`` (exactly), ``aud``, ``exp`` (required), ``nbf`` and ``iat`` check out
within ``leeway_s``. Anything else raises :class:`InvalidToken` (401) — including an unexpected
exception, which is never a pass — or :class:`AuthUnavailable` (503) when no key can be obtained.
No error message, log line or exception chain carries the token or a claim's value.

Keys: a static PEM, JWK or HMAC secret is prepared once, at construction. A JWKS is fetched with
aiohttp (never pyjwt's blocking ``PyJWKClient``), cached for ``jwks_cache_s``, and fetched again
for an unknown ``kid`` at most once per ``jwks_refetch_cooldown_s`` (measured from the start of
the last fetch); concurrent requests share one fetch in flight. A failed fetch keeps the keys
already cached.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import aiohttp
import jwt
import structlog

from sidegate.config.auth import HMAC_ALGORITHMS, JwtConfig
from sidegate.config.jwt_keys import VerificationKey, jwk_verification_key, pem_verification_key

from .errors import SidegateError

__all__ = ["AuthUnavailable", "Claims", "InvalidToken", "JwtVerifier"]

log = structlog.get_logger(__name__)

MAX_TOKEN_CHARS = 16_384
MAX_JWKS_BYTES = 1 << 20
MAX_JWKS_KEYS = 100
_REQUIRED_CLAIMS = ("exp", "iss", "aud")

_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "The token has expired."),
    (jwt.ImmatureSignatureError, "The token is not valid yet."),
    (jwt.InvalidAudienceError, "The token is not meant for this audience."),
    (jwt.InvalidIssuerError, "The token comes from an issuer this gateway does not trust."),
    (jwt.InvalidIssuedAtError, "The token's issued-at time is invalid."),
    (jwt.InvalidSignatureError, "The token's signature is invalid."),
    (jwt.InvalidAlgorithmError, "The token's algorithm is not allowed."),
    (jwt.InvalidKeyError, "The token cannot be verified with the configured key."),
    (jwt.DecodeError, "The token is malformed."),
)


class InvalidToken(SidegateError):
    """The bearer token is not acceptable; the message says why in general terms."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_token"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


class AuthUnavailable(SidegateError):
    """No key to verify the token with could be obtained (the JWKS is unreachable)."""

    status = 503
    type = "server_error"
    code = "auth_unavailable"


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says: ``team`` is ``None`` when the team claim is missing."""

    subject: str | None
    team: str | None
    roles: frozenset[str]
    claims: Mapping[str, Any]


class JwtVerifier:
    """Verifies tokens for one :class:`JwtConfig`; owns the JWKS cache when there is one.

    ``session_factory`` supplies the aiohttp session for JWKS fetches; such a session belongs to
    the caller. Without it the verifier creates its own on first fetch and :meth:`close` closes
    it. ``clock`` (monotonic seconds) drives the JWKS cache age and refetch cooldown only; pyjwt
    checks ``exp``/``nbf``/``iat`` against the wall clock itself.
    """

    def __init__(
        self,
        config: JwtConfig,
        *,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._algorithms = tuple(config.algorithms)
        self._audience = config.audience
        self._static = _static_key(config)
        self._jwks: _JwksKeys | None = None
        if self._static is None:
            if config.jwks_url is None:
                raise ValueError("JwtConfig names no key source")
            self._jwks = _JwksKeys(config, session_factory, clock)

    async def verify(self, token: str) -> Claims:
        """The token's claims, or :class:`InvalidToken` / :class:`AuthUnavailable`."""
        try:
            return await self._verify(token)
        except (InvalidToken, AuthUnavailable):
            raise
        except Exception as exc:
            log.warning("jwt_verify_error", error=type(exc).__name__)
            raise InvalidToken("The token could not be verified.") from None

    async def close(self) -> None:
        """Stop a JWKS fetch in flight and close the session the verifier created."""
        if self._jwks is not None:
            await self._jwks.close()

    async def _verify(self, token: str) -> Claims:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise InvalidToken("The token is malformed.")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise InvalidToken("The token is malformed.") from None
        except jwt.PyJWTError:  # pyjwt refuses unknown critical extensions and non-string kids
            raise InvalidToken("The token's header is not acceptable.") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise InvalidToken("The token's algorithm is not allowed.")
        if "crit" in header:
            raise InvalidToken("The token's header is not acceptable: 'crit' is not supported.")
        kid = header.get("kid")
        key = self._static if self._jwks is None else await self._jwks.key(kid, alg)
        if key is None or alg not in key.algorithms:
            raise InvalidToken("The token's algorithm does not fit its key.")
        payload = self._decode(token, key)
        config = self._config
        subject = _claim(payload, config.subject_claim)
        return Claims(
            subject=subject if isinstance(subject, str) else None,
            team=_team(_claim(payload, config.team_claim)),
            roles=_roles(_claim(payload, config.roles_claim)),
            claims=MappingProxyType(payload),
        )

    def _decode(self, token: str, key: VerificationKey) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key.key,
                algorithms=[alg for alg in self._algorithms if alg in key.algorithms],
                audience=self._audience,
                issuer=self._config.issuer,
                leeway=self._config.leeway_s,
                options={"require": list(_REQUIRED_CLAIMS), "enforce_minimum_key_length": True},
            )
        except jwt.MissingRequiredClaimError as exc:
            if exc.claim in _REQUIRED_CLAIMS:
                raise InvalidToken(f"The token lacks the required '{exc.claim}' claim.") from None
            raise InvalidToken("The token lacks a required claim.") from None
        except jwt.PyJWTError as exc:
            reason = next((text for kind, text in _REASONS if isinstance(exc, kind)), None)
            raise InvalidToken(reason or "The token's claims are invalid.") from None


def _static_key(config: JwtConfig) -> VerificationKey | None:
    if config.secret is not None:
        hmac = frozenset(alg for alg in config.algorithms if alg in HMAC_ALGORITHMS)
        return VerificationKey(config.secret.get_secret_value().encode(), hmac)
    if config.public_key is not None:
        return pem_verification_key(config.public_key, config.algorithms)
    if config.jwk is not None:
        jwk = json.loads(config.jwk) if isinstance(config.jwk, str) else config.jwk
        return jwk_verification_key(jwk, config.algorithms)
    return None


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    """``claims[path]`` when that key exists (namespaced claims contain dots), else the dotted
    path walked through nested objects; ``None`` when missing."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _team(value: Any) -> str | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) and value else None


def _roles(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return frozenset(role for role in value if isinstance(role, str) and role)
    return frozenset()


class _FetchError(Exception):
    """A JWKS response that cannot be used; the message is safe to log."""


class _JwksKeys:
    """The JWKS cache: single-flight fetches, limited by a cooldown, keeping old keys on failure."""

    def __init__(
        self,
        config: JwtConfig,
        session_factory: Callable[[], aiohttp.ClientSession] | None,
        clock: Callable[[], float],
    ) -> None:
        self._url = str(config.jwks_url)
        self._algorithms = frozenset(config.algorithms)
        self._cache_s = config.jwks_cache_s
        self._cooldown_s = config.jwks_refetch_cooldown_s
        self._timeout = aiohttp.ClientTimeout(total=config.jwks_timeout_s)
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._clock = clock
        self._keys: tuple[VerificationKey, ...] | None = None
        self._fetched_at = 0.0
        self._last_attempt: float | None = None
        self._last_ok = False
        self._inflight: asyncio.Task[None] | None = None
        self._closed = False

    async def key(self, kid: str | None, alg: str) -> VerificationKey:
        if self._keys is None or self._clock() - self._fetched_at >= self._cache_s:
            await self._refresh()
        found = self._select(kid, alg)
        if found is None and kid is not None:
            await self._refresh()
            found = self._select(kid, alg)
        if found is not None:
            return found
        if self._keys is None or not self._last_ok:
            raise AuthUnavailable("The keys that sign tokens cannot be fetched now; retry later.")
        if kid is None:
            raise InvalidToken("The token names no key id and no single key fits it.")
        raise InvalidToken("The token's key id is not known.")

    def _select(self, kid: str | None, alg: str) -> VerificationKey | None:
        if self._keys is None:
            return None
        if kid is None:
            fitting = [key for key in self._keys if alg in key.algorithms]
            return fitting[0] if len(fitting) == 1 else None
        named = [key for key in self._keys if key.kid == kid]
        fitting = [key for key in named if alg in key.algorithms]
        if named and not fitting:
            raise InvalidToken("The token's algorithm does not fit its key.")
        if len(fitting) > 1:
            raise InvalidToken("The token's key id names several keys.")
        return fitting[0] if fitting else None

    async def _refresh(self) -> None:
        """Join the fetch in flight, or start one unless the cooldown forbids it.

        ``asyncio.wait`` neither raises the fetch's outcome nor cancels the fetch when this
        caller is cancelled: the other callers still get its keys.
        """
        task = self._inflight
        if task is None:
            now = self._clock()
            if self._last_attempt is not None and now - self._last_attempt < self._cooldown_s:
                return
            self._last_attempt = now
            task = self._inflight = asyncio.create_task(self._fetch(), name="sidegate-jwks-fetch")
        await asyncio.wait([task])

    async def _fetch(self) -> None:
        try:
            keys = await self._download()
        except Exception as exc:  # every failure means "no fresh keys"; the cache stays
            self._last_ok = False
            log.warning(
                "jwks_fetch_failed",
                url=self._url,
                error=str(exc) if isinstance(exc, _FetchError) else type(exc).__name__,
                cached_keys=len(self._keys or ()),
            )
        else:
            self._keys, self._fetched_at, self._last_ok = keys, self._clock(), True
            log.debug("jwks_fetched", url=self._url, keys=len(keys))
        finally:
            self._inflight = None

    async def _download(self) -> tuple[VerificationKey, ...]:
        session = self._get_session()
        async with session.get(
            self._url, timeout=self._timeout, headers={"Accept": "application/json"}
        ) as response:
            if response.status != 200:
                raise _FetchError(f"status {response.status}")
            body = bytearray()
            async for chunk in response.content.iter_chunked(65_536):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise _FetchError("response larger than 1 MiB")
        return _parse_jwks(bytes(body), self._algorithms)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise _FetchError("verifier closed")
        if self._session is None:
            factory = self._session_factory
            self._session = factory() if factory is not None else aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        self._closed = True
        task = self._inflight
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        if self._session is not None and self._session_factory is None:
            await self._session.close()
        self._session = None


def _parse_jwks(body: bytes, algorithms: frozenset[str]) -> tuple[VerificationKey, ...]:
    """The usable signature keys of a JWKS document; entries that do not fit are skipped."""
    try:
        document = json.loads(body)
    except ValueError:
        raise _FetchError("response is not JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, Sequence) or isinstance(entries, str):
        raise _FetchError("response has no 'keys' list")
    keys: list[VerificationKey] = []
    for entry in entries[:MAX_JWKS_KEYS]:
        try:
            key = jwk_verification_key(entry, algorithms)
        except ValueError:
            continue
        if key.algorithms:
            keys.append(key)
    if not keys:
        raise _FetchError("no usable signature key for the configured algorithms")
    return tuple(keys)

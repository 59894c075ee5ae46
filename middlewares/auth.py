"""Authentication: every request is made by a :class:`Principal`, or it goes no further.

A caller presents a proxy-issued API key (``sg-…``) or a JWT, as ``Authorization: Bearer …``
(what the OpenAI SDK sends) or in an ``api-key`` / ``x-api-key`` header. The middleware puts the
Principal on the request under ``PRINCIPAL_KEY``; authorization (model allowlists, roles) is
decided by whoever knows what the request asks for. It works alone on any aiohttp app's routes.

Failures are 401 ``invalid_api_key`` / ``invalid_token`` with ``WWW-Authenticate``, or 403 for a
token whose team is not configured; no error echoes what was presented, and an unexpected
exception while verifying is a 401, never a pass.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Protocol

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from .api_keys import KEY_PREFIX, ApiKey, ApiKeyTable
from .contract import PRINCIPAL_KEY, Principal
from .errors import Forbidden, SidegateError, Unauthorized
from .steps import StepMiddleware

__all__ = ["TokenVerifier", "VerifiedToken", "auth_middleware"]

log = structlog.get_logger(__name__)


class VerifiedToken(Protocol):
    @property
    def subject(self) -> str | None: ...
    @property
    def team(self) -> str | None: ...
    @property
    def roles(self) -> frozenset[str]: ...


class TokenVerifier(Protocol):
    """Verifies a JWT (see :class:`sidegate.middlewares.jwt_verify.JwtVerifier`)."""

    async def verify(self, token: str) -> VerifiedToken: ...


TeamModels = Mapping[str, frozenset[str] | None]


def auth_middleware(
    *,
    api_keys: ApiKeyTable | None = None,
    jwt: TokenVerifier | None = None,
    teams: TeamModels | None = None,
    exempt: Callable[[web.Request], bool] | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Middleware:
    """Authenticate every request not ``exempt`` and store its Principal under PRINCIPAL_KEY.

    ``teams`` maps each known team to its model allowlist (``None``: every model); when given,
    a token naming another team is refused with 403. A Principal's models are its team's,
    narrowed by the key's own list. An API key's Principal is built on the key's first use and
    reused (``api_keys`` and ``teams`` are read as they are then); a disabled or expired key is
    refused on every request. It is a step (:mod:`.steps`): it acts before the handler only, and
    an API key is checked without a coroutine.
    """
    authenticator = _Authenticator(api_keys, jwt, teams, clock)
    keys = authenticator.api_keys

    def authenticate(request: web.Request) -> Awaitable[None] | None:
        if exempt is not None and exempt(request):
            return None
        credential = _credential(request)
        if credential.startswith(KEY_PREFIX) and keys is not None:
            request[PRINCIPAL_KEY] = authenticator.from_key(credential)  # nothing to await
            return None
        return _authenticate_other(request, authenticator, credential)

    return StepMiddleware(authenticate)


async def _authenticate_other(
    request: web.Request, authenticator: _Authenticator, credential: str
) -> None:
    request[PRINCIPAL_KEY] = await authenticator.from_other(credential)


class _Authenticator:
    def __init__(
        self,
        api_keys: ApiKeyTable | None,
        jwt: TokenVerifier | None,
        teams: TeamModels | None,
        clock: Callable[[], datetime],
    ) -> None:
        self.api_keys = api_keys
        self.jwt = jwt
        self.teams = teams
        self.clock = clock
        self._principals: dict[str, Principal] = {}  # by key digest: the same for every request

    async def from_other(self, credential: str) -> Principal:
        """The Principal of a credential that is not one of our API keys: a JWT, or 401."""
        if credential.count(".") == 2 and self.jwt is not None:
            return await self._from_token(credential)
        raise Unauthorized("The API key or token is not valid.")

    def from_key(self, presented: str) -> Principal:
        assert self.api_keys is not None
        key = self.api_keys.lookup(presented)
        if key is None:
            raise Unauthorized("The API key is not valid.")
        if key.disabled:
            log.info("auth_refused", reason="key_disabled", key_id=key.id)
            raise Unauthorized("This API key is disabled.")
        if key.expires is not None and key.expires <= self.clock():
            log.info("auth_refused", reason="key_expired", key_id=key.id)
            raise Unauthorized("This API key has expired.")
        principal = self._principals.get(key.digest)
        if principal is None:
            principal = self._principals[key.digest] = Principal(
                team=key.team,
                key_id=key.id,
                roles=key.roles,
                models=_narrow(self._team_models(key.team), key),
            )
        return principal

    async def _from_token(self, token: str) -> Principal:
        assert self.jwt is not None
        try:
            verified = await self.jwt.verify(token)
        except SidegateError:
            raise
        except Exception as exc:
            log.warning("auth_error", error=type(exc).__name__)
            raise Unauthorized("The token could not be verified.", code="invalid_token") from None
        if not verified.team:
            raise Unauthorized("The token names no team.", code="invalid_token")
        return Principal(
            team=verified.team,
            subject=verified.subject,
            roles=verified.roles,
            models=self._team_models(verified.team),
        )

    def _team_models(self, team: str) -> frozenset[str] | None:
        if self.teams is None:
            return None
        if team not in self.teams:
            log.info("auth_refused", reason="unknown_team")
            raise Forbidden("The caller's team is not configured.", code="team_not_allowed")
        return self.teams[team]


def _narrow(team: frozenset[str] | None, key: ApiKey) -> frozenset[str] | None:
    if key.models is None:
        return team
    return key.models if team is None else key.models & team


def _credential(request: web.Request) -> str:
    headers = request.headers
    authorization = headers.get("Authorization")
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("Send the API key as 'Authorization: Bearer <key>'.")
        return value.strip()
    header = headers.get("api-key") or headers.get("x-api-key")
    if not header:
        raise Unauthorized("No API key was provided.")
    return header.strip()

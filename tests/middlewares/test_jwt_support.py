"""Helpers for the JWT tests (no tests here): keys, token builders, a fake clock, a JWKS server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from sidegate.config.auth import JwtConfig
from sidegate.middlewares.jwt_verify import InvalidToken

ISSUER = "https://idp.example"
AUDIENCE = "sidegate"
SUBJECT = "alice-subject-7f3e"
TEAM = "search-team-9c1d"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def pem(key: PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def jwk(key: PrivateKey, **members: Any) -> dict[str, Any]:
    """The public JWK of ``key`` plus ``members`` (``kid``, ``alg``, ``use``)."""
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data: dict[str, Any] = RSAAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = ECAlgorithm.to_jwk(public, as_dict=True)
    return {**data, **members}


def payload(**overrides: Any) -> dict[str, Any]:
    """Valid claims for :data:`ISSUER` / :data:`AUDIENCE`; ``None`` values are left out."""
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": SUBJECT,
        "team": TEAM,
        "exp": int(time.time()) + 300,
        "iat": int(time.time()) - 5,
    }
    merged = {**base, **overrides}
    return {name: value for name, value in merged.items() if value is not None}


def sign(
    key: PrivateKey | bytes,
    alg: str = "RS256",
    *,
    kid: str | None = None,
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    all_headers = {**({"kid": kid} if kid else {}), **(headers or {})}
    return jwt.encode(payload(**claims), key, algorithm=alg, headers=all_headers or None)


def sign_raw(key: PrivateKey, claims: dict[str, Any], alg: str = "RS256") -> str:
    """A correctly signed token with claims ``jwt.encode`` would refuse to write."""
    return jwt.PyJWS().encode(json.dumps(claims).encode(), key, algorithm=alg)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(value: dict[str, Any]) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A token with any header and signature, as an attacker would build it."""
    return f"{_segment(header)}.{_segment(claims)}.{_b64(signature)}"


def forge_hmac(secret: bytes, *, alg: str = "HS256", kid: str | None = None, **claims: Any) -> str:
    """An HS* token whose HMAC key is ``secret`` — e.g. the verifier's *public* key bytes."""
    header = {"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = f"{_segment(header)}.{_segment(payload(**claims))}"
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signature = hmac.new(secret, signing_input.encode(), digest).digest()
    return f"{signing_input}.{_b64(signature)}"


def config(**fields: Any) -> JwtConfig:
    return JwtConfig.model_validate(
        {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["RS256"], **fields}
    )


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def assert_invalid(exc: InvalidToken, token: str, says: str) -> None:
    """A 401 ``invalid_token`` that says ``says`` and carries neither the token nor a claim."""
    assert exc.status == 401
    assert exc.type == "invalid_request_error"
    assert exc.code == "invalid_token"
    assert exc.headers == {"WWW-Authenticate": 'Bearer error="invalid_token"'}
    assert says in exc.message
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__
    shown = f"{exc} {exc!r} {exc.args!r} {exc.headers!r}"
    for secret in (token, *token.split("."), SUBJECT, TEAM):
        if len(secret) >= 8:
            assert secret not in shown


class JwksServer:
    """A JWKS endpoint that counts fetches; tests change ``keys``, ``status`` or ``body``, and
    may hold responses at a gate to observe fetches in flight."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.status = 200
        self.body: bytes | None = None
        self.fetches = 0
        self.started = asyncio.Event()
        self.gate: asyncio.Event | None = None
        self.url = ""

    def hold(self) -> None:
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    def release(self) -> None:
        if self.gate is not None:
            self.gate.set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/jwks.json", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.body is not None:
            return web.Response(body=self.body, status=self.status, content_type="application/json")
        return web.json_response({"keys": self.keys}, status=self.status)

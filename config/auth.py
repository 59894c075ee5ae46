"""JWT auth settings (``auth.jwt``) and the verification keys they name.

:class:`JwtConfig` refuses at load what could make token checks unsafe: the ``none`` algorithm,
unknown algorithm names, HMAC (HS*) mixed with public-key algorithms, a key source that does not
fit the algorithms, HMAC secrets shorter than the hash (at least 32 bytes), RSA keys under 2048
bits, JWKs that are symmetric or carry private key material, and anything but exactly one key
source. Messages say what is wrong and never contain a secret.

:mod:`sidegate.config.jwt_keys` turns key material into verification keys (for validation here
and for the verifier in :mod:`sidegate.middlewares.jwt_verify`); it is imported only when JWT is
configured, so a gateway without JWT never loads pyjwt or cryptography.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Self

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    from .jwt_keys import VerificationKey

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "EC_ALGORITHM_CURVES",
    "HMAC_ALGORITHMS",
    "RSA_ALGORITHMS",
    "SUPPORTED_ALGORITHMS",
    "JwtConfig",
]

HMAC_ALGORITHMS: Mapping[str, int] = {"HS256": 32, "HS384": 48, "HS512": 64}
"""HMAC algorithms and the shortest secret (bytes) each accepts: its hash size (RFC 7518 §3.2)."""

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHM_CURVES: Mapping[str, str] = {
    "ES256": "SECP256R1",
    "ES384": "SECP384R1",
    "ES512": "SECP521R1",
}
ASYMMETRIC_ALGORITHMS = frozenset({*RSA_ALGORITHMS, *EC_ALGORITHM_CURVES, "EdDSA"})
SUPPORTED_ALGORITHMS = frozenset({*ASYMMETRIC_ALGORITHMS, *HMAC_ALGORITHMS})

_KEY_SOURCES = ("jwks_url", "public_key", "jwk", "secret")


NonEmpty = Annotated[str, Field(min_length=1)]


class JwtConfig(BaseModel):
    """How bearer JWTs are verified: who issues them, for whom, signed how, with which key.

    Exactly one key source: ``jwks_url`` (fetched and cached), ``public_key`` (PEM), ``jwk`` (a
    JWK as a mapping or JSON string) or ``secret`` (HMAC, HS* only). ``team_claim``,
    ``roles_claim`` and ``subject_claim`` are claim names or dotted paths (``realm_access.roles``);
    a list value gives its first element as the team and all its elements as roles.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    issuer: NonEmpty
    audience: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1)]
    algorithms: list[str] = Field(min_length=1)
    leeway_s: float = Field(default=0, ge=0, le=300)
    jwks_url: AnyHttpUrl | None = None
    public_key: str | None = None
    jwk: dict[str, Any] | str | None = None
    secret: SecretStr | None = None
    team_claim: NonEmpty = "team"
    roles_claim: NonEmpty = "roles"
    subject_claim: NonEmpty = "sub"
    jwks_cache_s: PositiveFloat = 300
    jwks_refetch_cooldown_s: PositiveFloat = 30
    jwks_timeout_s: PositiveFloat = 5

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, value: list[str]) -> list[str]:
        for name in value:
            if name.strip().lower() == "none":
                raise ValueError("the 'none' algorithm is never accepted: tokens must be signed")
            if name not in SUPPORTED_ALGORITHMS:
                supported = ", ".join(sorted(SUPPORTED_ALGORITHMS))
                raise ValueError(f"unknown algorithm {name!r} (supported: {supported})")
        hmac = [name for name in value if name in HMAC_ALGORITHMS]
        if hmac and len(hmac) != len(value):
            raise ValueError(
                "HS* (HMAC) algorithms cannot be mixed with RS*/PS*/ES*/EdDSA: one key source is"
                " either a shared secret or public keys"
            )
        return list(dict.fromkeys(value))

    @field_validator("secret")
    @classmethod
    def _strong_secret(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None:
            return None
        raw = value.get_secret_value().encode()
        hmac = [name for name in info.data.get("algorithms", ()) if name in HMAC_ALGORITHMS]
        longest = max(hmac, key=HMAC_ALGORITHMS.__getitem__, default="HS256")
        if len(raw) < HMAC_ALGORITHMS[longest]:
            raise ValueError(
                f"the HMAC secret must be at least {HMAC_ALGORITHMS[longest]} bytes for {longest}"
            )
        from .jwt_keys import check_hmac_secret

        check_hmac_secret(raw)
        return value

    @field_validator("public_key")
    @classmethod
    def _usable_pem(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            from .jwt_keys import pem_verification_key

            try:
                key = pem_verification_key(value, SUPPORTED_ALGORITHMS)
            except ValueError as exc:
                raise ValueError(f"public_key: {exc}") from None
            _check_covers(key, info, "public_key")
        return value

    @field_validator("jwk")
    @classmethod
    def _usable_jwk(
        cls, value: dict[str, Any] | str | None, info: ValidationInfo
    ) -> dict[str, Any] | None:
        if value is None:
            return None
        try:
            data: Any = json.loads(value) if isinstance(value, str) else value
        except ValueError:
            raise ValueError("jwk is not valid JSON") from None
        from .jwt_keys import jwk_verification_key

        try:
            key = jwk_verification_key(data, SUPPORTED_ALGORITHMS)
        except ValueError as exc:
            raise ValueError(f"jwk: {exc}") from None
        _check_covers(key, info, "jwk")
        return dict(data)

    @model_validator(mode="after")
    def _one_key_source(self) -> Self:
        sources = [name for name in _KEY_SOURCES if getattr(self, name) is not None]
        if len(sources) != 1:
            found = f" (found: {', '.join(sources)})" if sources else ""
            raise ValueError(f"give exactly one of {', '.join(_KEY_SOURCES)}{found}")
        hmac = self.algorithms[0] in HMAC_ALGORITHMS
        if hmac and self.secret is None:
            raise ValueError(f"HS* algorithms verify with `secret`, not with `{sources[0]}`")
        if not hmac and self.secret is not None:
            raise ValueError(
                "`secret` is only for HS256/HS384/HS512; RS*/PS*/ES*/EdDSA verify with"
                " jwks_url, public_key or jwk"
            )
        return self


def _check_covers(key: VerificationKey, info: ValidationInfo, field: str) -> None:
    """Every configured asymmetric algorithm must be verifiable with a static key."""
    from .jwt_keys import describe

    missing = sorted(
        name
        for name in info.data.get("algorithms", ())
        if name in ASYMMETRIC_ALGORITHMS and name not in key.algorithms
    )
    if missing:
        raise ValueError(f"{field} is {describe(key.key)}; it cannot verify {', '.join(missing)}")

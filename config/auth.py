"""JWT auth settings (``auth.jwt``) and the verification keys they name.

:class:`JwtConfig` refuses at load what could make token checks unsafe: the ``none`` algorithm,
unknown algorithm names, HMAC (HS*) mixed with public-key algorithms, a key source that does not
fit the algorithms, HMAC secrets shorter than the hash (at least 32 bytes), RSA keys under 2048
bits, JWKs that are symmetric or carry private key material, and anything but exactly one key
source. Messages say what is wrong and never contain a secret.

:func:`pem_verification_key` and :func:`jwk_verification_key` turn key material into a
:class:`VerificationKey`; the verifier in :mod:`sidegate.middlewares.jwt_verify` uses the same
functions for static keys and for every entry of a fetched JWKS.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Self

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
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

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "HMAC_ALGORITHMS",
    "SUPPORTED_ALGORITHMS",
    "JwtConfig",
    "PublicKey",
    "VerificationKey",
    "jwk_verification_key",
    "key_algorithms",
    "pem_verification_key",
]

HMAC_ALGORITHMS: Mapping[str, int] = {"HS256": 32, "HS384": 48, "HS512": 64}
"""HMAC algorithms and the shortest secret (bytes) each accepts: its hash size (RFC 7518 §3.2)."""

_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_CURVES: Mapping[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}
ASYMMETRIC_ALGORITHMS = frozenset({*_RSA_ALGORITHMS, *_EC_CURVES, "EdDSA"})
SUPPORTED_ALGORITHMS = frozenset({*ASYMMETRIC_ALGORITHMS, *HMAC_ALGORITHMS})

MIN_RSA_BITS = 2048
_PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_KEY_SOURCES = ("jwks_url", "public_key", "jwk", "secret")

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
_PUBLIC_KEY_TYPES = (
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A key ready for ``jwt.decode`` and the algorithms it may verify.

    ``key`` is a public key, or the secret bytes for HS*; ``kid`` is the JWK's key id, if any.
    """

    key: PublicKey | bytes
    algorithms: frozenset[str]
    kid: str | None = None


def key_algorithms(key: object) -> frozenset[str]:
    """The asymmetric algorithms that can verify with ``key`` (empty for any other object).

    Raises :class:`ValueError` for an RSA key shorter than 2048 bits.
    """
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"the RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} needed")
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return frozenset(alg for alg, curve in _EC_CURVES.items() if isinstance(key.curve, curve))
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()


def pem_verification_key(pem: str, algorithms: Collection[str]) -> VerificationKey:
    """A PEM public key (or X.509 certificate) as a key for those of ``algorithms`` it fits.

    Raises :class:`ValueError` (never quoting the PEM) when it is not a usable public key.
    """
    data = pem.strip().encode()
    if b"PRIVATE KEY" in data:
        raise ValueError("it holds a private key; give the public key only")
    try:
        if data.startswith(b"-----BEGIN CERTIFICATE-----"):
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(
            "it is not a PEM public key (-----BEGIN PUBLIC KEY-----) or certificate"
        ) from None
    return _verification_key(key, algorithms, None)


def jwk_verification_key(jwk: object, algorithms: Collection[str]) -> VerificationKey:
    """A public JWK (a mapping) as a key for those of ``algorithms`` it fits.

    The JWK's ``alg``, when present, narrows the algorithms to that one. Symmetric (``oct``)
    JWKs, JWKs with private members and JWKs not meant for signatures are refused. Raises
    :class:`ValueError` (never quoting the JWK) when the JWK is unusable.
    """
    if not isinstance(jwk, Mapping):
        raise ValueError("a JWK must be a JSON object")
    if jwk.get("kty") == "oct":
        raise ValueError("symmetric (kty 'oct') JWKs are not accepted; use `secret` for HS*")
    if any(member in jwk for member in _PRIVATE_JWK_MEMBERS):
        raise ValueError("the JWK holds private key material; give the public key only")
    if jwk.get("use", "sig") != "sig":
        raise ValueError("the JWK is not a signature key (its 'use' is not 'sig')")
    alg = jwk.get("alg")
    if alg is not None and (not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS):
        raise ValueError("the JWK's 'alg' is not a supported signature algorithm")
    hint = alg if alg is not None or jwk.get("kty") != "OKP" else "EdDSA"  # pyjwt: Ed25519 only
    try:
        parsed = jwt.PyJWK(dict(jwk), algorithm=hint)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError, AttributeError, UnsupportedAlgorithm):
        raise ValueError("the JWK is not a valid public key") from None
    allowed = frozenset(algorithms) if alg is None else frozenset(algorithms) & {alg}
    kid = jwk.get("kid")
    return _verification_key(parsed.key, allowed, kid if isinstance(kid, str) else None)


def _verification_key(key: object, algorithms: Collection[str], kid: str | None) -> VerificationKey:
    usable = key_algorithms(key)
    if not usable or not isinstance(key, _PUBLIC_KEY_TYPES):
        raise ValueError("it is not an RSA, EC (P-256/384/521) or Ed25519/Ed448 public key")
    return VerificationKey(key, usable & frozenset(algorithms), kid)


def _describe(key: PublicKey | bytes) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "an RSA key"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"an EC {key.curve.name} key"
    return "an EdDSA key"


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
        try:
            jwt.get_algorithm_by_name("HS256").prepare_key(raw)
        except jwt.InvalidKeyError:
            raise ValueError(
                "the HMAC secret looks like a PEM or SSH key; HS* needs a random shared secret"
            ) from None
        return value

    @field_validator("public_key")
    @classmethod
    def _usable_pem(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
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
    missing = sorted(
        name
        for name in info.data.get("algorithms", ())
        if name in ASYMMETRIC_ALGORITHMS and name not in key.algorithms
    )
    if missing:
        raise ValueError(f"{field} is {_describe(key.key)}; it cannot verify {', '.join(missing)}")

"""Key material for JWT verification: PEM and JWK public keys, and what each can verify.

Imported only where JWT is configured (config validation of ``auth.jwt`` and the verifier), so a
gateway without JWT never loads pyjwt or cryptography.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .auth import ASYMMETRIC_ALGORITHMS, EC_ALGORITHM_CURVES, RSA_ALGORITHMS

__all__ = [
    "PublicKey",
    "VerificationKey",
    "check_hmac_secret",
    "describe",
    "jwk_verification_key",
    "key_algorithms",
    "pem_verification_key",
]

_EC_CURVES: Mapping[str, type[ec.EllipticCurve]] = {
    alg: getattr(ec, curve) for alg, curve in EC_ALGORITHM_CURVES.items()
}
_RSA_ALGORITHMS = RSA_ALGORITHMS

MIN_RSA_BITS = 2048
_PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")

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


def describe(key: PublicKey | bytes) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "an RSA key"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"an EC {key.curve.name} key"
    return "an EdDSA key"


def check_hmac_secret(raw: bytes) -> None:
    """Raise ValueError when ``raw`` looks like a PEM or SSH key rather than a shared secret."""
    try:
        jwt.get_algorithm_by_name("HS256").prepare_key(raw)
    except jwt.InvalidKeyError:
        raise ValueError(
            "the HMAC secret looks like a PEM or SSH key; HS* needs a random shared secret"
        ) from None

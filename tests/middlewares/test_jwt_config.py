"""JwtConfig refuses unsafe or unusable JWT settings at load, without echoing a secret."""

from __future__ import annotations

import base64
import datetime
import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import RSAAlgorithm
from pydantic import ValidationError

from sidegate.config.auth import JwtConfig
from tests.middlewares.test_jwt_support import AUDIENCE, ISSUER, ec_key, jwk, pem, rsa_key

SECRET = "TOP-SECRET-hmac-key-0123456789abcdef"  # 36 bytes


@pytest.fixture(scope="session")
def rsa_private() -> rsa.RSAPrivateKey:
    return rsa_key()


@pytest.fixture(scope="session")
def ec_private() -> ec.EllipticCurvePrivateKey:
    return ec_key()


def build(**fields: Any) -> JwtConfig:
    return JwtConfig.model_validate({"issuer": ISSUER, "audience": AUDIENCE, **fields})


def refusal(**fields: Any) -> str:
    """Every message of the refusal; asserts none of them (nor the error's text) shows a secret."""
    with pytest.raises(ValidationError) as info:
        build(**fields)
    messages = " | ".join(error["msg"] for error in info.value.errors())
    for shown in (messages, str(info.value), repr(info.value)):
        assert "TOP-SECRET" not in shown
        assert "PRIVATE KEY" not in shown
        assert "MII" not in shown  # no PEM body
    return messages


def private_pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


# --- accepted -------------------------------------------------------------------------------


def test_design_example() -> None:
    config = build(
        algorithms=["RS256"], jwks_url="https://idp.example/jwks.json", team_claim="team"
    )
    assert (config.leeway_s, config.jwks_cache_s, config.jwks_refetch_cooldown_s) == (0, 300, 30)
    assert (config.team_claim, config.roles_claim, config.subject_claim) == ("team", "roles", "sub")


def test_static_key_sources(
    rsa_private: rsa.RSAPrivateKey, ec_private: ec.EllipticCurvePrivateKey
) -> None:
    build(algorithms=["RS256", "PS512"], public_key=pem(rsa_private))
    build(algorithms=["ES256"], public_key=pem(ec_private))
    build(algorithms=["RS256"], jwk=jwk(rsa_private, kid="k", use="sig", alg="RS256"))
    parsed = build(algorithms=["ES256"], jwk=json.dumps(jwk(ec_private)))
    assert parsed.jwk == jwk(ec_private)
    build(algorithms=["HS256", "HS384"], secret=SECRET + "x" * 12)
    for crv, curve in (("Ed25519", ed25519.Ed25519PrivateKey), ("Ed448", ed448.Ed448PrivateKey)):
        build(algorithms=["EdDSA"], jwk={"kty": "OKP", "crv": crv, "x": _x(curve)})


def test_certificate_as_public_key(rsa_private: rsa.RSAPrivateKey) -> None:
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "idp.example")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(rsa_private.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(rsa_private, hashes.SHA256())
    )
    build(algorithms=["RS256"], public_key=certificate.public_bytes(serialization.Encoding.PEM))


def test_secret_is_hidden_in_repr() -> None:
    config = build(algorithms=["HS256"], secret=SECRET)
    assert "TOP-SECRET" not in repr(config)
    assert "TOP-SECRET" not in str(config.model_dump())


def _x(curve: type[ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey]) -> str:
    public = curve.generate().public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# --- refused: algorithms --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["none", "None", "NONE", " none"])
def test_none_algorithm(name: str) -> None:
    assert "'none' algorithm is never accepted" in refusal(
        algorithms=["RS256", name], jwks_url="https://idp.example/jwks"
    )


@pytest.mark.parametrize("name", ["rs256", "RS1024", "ES256K", "HS128", "RSA-OAEP", ""])
def test_unknown_algorithm(name: str) -> None:
    assert "unknown algorithm" in refusal(algorithms=[name], jwks_url="https://idp.example/jwks")


def test_no_algorithms() -> None:
    assert "at least 1" in refusal(algorithms=[], jwks_url="https://idp.example/jwks")


@pytest.mark.parametrize("algorithms", [["HS256", "RS256"], ["ES256", "HS512"]])
def test_hmac_mixed_with_public_key_algorithms(algorithms: list[str]) -> None:
    assert "cannot be mixed" in refusal(algorithms=algorithms, secret=SECRET)


# --- refused: key sources -------------------------------------------------------------------


def test_no_key_source() -> None:
    assert "exactly one of jwks_url, public_key, jwk, secret" in refusal(algorithms=["RS256"])


def test_two_key_sources(rsa_private: rsa.RSAPrivateKey) -> None:
    message = refusal(
        algorithms=["RS256"], public_key=pem(rsa_private), jwks_url="https://idp.example/jwks"
    )
    assert "found: jwks_url, public_key" in message


@pytest.mark.parametrize("source", ["jwks_url", "public_key", "jwk"])
def test_hmac_needs_a_secret(rsa_private: rsa.RSAPrivateKey, source: str) -> None:
    value = {
        "jwks_url": "https://idp.example/jwks",
        "public_key": pem(rsa_private),
        "jwk": jwk(rsa_private),
    }[source]
    assert "HS* algorithms verify with `secret`" in refusal(algorithms=["HS256"], **{source: value})


def test_secret_only_with_hmac() -> None:
    assert "`secret` is only for HS256/HS384/HS512" in refusal(algorithms=["RS256"], secret=SECRET)


@pytest.mark.parametrize(
    ("algorithm", "secret", "needed"),
    [
        ("HS256", "TOP-SECRET-short", 32),
        ("HS256", "TOP-SECRET-" + "x" * 20, 32),  # 31 bytes
        ("HS384", SECRET, 48),
        ("HS512", SECRET + "x" * 20, 64),
    ],
)
def test_short_hmac_secret(algorithm: str, secret: str, needed: int) -> None:
    message = refusal(algorithms=[algorithm], secret=secret)
    assert f"at least {needed} bytes for {algorithm}" in message


def test_hmac_secret_that_is_a_public_key(rsa_private: rsa.RSAPrivateKey) -> None:
    assert "looks like a PEM or SSH key" in refusal(algorithms=["HS256"], secret=pem(rsa_private))


# --- refused: public_key --------------------------------------------------------------------


def test_public_key_that_is_not_pem() -> None:
    message = refusal(algorithms=["RS256"], public_key="TOP-SECRET not a key")
    assert "public_key: it is not a PEM public key" in message


def test_public_key_that_is_a_private_key(rsa_private: rsa.RSAPrivateKey) -> None:
    message = refusal(algorithms=["RS256"], public_key=private_pem(rsa_private))
    assert "holds a private key" in message


def test_public_key_of_the_wrong_kind(
    rsa_private: rsa.RSAPrivateKey, ec_private: ec.EllipticCurvePrivateKey
) -> None:
    assert "is an RSA key; it cannot verify ES256" in refusal(
        algorithms=["ES256"], public_key=pem(rsa_private)
    )
    assert "is an EC secp256r1 key; it cannot verify ES384" in refusal(
        algorithms=["ES384"], public_key=pem(ec_private)
    )
    assert "cannot verify RS256" in refusal(
        algorithms=["RS256", "ES256"], public_key=pem(ec_private)
    )


def test_weak_rsa_public_key() -> None:
    assert "1024 bits; at least 2048" in refusal(
        algorithms=["RS256"], public_key=pem(rsa_key(1024))
    )


def test_unsupported_curve() -> None:
    key = ec.generate_private_key(ec.SECP256K1())
    assert "not an RSA, EC" in refusal(algorithms=["ES256"], public_key=pem(key))


# --- refused: jwk ---------------------------------------------------------------------------


def test_jwk_that_is_not_json() -> None:
    assert "jwk is not valid JSON" in refusal(algorithms=["RS256"], jwk="{TOP-SECRET")


def test_jwk_that_is_not_an_object() -> None:
    assert "must be a JSON object" in refusal(algorithms=["RS256"], jwk='["TOP-SECRET"]')


def test_symmetric_jwk() -> None:
    message = refusal(algorithms=["RS256"], jwk={"kty": "oct", "k": "VE9QLVNFQ1JFVA"})
    assert "symmetric" in message


def test_private_jwk(rsa_private: rsa.RSAPrivateKey) -> None:
    private = RSAAlgorithm.to_jwk(rsa_private, as_dict=True)
    message = refusal(algorithms=["RS256"], jwk=private)
    assert "private key material" in message
    assert private["d"] not in message


def test_jwk_not_for_signatures(rsa_private: rsa.RSAPrivateKey) -> None:
    assert "not a signature key" in refusal(algorithms=["RS256"], jwk=jwk(rsa_private, use="enc"))


def test_jwk_of_the_wrong_kind(
    rsa_private: rsa.RSAPrivateKey, ec_private: ec.EllipticCurvePrivateKey
) -> None:
    assert "cannot verify ES256" in refusal(algorithms=["ES256"], jwk=jwk(rsa_private))
    assert "cannot verify RS256" in refusal(algorithms=["RS256"], jwk=jwk(ec_private))


def test_jwk_alg_narrows_the_algorithms(rsa_private: rsa.RSAPrivateKey) -> None:
    message = refusal(algorithms=["RS256", "PS256"], jwk=jwk(rsa_private, alg="RS256"))
    assert "cannot verify PS256" in message
    for alg in ("HS256", ["RS256"], {"RS256": 1}):
        assert "not a supported signature algorithm" in refusal(
            algorithms=["RS256"], jwk=jwk(rsa_private, alg=alg)
        )


@pytest.mark.parametrize(
    "data",
    [
        {"kty": "RSA", "n": "!!", "e": "AQAB"},
        {"kty": "RSA"},
        {"kty": "EC", "crv": "P-999", "x": "AA", "y": "AA"},
        {"n": "AQAB"},
        {"kty": "TOP-SECRET"},
    ],
)
def test_invalid_jwk(data: dict[str, Any]) -> None:
    assert "jwk: the JWK is not a valid public key" in refusal(algorithms=["RS256"], jwk=data)


# --- refused: other fields ------------------------------------------------------------------


@pytest.mark.parametrize("leeway", [-1, 301])
def test_leeway_bounds(leeway: float) -> None:
    refusal(algorithms=["RS256"], jwks_url="https://idp.example/jwks", leeway_s=leeway)


@pytest.mark.parametrize(
    "fields",
    [
        {"audience": []},
        {"audience": ""},
        {"issuer": ""},
        {"team_claim": ""},
        {"jwks_refetch_cooldown_s": 0},
        {"jwks_cache_s": -1},
        {"jwks_timeout_s": 0},
        {"jwks_url": "ftp://idp.example/jwks"},
        {"unknown": 1},
    ],
)
def test_other_refusals(fields: dict[str, Any]) -> None:
    refusal(**{"algorithms": ["RS256"], "jwks_url": "https://idp.example/jwks", **fields})


def test_frozen() -> None:
    config = build(algorithms=["RS256"], jwks_url="https://idp.example/jwks")
    with pytest.raises(ValidationError):
        config.issuer = "https://evil.example"  # type: ignore[misc]

"""JwtVerifier with static keys (PEM, JWK, HMAC secret): attacks, claim checks, extracted claims."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sidegate.middlewares.errors import error_response
from sidegate.middlewares.jwt_verify import AuthUnavailable, Claims, InvalidToken, JwtVerifier
from tests.middlewares.test_jwt_support import (
    AUDIENCE,
    ISSUER,
    SUBJECT,
    TEAM,
    assert_invalid,
    config,
    ec_key,
    forge,
    forge_hmac,
    jwk,
    payload,
    pem,
    rsa_key,
    sign,
    sign_raw,
)

SECRET = b"0123456789abcdef0123456789abcdef"  # 32 bytes

MakeVerifier = Callable[..., JwtVerifier]


@pytest.fixture(scope="session")
def rsa_private() -> rsa.RSAPrivateKey:
    return rsa_key()


@pytest.fixture(scope="session")
def other_rsa_private() -> rsa.RSAPrivateKey:
    return rsa_key()


@pytest.fixture(scope="session")
def ec_private() -> ec.EllipticCurvePrivateKey:
    return ec_key()


@pytest.fixture
async def make_verifier() -> AsyncIterator[MakeVerifier]:
    made: list[JwtVerifier] = []

    def make(**fields: Any) -> JwtVerifier:
        verifier = JwtVerifier(config(**fields))
        made.append(verifier)
        return verifier

    yield make
    for verifier in made:
        await verifier.close()


@pytest.fixture
def pem_verifier(make_verifier: MakeVerifier, rsa_private: rsa.RSAPrivateKey) -> JwtVerifier:
    return make_verifier(public_key=pem(rsa_private))


async def refused(verifier: JwtVerifier, token: str, says: str) -> InvalidToken:
    with pytest.raises(InvalidToken) as info:
        await verifier.verify(token)
    assert_invalid(info.value, token, says)
    return info.value


# --- valid tokens ---------------------------------------------------------------------------


async def test_rs256_via_pem(pem_verifier: JwtVerifier, rsa_private: rsa.RSAPrivateKey) -> None:
    claims = await pem_verifier.verify(sign(rsa_private))
    assert claims == Claims(subject=SUBJECT, team=TEAM, roles=frozenset(), claims=claims.claims)
    assert claims.claims["iss"] == ISSUER


@pytest.mark.parametrize("as_json", [False, True])
async def test_rs256_via_jwk(
    make_verifier: MakeVerifier, rsa_private: rsa.RSAPrivateKey, as_json: bool
) -> None:
    key = jwk(rsa_private, kid="k1", use="sig")
    verifier = make_verifier(jwk=json.dumps(key) if as_json else key)
    assert (await verifier.verify(sign(rsa_private, kid="k1"))).subject == SUBJECT


async def test_ps256_via_jwk_without_alg(
    make_verifier: MakeVerifier, rsa_private: rsa.RSAPrivateKey
) -> None:
    verifier = make_verifier(algorithms=["PS256"], jwk=jwk(rsa_private))
    assert (await verifier.verify(sign(rsa_private, "PS256"))).subject == SUBJECT


async def test_es256_via_pem_and_jwk(
    make_verifier: MakeVerifier, ec_private: ec.EllipticCurvePrivateKey
) -> None:
    token = sign(ec_private, "ES256")
    for source in ({"public_key": pem(ec_private)}, {"jwk": jwk(ec_private)}):
        verifier = make_verifier(algorithms=["ES256"], **source)
        assert (await verifier.verify(token)).team == TEAM


async def test_eddsa_via_pem(make_verifier: MakeVerifier) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    verifier = make_verifier(algorithms=["EdDSA"], public_key=public.decode())
    token = jwt.encode(payload(), private, algorithm="EdDSA")
    assert (await verifier.verify(token)).subject == SUBJECT


@pytest.mark.parametrize(("alg", "size"), [("HS256", 32), ("HS384", 48), ("HS512", 64)])
async def test_hmac_secret(make_verifier: MakeVerifier, alg: str, size: int) -> None:
    secret = (b"0123456789abcdef" * 4)[:size]
    verifier = make_verifier(algorithms=[alg], secret=secret.decode())
    assert (await verifier.verify(sign(secret, alg))).subject == SUBJECT
    await refused(verifier, sign(secret[::-1], alg), "signature")


async def test_audience_list(make_verifier: MakeVerifier, rsa_private: rsa.RSAPrivateKey) -> None:
    verifier = make_verifier(public_key=pem(rsa_private), audience=["other", AUDIENCE])
    await verifier.verify(sign(rsa_private))
    await verifier.verify(sign(rsa_private, aud=["unrelated", AUDIENCE]))
    await refused(verifier, sign(rsa_private, aud="unrelated"), "audience")
    await refused(verifier, sign(rsa_private, aud=["unrelated", "third"]), "audience")


# --- attacks --------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("source", ["pem", "jwk", "secret"])
async def test_alg_none_is_refused(
    make_verifier: MakeVerifier, rsa_private: rsa.RSAPrivateKey, alg: str, source: str
) -> None:
    fields: dict[str, Any] = {
        "pem": {"public_key": pem(rsa_private)},
        "jwk": {"jwk": jwk(rsa_private)},
        "secret": {"algorithms": ["HS256"], "secret": SECRET.decode()},
    }[source]
    verifier = make_verifier(**fields)
    for signature in (b"", b"anything"):
        token = forge({"alg": alg, "typ": "JWT"}, payload(), signature)
        await refused(verifier, token, "algorithm is not allowed")


@pytest.mark.parametrize("source", ["pem", "jwk"])
async def test_hs256_signed_with_the_public_key_is_refused(
    make_verifier: MakeVerifier, rsa_private: rsa.RSAPrivateKey, source: str
) -> None:
    """The classic key-confusion attack: the RS256 public key used as an HMAC secret."""
    if source == "pem":
        verifier = make_verifier(public_key=pem(rsa_private))
    else:
        verifier = make_verifier(jwk=jwk(rsa_private, kid="k1"))
    public_forms = (
        pem(rsa_private).encode(),
        pem(rsa_private).strip().encode(),
        json.dumps(jwk(rsa_private, kid="k1")).encode(),
        json.dumps(jwk(rsa_private)).encode(),
    )
    for secret in public_forms:
        for alg in ("HS256", "HS384", "HS512"):
            await refused(verifier, forge_hmac(secret, alg=alg, kid="k1"), "algorithm")


async def test_token_alg_outside_the_configured_list(
    make_verifier: MakeVerifier, rsa_private: rsa.RSAPrivateKey
) -> None:
    verifier = make_verifier(public_key=pem(rsa_private), algorithms=["RS256"])
    await refused(verifier, sign(rsa_private, "RS384"), "algorithm is not allowed")
    await refused(verifier, sign(rsa_private, "PS256"), "algorithm is not allowed")


async def test_signature_by_another_key(
    pem_verifier: JwtVerifier, other_rsa_private: rsa.RSAPrivateKey
) -> None:
    await refused(pem_verifier, sign(other_rsa_private), "signature is invalid")


async def test_tampered_payload(pem_verifier: JwtVerifier, rsa_private: rsa.RSAPrivateKey) -> None:
    header, _, signature = sign(rsa_private).split(".")
    forged = forge({}, payload(team="admins"))
    token = f"{header}.{forged.split('.')[1]}.{signature}"
    await refused(pem_verifier, token, "signature is invalid")


async def test_missing_exp(pem_verifier: JwtVerifier, rsa_private: rsa.RSAPrivateKey) -> None:
    await refused(pem_verifier, sign(rsa_private, exp=None), "required 'exp' claim")


async def test_missing_iss_and_aud(
    pem_verifier: JwtVerifier, rsa_private: rsa.RSAPrivateKey
) -> None:
    await refused(pem_verifier, sign(rsa_private, iss=None), "required 'iss' claim")
    await refused(pem_verifier, sign(rsa_private, aud=None), "required 'aud' claim")


async def test_wrong_audience(pem_verifier: JwtVerifier, rsa_private: rsa.RSAPrivateKey) -> None:
    await refused(pem_verifier, sign(rsa_private, aud="sidegate-staging"), "audience")
    await refused(pem_verifier, sign(rsa_private, aud="sidegat"), "audience")


@pytest.mark.parametrize(
    "issuer",
    [
        "https://idp.exampl",  # a prefix of the configured issuer
        "https://idp.example.evil.com",  # the configured issuer is a prefix of it
        "https://idp.example/",
        "idp.example",  # a substring
        "https://idp",
        "HTTPS://IDP.EXAMPLE",
        "",
    ],
)
async def test_issuer_must_match_exactly(
    pem_verifier: JwtVerifier, rsa_private: rsa.RSAPrivateKey, issuer: str
) -> None:
    await refused(pem_verifier, sign(rsa_private, iss=issuer), "issuer")


async def test_issuer_list_or_number_is_refused(
    pem_verifier: JwtVerifier, rsa_private: rsa.RSAPrivateKey
) -> None:
    await refused(pem_verifier, sign_raw(rsa_private, payload(iss=[ISSUER])), "issuer")
    await refused(pem_verifier, sign_raw(rsa_private, payload(iss=1)), "issuer")


async def test_expired(pem_verifier: JwtVerifier, rsa_private: rsa.RSAPrivateKey) -> None:
    await refused(pem_verifier, sign(rsa_private, exp=int(time.time()) - 1), "expired")


async def test_leeway_boundaries(
    make_verifier: MakeVerifier, rsa_private: rsa.RSAPrivateKey
) -> None:
    """pyjwt reads the wall clock itself, so tokens are signed relative to it. ``exp`` is whole
    seconds at or before now: 30 s past stays valid unless this test stalls for 30 s, and 61 s
    past is past the 60 s leeway whatever the stall."""
    verifier = make_verifier(public_key=pem(rsa_private), leeway_s=60)
    now = int(time.time())
    await verifier.verify(sign(rsa_private, exp=now - 30, iat=now - 100))
    await refused(verifier, sign(rsa_private, exp=now - 61, iat=now - 100), "expired")
    strict = make_verifier(public_key=pem(rsa_private))
    await refused(strict, sign(rsa_private, exp=now - 30, iat=now - 100), "expired")


async def test_nbf_in_the_future(
    make_verifier: MakeVerifier, rsa_private: rsa.RSAPrivateKey
) -> None:
    strict = make_verifier(public_key=pem(rsa_private))
    await refused(strict, sign(rsa_private, nbf=int(time.time()) + 120), "not valid yet")
    lenient = make_verifier(public_key=pem(rsa_private), leeway_s=60)
    await lenient.verify(sign(rsa_private, nbf=int(time.time()) + 30))
    await refused(lenient, sign(rsa_private, nbf=int(time.time()) + 120), "not valid yet")


async def test_iat_in_the_future(pem_verifier: JwtVerifier, rsa_private: rsa.RSAPrivateKey) -> None:
    await refused(pem_verifier, sign(rsa_private, iat=int(time.time()) + 120), "not valid yet")


@pytest.mark.parametrize(
    "crit",
    [["urn:example:unknown"], ["exp"], ["b64"], [], "urn:example:unknown"],
)
async def test_crit_header_is_refused(
    pem_verifier: JwtVerifier, rsa_private: rsa.RSAPrivateKey, crit: Any
) -> None:
    token = sign(rsa_private, headers={"crit": crit, "urn:example:unknown": True})
    await refused(pem_verifier, token, "header is not acceptable")


def test_pyjwt_itself_refuses_unknown_crit(rsa_private: rsa.RSAPrivateKey) -> None:
    """pyjwt 2.15 already refuses critical extensions other than ``b64``; sidegate refuses every
    ``crit`` before pyjwt sees the token, so both layers hold."""
    token = sign(rsa_private, headers={"crit": ["urn:example:unknown"]})
    with pytest.raises(jwt.InvalidTokenError, match="critical extension"):
        jwt.decode(token, rsa_private.public_key(), algorithms=["RS256"], audience=AUDIENCE)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-token",
        "a.b.c",
        "a.b",
        "....",
        "eyJhbGciOiJSUzI1NiJ9.e30.!!!!",
        forge({"alg": "RS256", "kid": 7}, payload()),
        "x" * 20_000,
    ],
)
async def test_malformed_tokens(pem_verifier: JwtVerifier, token: str) -> None:
    with pytest.raises(InvalidToken) as info:
        await pem_verifier.verify(token)
    assert_invalid(info.value, token, "")


async def test_header_that_is_not_an_object(pem_verifier: JwtVerifier) -> None:
    header = base64.urlsafe_b64encode(b'["alg","RS256"]').rstrip(b"=").decode()
    await refused(pem_verifier, f"{header}.e30.c2ln", "malformed")


async def test_unexpected_error_is_a_401_not_a_pass(
    pem_verifier: JwtVerifier, rsa_private: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise RuntimeError(f"library bug while reading {args[0]}")

    monkeypatch.setattr(jwt, "decode", boom)
    await refused(pem_verifier, sign(rsa_private), "could not be verified")


# --- claims ---------------------------------------------------------------------------------


async def test_team_and_roles(make_verifier: MakeVerifier, rsa_private: rsa.RSAPrivateKey) -> None:
    verifier = make_verifier(public_key=pem(rsa_private), team_claim="groups")
    claims = await verifier.verify(
        sign(rsa_private, groups=["search", "ads"], roles=["admin", "reader", 3, None, ""])
    )
    assert claims.team == "search"
    assert claims.roles == {"admin", "reader"}


@pytest.mark.parametrize(
    ("fields", "claims", "team", "roles", "subject"),
    [
        ({}, {}, TEAM, set(), SUBJECT),
        ({}, {"team": None, "roles": "reader"}, None, {"reader"}, SUBJECT),
        ({"team_claim": "org.team"}, {"org": {"team": "ads"}}, "ads", set(), SUBJECT),
        ({"team_claim": "org.team"}, {"org": "flat"}, None, set(), SUBJECT),
        ({"team_claim": "org.team"}, {"org": {"team": ["a", "b"]}}, "a", set(), SUBJECT),
        ({"team_claim": "groups"}, {"groups": []}, None, set(), SUBJECT),
        ({"team_claim": "groups"}, {"groups": [1, "x"]}, None, set(), SUBJECT),
        ({"team_claim": "team"}, {"team": 42}, None, set(), SUBJECT),
        (
            {"roles_claim": "realm_access.roles"},
            {"realm_access": {"roles": ["a", "b"]}},
            TEAM,
            {"a", "b"},
            SUBJECT,
        ),
        ({"roles_claim": "realm_access.roles"}, {"realm_access": None}, TEAM, set(), SUBJECT),
        (
            {"team_claim": "https://example.com/team", "roles_claim": "https://example.com/roles"},
            {"https://example.com/team": "ns", "https://example.com/roles": ["r"]},
            "ns",
            {"r"},
            SUBJECT,
        ),
        ({"subject_claim": "email"}, {"email": "a@example.com"}, TEAM, set(), "a@example.com"),
        ({"subject_claim": "email"}, {}, TEAM, set(), None),
        ({}, {"sub": None}, TEAM, set(), None),
    ],
)
async def test_claim_paths(
    make_verifier: MakeVerifier,
    rsa_private: rsa.RSAPrivateKey,
    fields: dict[str, Any],
    claims: dict[str, Any],
    team: str | None,
    roles: set[str],
    subject: str | None,
) -> None:
    verifier = make_verifier(public_key=pem(rsa_private), **fields)
    result = await verifier.verify(sign(rsa_private, **claims))
    assert (result.team, set(result.roles), result.subject) == (team, roles, subject)


async def test_claims_are_read_only(
    pem_verifier: JwtVerifier, rsa_private: rsa.RSAPrivateKey
) -> None:
    claims = await pem_verifier.verify(sign(rsa_private))
    with pytest.raises(TypeError):
        claims.claims["team"] = "admins"  # type: ignore[index]


# --- errors on the wire ---------------------------------------------------------------------


def test_invalid_token_response() -> None:
    response = error_response(InvalidToken("The token has expired."))
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert response.body is not None
    assert orjson.loads(response.body) == {
        "error": {
            "type": "invalid_request_error",
            "message": "The token has expired.",
            "param": None,
            "code": "invalid_token",
        }
    }


def test_auth_unavailable_response() -> None:
    response = error_response(AuthUnavailable("The keys cannot be fetched now."))
    assert response.status == 503
    assert response.body is not None
    assert orjson.loads(response.body)["error"]["code"] == "auth_unavailable"

"""JwtVerifier with a JWKS URL served by a real aiohttp server on loopback: caching, the refetch
cooldown, single-flight fetches, rotation, outages, and the unknown-kid flood."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import string
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer, unused_port
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from structlog.testing import capture_logs

from sidegate.middlewares.jwt_verify import AuthUnavailable, InvalidToken, JwtVerifier
from tests.middlewares.test_jwt_support import (
    SUBJECT,
    FakeClock,
    JwksServer,
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
)

COOLDOWN = 30.0
CACHE = 300.0

AiohttpServer = Callable[..., Awaitable[TestServer]]
MakeVerifier = Callable[..., JwtVerifier]


@pytest.fixture(scope="session")
def key_a() -> rsa.RSAPrivateKey:
    return rsa_key()


@pytest.fixture(scope="session")
def key_b() -> rsa.RSAPrivateKey:
    return rsa_key()


@pytest.fixture(scope="session")
def key_ec() -> ec.EllipticCurvePrivateKey:
    return ec_key()


@pytest.fixture
async def jwks(
    aiohttp_server: AiohttpServer, key_a: rsa.RSAPrivateKey
) -> AsyncIterator[JwksServer]:
    state = JwksServer()
    state.keys = [jwk(key_a, kid="a", use="sig", alg="RS256")]
    server = await aiohttp_server(state.app())
    state.url = str(server.make_url("/jwks.json"))
    yield state
    state.release()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_verifier(jwks: JwksServer, clock: FakeClock) -> AsyncIterator[MakeVerifier]:
    made: list[JwtVerifier] = []

    def make(**fields: Any) -> JwtVerifier:
        settings = {
            "jwks_url": jwks.url,
            "jwks_refetch_cooldown_s": COOLDOWN,
            "jwks_cache_s": CACHE,
            **fields,
        }
        verifier = JwtVerifier(config(**settings), clock=clock)
        made.append(verifier)
        return verifier

    yield make
    for verifier in made:
        await verifier.close()


@pytest.fixture
def verifier(make_verifier: MakeVerifier) -> JwtVerifier:
    return make_verifier()


async def refused(verifier: JwtVerifier, token: str, says: str) -> InvalidToken:
    with pytest.raises(InvalidToken) as info:
        await verifier.verify(token)
    assert_invalid(info.value, token, says)
    return info.value


async def unavailable(verifier: JwtVerifier, token: str) -> AuthUnavailable:
    with pytest.raises(AuthUnavailable) as info:
        await verifier.verify(token)
    exc = info.value
    assert (exc.status, exc.code) == (503, "auth_unavailable")
    assert token not in str(exc)
    return exc


def random_kid_token() -> str:
    kid = "".join(random.choices(string.ascii_letters + string.digits, k=16))
    return forge({"alg": "RS256", "typ": "JWT", "kid": kid}, payload(), b"\x00" * 256)


# --- valid tokens and caching ---------------------------------------------------------------


async def test_rs256_via_jwks_is_fetched_once_and_cached(
    verifier: JwtVerifier, jwks: JwksServer, key_a: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    for _ in range(3):
        assert (await verifier.verify(sign(key_a, kid="a"))).subject == SUBJECT
    assert jwks.fetches == 1
    clock.advance(CACHE - 1)
    await verifier.verify(sign(key_a, kid="a"))
    assert jwks.fetches == 1
    clock.advance(1)
    await verifier.verify(sign(key_a, kid="a"))
    assert jwks.fetches == 2


async def test_es256_and_rs256_in_one_jwks(
    make_verifier: MakeVerifier,
    jwks: JwksServer,
    key_a: rsa.RSAPrivateKey,
    key_ec: ec.EllipticCurvePrivateKey,
) -> None:
    jwks.keys.append(jwk(key_ec, kid="e"))
    verifier = make_verifier(algorithms=["RS256", "ES256"])
    await verifier.verify(sign(key_a, kid="a"))
    await verifier.verify(sign(key_ec, "ES256", kid="e"))
    await refused(verifier, sign(key_ec, "ES256", kid="a"), "does not fit its key")
    await refused(verifier, sign(key_a, "RS256", kid="e"), "does not fit its key")
    assert jwks.fetches == 1


async def test_token_without_kid(
    verifier: JwtVerifier, jwks: JwksServer, key_a: rsa.RSAPrivateKey, key_b: rsa.RSAPrivateKey
) -> None:
    await verifier.verify(sign(key_a))
    jwks.keys.append(jwk(key_b, kid="b"))
    several = JwtVerifier(config(jwks_url=jwks.url))
    try:
        await refused(several, sign(key_a), "no key id")
    finally:
        await several.close()


async def test_keys_that_do_not_fit_are_skipped(
    make_verifier: MakeVerifier, jwks: JwksServer, key_a: rsa.RSAPrivateKey
) -> None:
    weak = rsa_key(1024)
    jwks.keys = [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        jwk(weak, kid="weak"),
        jwk(key_a, kid="enc", use="enc"),
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        jwk(key_a, kid="odd", alg=["RS256"], use=["sig"]),
        "not a key",
        jwk(key_a, kid="a"),
    ]
    verifier = make_verifier()
    await verifier.verify(sign(key_a, kid="a"))
    weak_token = forge({"alg": "RS256", "kid": "weak"}, payload(), b"\x00" * 128)
    await refused(verifier, weak_token, "key id is not known")
    await refused(verifier, forge_hmac(b"secret", kid="hmac"), "algorithm is not allowed")


# --- attacks --------------------------------------------------------------------------------


async def test_alg_none_and_key_confusion_never_fetch(
    verifier: JwtVerifier, jwks: JwksServer, key_a: rsa.RSAPrivateKey
) -> None:
    await refused(verifier, forge({"alg": "none", "kid": "a"}, payload()), "algorithm")
    for secret in (pem(key_a).encode(), json.dumps(jwk(key_a, kid="a")).encode()):
        await refused(verifier, forge_hmac(secret, kid="a"), "algorithm")
    assert jwks.fetches == 0


async def test_unknown_kid_flood_makes_one_fetch_and_never_blocks_the_loop(
    verifier: JwtVerifier, jwks: JwksServer, key_a: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    await verifier.verify(sign(key_a, kid="a"))
    assert jwks.fetches == 1
    clock.advance(COOLDOWN)
    tokens = [random_kid_token() for _ in range(1_000)]

    loop = asyncio.get_running_loop()
    beats: list[float] = []
    stop = asyncio.Event()
    five_more = asyncio.Event()
    wanted = 0

    async def heartbeat() -> None:
        while not stop.is_set():
            beats.append(loop.time())
            if wanted and len(beats) >= wanted:
                five_more.set()
            await asyncio.sleep(0.001)

    beating = asyncio.create_task(heartbeat())
    jwks.hold()
    tasks = [asyncio.create_task(verifier.verify(token)) for token in tokens]
    await asyncio.wait_for(jwks.started.wait(), 5)
    # The JWKS server runs on this same loop: it answered while 1,000 verifications were
    # waiting, and the heartbeat keeps beating, so the fetch does not block the loop.
    wanted = len(beats) + 5
    await asyncio.wait_for(five_more.wait(), 5)
    assert jwks.fetches == 2
    assert not any(task.done() for task in tasks)
    jwks.release()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    stop.set()
    await beating

    assert jwks.fetches == 2  # one refetch for 1,000 unknown kids
    for token, result in zip(tokens, results, strict=True):
        assert isinstance(result, InvalidToken)
        assert_invalid(result, token, "key id is not known")
    gaps = [later - earlier for earlier, later in itertools.pairwise(beats)]
    assert max(gaps) < 0.5

    # Within the cooldown, another flood is refused without any fetch.
    results = await asyncio.gather(
        *(verifier.verify(random_kid_token()) for _ in range(1_000)), return_exceptions=True
    )
    assert all(isinstance(result, InvalidToken) for result in results)
    assert jwks.fetches == 2


async def test_flood_on_a_cold_cache_shares_the_first_fetch(
    verifier: JwtVerifier, jwks: JwksServer, key_a: rsa.RSAPrivateKey
) -> None:
    tokens = [random_kid_token() for _ in range(1_000)]
    results = await asyncio.gather(
        *(verifier.verify(token) for token in tokens),
        verifier.verify(sign(key_a, kid="a")),
        return_exceptions=True,
    )
    assert jwks.fetches == 1
    assert all(isinstance(result, InvalidToken) for result in results[:-1])
    assert not isinstance(results[-1], BaseException)
    assert results[-1].subject == SUBJECT


async def test_rotated_jwks_accepts_the_new_kid_after_one_refetch(
    verifier: JwtVerifier,
    jwks: JwksServer,
    key_a: rsa.RSAPrivateKey,
    key_b: rsa.RSAPrivateKey,
    clock: FakeClock,
) -> None:
    await verifier.verify(sign(key_a, kid="a"))
    jwks.keys = [jwk(key_b, kid="b", use="sig", alg="RS256")]
    new = sign(key_b, kid="b")

    clock.advance(COOLDOWN - 1)
    await refused(verifier, new, "key id is not known")
    assert jwks.fetches == 1  # still in the cooldown: no fetch

    clock.advance(1)
    assert (await verifier.verify(new)).subject == SUBJECT
    assert jwks.fetches == 2
    await verifier.verify(new)
    await refused(verifier, sign(key_a, kid="a"), "key id is not known")
    assert jwks.fetches == 2


async def test_concurrent_new_kid_requests_share_one_refetch(
    verifier: JwtVerifier,
    jwks: JwksServer,
    key_a: rsa.RSAPrivateKey,
    key_b: rsa.RSAPrivateKey,
    clock: FakeClock,
) -> None:
    await verifier.verify(sign(key_a, kid="a"))
    jwks.keys.append(jwk(key_b, kid="b"))
    clock.advance(COOLDOWN)
    results = await asyncio.gather(*(verifier.verify(sign(key_b, kid="b")) for _ in range(50)))
    assert {result.subject for result in results} == {SUBJECT}
    assert jwks.fetches == 2


# --- outages --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, b'{"error": "down"}'),
        (200, b"<html>not json</html>"),
        (200, b'{"keys": []}'),
        (200, b'{"keys": "nope"}'),
        (200, b"[1, 2]"),
        (200, b'{"keys": [' + b'{"kty": "RSA"}, ' * 70_000 + b"{}]}"),
    ],
)
async def test_jwks_down_with_nothing_cached(
    verifier: JwtVerifier,
    jwks: JwksServer,
    key_a: rsa.RSAPrivateKey,
    clock: FakeClock,
    status: int,
    body: bytes,
) -> None:
    jwks.status, jwks.body = status, body
    token = sign(key_a, kid="a")
    await unavailable(verifier, token)
    await unavailable(verifier, token)
    assert jwks.fetches == 1  # a failed fetch also waits out the cooldown
    jwks.status, jwks.body = 200, None
    clock.advance(COOLDOWN)
    assert (await verifier.verify(token)).subject == SUBJECT
    assert jwks.fetches == 2


async def test_jwks_unreachable(make_verifier: MakeVerifier, key_a: rsa.RSAPrivateKey) -> None:
    verifier = make_verifier(jwks_url=f"http://127.0.0.1:{unused_port()}/jwks.json")
    await unavailable(verifier, sign(key_a, kid="a"))


async def test_jwks_timeout(
    make_verifier: MakeVerifier, jwks: JwksServer, key_a: rsa.RSAPrivateKey
) -> None:
    jwks.hold()
    verifier = make_verifier(jwks_timeout_s=0.1)
    await unavailable(verifier, sign(key_a, kid="a"))
    assert jwks.fetches == 1


async def test_jwks_down_after_a_successful_fetch_keeps_the_cached_keys(
    verifier: JwtVerifier, jwks: JwksServer, key_a: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    token = sign(key_a, kid="a")
    await verifier.verify(token)
    jwks.status = 503
    clock.advance(CACHE)
    with capture_logs() as logs:
        assert (await verifier.verify(token)).subject == SUBJECT
    assert jwks.fetches == 2
    warnings = [entry for entry in logs if entry["event"] == "jwks_fetch_failed"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["cached_keys"] == 1
    assert token not in repr(logs)

    # The cache stays usable, and a kid it lacks cannot be judged while the JWKS is down.
    await verifier.verify(token)
    await unavailable(verifier, random_kid_token())
    assert jwks.fetches == 2


# --- sessions -------------------------------------------------------------------------------


async def test_session_from_factory_belongs_to_the_caller(
    jwks: JwksServer, key_a: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    async with aiohttp.ClientSession() as session:
        verifier = JwtVerifier(config(jwks_url=jwks.url), session_factory=lambda: session)
        await verifier.verify(sign(key_a, kid="a"))
        await verifier.close()
        assert not session.closed
    assert jwks.fetches == 1


async def test_close_stops_a_fetch_in_flight(jwks: JwksServer, key_a: rsa.RSAPrivateKey) -> None:
    verifier = JwtVerifier(config(jwks_url=jwks.url))
    jwks.hold()
    pending = asyncio.create_task(verifier.verify(sign(key_a, kid="a")))
    await asyncio.wait_for(jwks.started.wait(), 5)
    await verifier.close()
    with pytest.raises(AuthUnavailable):
        await pending
    with pytest.raises(AuthUnavailable):
        await verifier.verify(sign(key_a, kid="a"))

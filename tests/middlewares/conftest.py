"""Fixtures for the middleware tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.middlewares import test_outbound_support


@pytest.fixture(params=["apart", "in_retry"])
def rotation(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test of retry with key rotation both ways the gateway can: key rotation as its own
    middleware inside retry, and as retry's own part (``retry_middleware(keys=...)``)."""
    test_outbound_support.ROTATION = request.param
    yield request.param
    test_outbound_support.ROTATION = "apart"

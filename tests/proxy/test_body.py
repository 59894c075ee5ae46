"""Reading a request body once: whole, bounded, and without waiting for more than it announced."""

from __future__ import annotations

import asyncio
from unittest import mock

import pytest
from aiohttp import streams, web
from aiohttp.test_utils import make_mocked_request

from sidegate.middlewares.errors import BodyTooLarge
from sidegate.proxy.body import body_received, read_body


def _request(length: int | None) -> tuple[streams.StreamReader, web.Request]:
    reader = streams.StreamReader(
        mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop()
    )
    headers = {} if length is None else {"Content-Length": str(length)}
    return reader, make_mocked_request(
        "POST", "/v1/chat/completions", headers=headers, payload=reader
    )


async def test_a_body_is_whole_once_its_content_length_has_arrived() -> None:
    # No end of stream is ever fed: a read that waited for it would not return.
    reader, request = _request(9)
    reader.feed_data(b"abc")
    reader.feed_data(b"defghi")
    assert await asyncio.wait_for(read_body(request, 100), 5) == b"abcdefghi"


async def test_a_body_without_a_length_is_read_in_pieces_to_its_end() -> None:
    reader, request = _request(None)
    reader.feed_data(b"abc")
    loop = asyncio.get_running_loop()
    loop.call_soon(reader.feed_data, b"def")  # after read_body has taken the first piece
    loop.call_soon(reader.feed_eof)
    assert await asyncio.wait_for(read_body(request, 100), 5) == b"abcdef"


async def test_a_body_over_the_limit_is_refused_as_it_grows_or_by_its_length() -> None:
    reader, request = _request(None)
    reader.feed_data(b"x" * 60)
    reader.feed_data(b"y" * 60)
    with pytest.raises(BodyTooLarge):
        await read_body(request, 100)
    _, announced = _request(101)
    with pytest.raises(BodyTooLarge):
        await read_body(announced, 100)


async def test_a_body_that_has_all_arrived_is_taken_without_waiting() -> None:
    reader, request = _request(9)
    reader.feed_data(b"abc")
    assert body_received(request, 100) is None  # more to come: read_body waits for it
    reader.feed_data(b"defghi")
    reader.feed_eof()
    assert body_received(request, 100) == b"abcdefghi"
    empty, nothing = _request(None)
    empty.feed_eof()
    assert body_received(nothing, 100) == b""


async def test_a_received_body_over_the_limit_is_refused_by_its_size_or_its_length() -> None:
    reader, request = _request(None)
    reader.feed_data(b"x" * 101)
    reader.feed_eof()
    with pytest.raises(BodyTooLarge):
        body_received(request, 100)
    _, announced = _request(101)  # refused before anything has arrived
    with pytest.raises(BodyTooLarge):
        body_received(announced, 100)

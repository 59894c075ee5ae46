"""The Call: the request body and the upstream's answer are each parsed once."""

from __future__ import annotations

import pytest

from sidegate.middlewares.contract import Call, EndpointKind, Route, Vendor
from sidegate.middlewares.errors import BadRequest

ROUTE = Route("meridian", Vendor.MERIDIAN, EndpointKind.EMBEDDINGS, "/v1/embeddings")


def test_the_answer_is_parsed_once_per_body_however_many_policies_read_it() -> None:
    call = Call("rid", ROUTE, b"{}", "application/json")
    body = b'{"data": [], "usage": {"prompt_tokens": 3}}'
    first = call.answer_json(body)
    assert first == {"data": [], "usage": {"prompt_tokens": 3}}
    assert call.answer_json(body) is first
    other = b'{"data": [1]}'
    assert call.answer_json(other) == {"data": [1]}
    assert call.answer_json(b"<html>") is None


def test_the_request_body_is_parsed_once_and_must_be_an_object() -> None:
    call = Call("rid", ROUTE, b'{"input": "x"}', "application/json")
    assert call.json is call.json
    with pytest.raises(BadRequest):
        _ = Call("rid", ROUTE, b"[1]", "application/json").json

"""Reading a request body once, and finding or replacing the field that names the model.

A body is read once, bounded by ``server.max_body_bytes``; a larger one is refused with 413
before any upstream connection. Renaming an alias splices the new name into the original bytes
(JSON string or multipart form field), so nothing else in the body is re-serialised.
"""

from __future__ import annotations

import re
from email.message import Message

import orjson
from aiohttp import web

from sidegate.middlewares.errors import BadRequest, BodyTooLarge

__all__ = [
    "body_received",
    "form_field_span",
    "json_string_span",
    "read_arriving",
    "read_body",
    "splice",
]

# A JSON string (unrolled so long strings are matched in C) or a bracket.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]]')
_WS = b" \t\r\n"


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, or 413 as soon as it is known to exceed ``limit`` bytes."""
    body = body_received(request, limit)
    return body if body is not None else await read_arriving(request, limit)


def body_received(request: web.Request, limit: int) -> bytes | None:
    """The whole body if it has all been received (nothing left to wait for), else ``None``:
    then :func:`read_arriving` reads it. 413 for a length announced or received over ``limit``.

    A JSON request's body usually arrives with its headers; read here, it costs no coroutine.
    """
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    content = request.content
    if not content.is_eof():
        return None
    body = content.read_nowait()
    if len(body) > limit:
        raise _too_large(limit)
    return body


async def read_arriving(request: web.Request, limit: int) -> bytes:
    """The body of a request :func:`body_received` found still arriving (its announced length
    already checked), read as it comes: 413 as soon as it grows over ``limit``, and done once it
    has the bytes ``Content-Length`` announced, without waiting for the end."""
    length = request.content_length
    content = request.content
    parts: list[bytes] = []
    size = 0
    while chunk := await content.readany():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
        if size == length:  # all the Content-Length promised: no read to wait for the end
            break
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"The request body is larger than the configured limit of {limit} bytes.")


def _skip_ws(body: bytes, pos: int) -> int:
    while pos < len(body) and body[pos] in _WS:
        pos += 1
    return pos


def json_string_span(body: bytes, key: str) -> tuple[int, int] | None:
    """Byte span of the string value of top-level ``key`` (quotes included), the last if repeated.

    ``None`` when the key is absent, not a string, or spelled with escapes; callers then fall back
    to re-serialising.
    """
    wanted = orjson.dumps(key)
    depth = 0
    found: tuple[int, int] | None = None
    value_next = False
    for match in _TOKEN.finditer(body):
        start, end = match.span()
        first = body[start]
        if first in b"{[":
            depth += 1
            value_next = False
        elif first in b"}]":
            depth -= 1
        elif value_next:
            found = (start, end)
            value_next = False
        elif depth == 1 and end - start == len(wanted) and body[start:end] == wanted:
            colon = _skip_ws(body, end)
            if colon < len(body) and body[colon] == ord(":"):
                value_at = _skip_ws(body, colon + 1)
                value_next = value_at < len(body) and body[value_at] == ord('"')
    return found


def _boundary(content_type: str) -> bytes:
    message = Message()
    message["content-type"] = content_type
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise BadRequest("The multipart body has no boundary.", code="invalid_multipart")
    return boundary.encode("latin-1")


def form_field_span(body: bytes, content_type: str, name: str) -> tuple[int, int] | None:
    """Byte span of the value of the multipart/form-data field ``name``, if present."""
    delimiter = b"--" + _boundary(content_type)
    pos = body.find(delimiter)
    while pos != -1:
        head_start = pos + len(delimiter)
        if body.startswith(b"--", head_start):
            return None
        head_end = body.find(b"\r\n\r\n", head_start)
        if head_end == -1:
            return None
        value_start = head_end + 4
        next_pos = body.find(b"\r\n" + delimiter, value_start)
        if next_pos == -1:
            return None
        if _part_name(body[head_start:head_end]) == name:
            return value_start, next_pos
        pos = next_pos + 2
    return None


def _part_name(head: bytes) -> str | None:
    for line in head.split(b"\r\n"):
        field, _, value = line.partition(b":")
        if field.strip().lower() == b"content-disposition":
            message = Message()
            message["content-disposition"] = value.decode("utf-8", "replace").strip()
            param = message.get_param("name", header="content-disposition")
            return param if isinstance(param, str) else None
    return None


def splice(body: bytes, span: tuple[int, int], value: bytes) -> bytes:
    return body[: span[0]] + value + body[span[1] :]

"""Meridian's ``POST /v1/audio/transcriptions``: a multipart upload answered with a transcript.

The transcript names the upload's byte length and sha256 prefix, so a test can tell which bytes
arrived; ``duration`` assumes 16 000 bytes per second (128 kbit/s audio).
"""

from __future__ import annotations

import hashlib
from email.message import EmailMessage

from aiohttp import web
from aiohttp.multipart import parse_content_disposition

from .errors import ApiError
from .params import choice
from .pipeline import json_response

__all__ = ["parse_form", "transcriptions"]

BYTES_PER_SECOND = 16_000
_FORMATS = ("json", "text", "verbose_json")


def parse_form(content_type: str, body: bytes) -> dict[str, bytes]:
    """The fields of a ``multipart/form-data`` body, by name, with their exact bytes."""
    header = EmailMessage()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        raise ApiError(400, "The request must be multipart/form-data.")
    fields: dict[str, bytes] = {}
    for section in (b"\r\n" + body).split(b"\r\n--" + boundary.encode())[1:]:
        if section.startswith(b"--"):
            break
        head, found, content = section.partition(b"\r\n\r\n")
        if not found:
            raise ApiError(400, "Malformed multipart/form-data body.")
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-disposition":
                field_name = parse_content_disposition(value.strip())[1].get("name")
                if field_name:
                    fields[field_name] = content
    return fields


def _text_field(fields: dict[str, bytes], name: str) -> str | None:
    raw = fields.get(name)
    return None if raw is None else raw.decode("utf-8", "replace").strip()


async def transcriptions(request: web.Request) -> web.StreamResponse:
    """Answer a transcription request; ``response_format`` is json, text or verbose_json."""
    fields = parse_form(request.headers.get("Content-Type", ""), await request.read())
    audio = fields.get("file")
    if not audio:
        raise ApiError(400, "Missing required parameter: 'file'.", param="file")
    if not _text_field(fields, "model"):
        raise ApiError(400, "Missing required parameter: 'model'.", param="model")
    params = {"response_format": _text_field(fields, "response_format") or None}
    response_format = choice(params, "response_format", "json", _FORMATS)
    digest = hashlib.sha256(audio).hexdigest()[:12]
    text = f"Transcript of {len(audio)} bytes of audio with sha256 {digest}."
    if response_format == "text":
        return web.Response(text=text, content_type="text/plain")
    if response_format == "json":
        return json_response({"text": text})
    duration = round(len(audio) / BYTES_PER_SECOND, 3)
    return json_response(
        {
            "task": "transcribe",
            "language": _text_field(fields, "language") or "en",
            "duration": duration,
            "text": text,
            "segments": [{"id": 0, "start": 0.0, "end": duration, "text": text}],
        }
    )

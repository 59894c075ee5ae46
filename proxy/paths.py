"""One path normalisation, shared by routing and by the upstream URL it builds.

sidegate forwards only what it understands: a request path is taken as the client sent it
(``request.raw_path``), and anything that could make an upstream path differ from the one routing
looked at is refused — dot segments (plain or percent-encoded), empty segments, encoded slashes,
backslashes, ``?``/``#`` smuggled as ``%3F``/``%23``, NULs and control characters. What survives is
returned unchanged, so the path routed is byte for byte the path forwarded.
"""

from __future__ import annotations

import re

from sidegate.middlewares.errors import BadRequest

__all__ = ["normalise_path"]

_FORBIDDEN_ESCAPES = re.compile(r"%(?:2[eEfF3]|5[cC]|3[fF]|0[0-9a-fA-F]|1[0-9a-fA-F]|7[fF])")
_PLAIN = re.compile(r"^(?:/[A-Za-z0-9.\-_~!$&'()*+,;=:@%]+)+/?$")


def normalise_path(raw_path: str) -> str:
    """Return the path part of ``raw_path`` if it is safe to route and forward, else raise 400.

    A path is safe when it is absolute, has no empty, ``.`` or ``..`` segment, and carries no
    percent-escape that decodes to a dot, a slash, a backslash, ``?``, ``#`` or a control byte.
    """
    path = raw_path.split("?", 1)[0]
    if path in ("", "/"):
        return "/"
    if _PLAIN.match(path) is None:
        raise BadRequest("The request path is not a valid API path.", code="invalid_path")
    if _FORBIDDEN_ESCAPES.search(path) is not None:
        raise BadRequest(
            "The request path carries an encoded character sidegate does not forward.",
            code="invalid_path",
        )
    for segment in path.split("/")[1:]:
        if segment in (".", ".."):
            raise BadRequest("The request path has a dot segment.", code="invalid_path")
    return path

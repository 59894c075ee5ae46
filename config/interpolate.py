"""``${NAME}``, ``${NAME:-default}`` and ``${file:PATH}`` in the strings of a config.

Substitution is a single pass: a substituted value is never scanned again, so a secret that
happens to contain ``${`` stays as it is. ``$${`` writes a literal ``${``. A reference ends at the
first ``}``; defaults cannot contain ``}`` or further references.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .problems import Finding, Loc

__all__ = ["InterpolationError", "Resolved", "interpolate", "resolve_tree"]

_START = re.compile(r"\$(\$?)\{")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FORMS = "${NAME}, ${NAME:-default} or ${file:PATH}"


class InterpolationError(ValueError):
    """A reference that cannot be resolved; the message names the reference, never a value."""


def interpolate(text: str, env: Mapping[str, str], base_dir: Path) -> str:
    """``text`` with every reference replaced; relative ``${file:...}`` paths are taken from
    ``base_dir``, and one trailing newline is dropped from a file's contents."""
    if "$" not in text:
        return text
    out: list[str] = []
    pos = 0
    for match in _START.finditer(text):
        if match.start() < pos:
            continue
        out.append(text[pos : match.start()])
        if match.group(1):
            out.append("${")
            pos = match.end()
            continue
        end = text.find("}", match.end())
        if end < 0:
            raise InterpolationError("unterminated '${' (write '$${' for a literal '${')")
        out.append(_resolve(text[match.end() : end], env, base_dir))
        pos = end + 1
    out.append(text[pos:])
    return "".join(out)


def _resolve(reference: str, env: Mapping[str, str], base_dir: Path) -> str:
    if reference.startswith("file:"):
        return _read_file(reference.removeprefix("file:"), base_dir)
    name, has_default, default = reference.partition(":-")
    if not _NAME.fullmatch(name):
        raise InterpolationError(f"invalid reference '${{{reference}}}' (expected {_FORMS})")
    value = env.get(name)
    if has_default and not value:
        return default
    if value is None:
        raise InterpolationError(
            f"environment variable {name} is not set (set it, or write ${{{name}:-default}})"
        )
    return value


def _read_file(name: str, base_dir: Path) -> str:
    if not name:
        raise InterpolationError("'${file:}' needs a path, as in ${file:/run/secrets/key}")
    path = base_dir / name
    try:
        contents = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InterpolationError(f"file {str(path)!r} is not UTF-8 text") from None
    except OSError as exc:
        raise InterpolationError(f"cannot read file {str(path)!r}: {exc.strerror}") from None
    if contents.endswith("\n"):
        return contents[:-1].removesuffix("\r")
    return contents


@dataclass
class Resolved:
    """The data with every string interpolated, what failed, and where values were substituted.

    At a position in ``failed`` the raw text is kept; ``substituted`` marks positions whose
    value now holds something from the environment or a file and must not appear in a message.
    """

    data: object
    findings: list[Finding] = field(default_factory=list)
    failed: set[Loc] = field(default_factory=set)
    substituted: set[Loc] = field(default_factory=set)


def resolve_tree(data: object, env: Mapping[str, str], base_dir: Path) -> Resolved:
    """Interpolate every string value (not key) of ``data``, collecting every failure."""
    resolved = Resolved(None)
    resolved.data = _walk(data, (), env, base_dir, resolved)
    return resolved


def _walk(value: object, loc: Loc, env: Mapping[str, str], base: Path, out: Resolved) -> object:
    if isinstance(value, dict):
        return {key: _walk(item, (*loc, key), env, base, out) for key, item in value.items()}
    if isinstance(value, list):
        return [_walk(item, (*loc, index), env, base, out) for index, item in enumerate(value)]
    if not isinstance(value, str):
        return value
    try:
        result = interpolate(value, env, base)
    except InterpolationError as exc:
        out.findings.append(Finding(loc, str(exc)))
        out.failed.add(loc)
        return value
    if "${" in value:
        out.substituted.add(loc)
    return result

"""Problems found in a config file, and the one exception that carries all of them."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

__all__ = ["ConfigError", "Finding", "Loc", "Problem", "format_path"]

Loc = tuple[object, ...]
"""A position in the YAML data: mapping keys and list indices from the top level down."""

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


class Problem(NamedTuple):
    """One thing wrong with a config: where (dotted path, 1-based line) and what.

    ``path`` looks like ``upstreams.meridian.keys[0].secret``; it is ``""`` for the file as a
    whole. ``line`` is ``None`` only when no line applies (an unreadable file). ``message`` never
    contains an interpolated value.
    """

    path: str
    line: int | None
    message: str


class Finding(NamedTuple):
    """A problem before it is placed: ``line`` is looked up from ``loc`` unless given."""

    loc: Loc
    message: str
    line: int | None = None


def format_path(loc: Loc) -> str:
    """``("upstreams", "meridian", "keys", 0, "id")`` → ``upstreams.meridian.keys[0].id``.

    A key that is not a plain word (a model id with dots, say) is quoted:
    ``pricing["llm.general.v1"].input``.
    """
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            parts.append(f"[{part}]")
        elif isinstance(part, str) and _PLAIN_KEY.fullmatch(part):
            parts.append(f".{part}" if parts else part)
        else:
            parts.append(f'["{part}"]')
    return "".join(parts)


class ConfigError(Exception):
    """A config that cannot be used, with every problem found in it, sorted by line.

    ``source`` names where the text came from: a file path or ``"<string>"``. ``str()`` gives one
    line per problem, ``{source}:{line}: {path}: {message}``, ready for a terminal or an editor.
    """

    problems: list[Problem]
    source: str

    def __init__(self, problems: Iterable[Problem], source: str) -> None:
        ordered = sorted(problems, key=lambda problem: problem.line or 0)
        super().__init__(ordered, source)
        self.problems = ordered
        self.source = source

    def __str__(self) -> str:
        return "\n".join(self._format(problem) for problem in self.problems)

    def _format(self, problem: Problem) -> str:
        where = self.source if problem.line is None else f"{self.source}:{problem.line}"
        what = f"{problem.path}: {problem.message}" if problem.path else problem.message
        return f"{where}: {what}"

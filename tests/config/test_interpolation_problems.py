"""References that cannot be resolved, and everything wrong in one file at once."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from sidegate.config import ConfigError, Problem, load_config_text

Load = Callable[[str], list[Problem]]


def test_missing_variable_points_at_its_scalar(
    problems: Load, minimal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SIDEGATE_TEST_MISSING", raising=False)

    found = problems(minimal + "server:\n  port: ${SIDEGATE_TEST_MISSING}\n")

    assert found == [
        Problem(
            "server.port",
            8,
            "environment variable SIDEGATE_TEST_MISSING is not set "
            "(set it, or write ${SIDEGATE_TEST_MISSING:-default})",
        )
    ]


def test_unreadable_file_points_at_its_scalar(tmp_path: Path, minimal: str) -> None:
    text = minimal.replace('"sk-test"', '"${file:missing/key}"')

    with pytest.raises(ConfigError) as info:
        load_config_text(text, base_dir=tmp_path)

    assert info.value.problems == [
        Problem(
            "upstreams.meridian.keys[0].secret",
            5,
            f"cannot read file '{tmp_path / 'missing' / 'key'}': No such file or directory",
        )
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("${not a name}", "invalid reference '${not a name}' (expected ${NAME}, "),
        ("${}", "invalid reference '${}'"),
        ("abc${UNCLOSED", "unterminated '${' (write '$${' for a literal '${')"),
        ("${file:}", "'${file:}' needs a path"),
    ],
)
def test_malformed_references(problems: Load, minimal: str, value: str, message: str) -> None:
    found = problems(minimal + f"server:\n  host: '{value}'\n")

    assert [(p.path, p.line) for p in found] == [("server.host", 8)]
    assert found[0].message.startswith(message)


def test_every_problem_is_reported_at_once_sorted_by_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SIDEGATE_TEST_MISSING", raising=False)
    text = textwrap.dedent("""\
        teams:
          search: {models: [meridian-2]}
        upstreams:
          meridian:
            kind: meridian
            base_url: https://api.meridian.so
            keys:
              - {id: primary, secret: "${SIDEGATE_TEST_MISSING}"}
              - {id: primary, secret: b}
            models: [meridian-1]
            timeout: 3
        models:
          fast: {upstream: meridian, model: meridian-1-turbo}
        server: {port: -1}
        server: {port: 1}
        """)

    with pytest.raises(ConfigError) as info:
        load_config_text(text, source="sidegate.yaml")

    assert [(p.line, p.path) for p in info.value.problems] == [
        (2, "teams.search.models[0]"),
        (8, "upstreams.meridian.keys[0].secret"),
        (9, "upstreams.meridian.keys[1].id"),
        (11, "upstreams.meridian.timeout"),
        (13, "models.fast.model"),
        (14, "server.port"),
        (15, "server"),
    ]
    lines = str(info.value).splitlines()
    assert len(lines) == 7
    assert lines[0].startswith("sidegate.yaml:2: teams.search.models[0]: unknown model")
    assert lines[-1] == "sidegate.yaml:15: server: duplicate key 'server' (first on line 14)"


def test_a_failed_reference_is_not_reported_again_by_validation(
    problems: Load, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SIDEGATE_TEST_MISSING", raising=False)

    found = problems("""\
        upstreams:
          m: {kind: meridian, mock: true, models: [a]}
        models:
          fast: {upstream: m, model: "${SIDEGATE_TEST_MISSING}"}
        """)

    assert [(p.path, p.line) for p in found] == [("models.fast.model", 4)]

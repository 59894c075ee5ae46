"""An interpolated value never appears in a problem: it may be a secret."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sidegate.config import ConfigError, load_config_text

SECRET = "sk live/TOP-SECRET-4f9a"


def _error(text: str, base_dir: Path | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config_text(textwrap.dedent(text), base_dir=base_dir)
    return info.value


def _assert_hidden(error: ConfigError) -> None:
    assert error.problems
    for shown in (str(error), repr(error), repr(error.problems), repr(error.args)):
        assert SECRET not in shown
        assert "TOP-SECRET" not in shown


@pytest.mark.parametrize(
    ("text", "path"),
    [
        (
            """\
            upstreams:
              meridian:
                kind: meridian
                base_url: https://api.meridian.so
                keys: [{id: "${SIDEGATE_TEST_SECRET}", secret: x}]
                models: [meridian-1]
            """,
            "upstreams.meridian.keys[0].id",
        ),
        (
            """\
            store: {kind: "${SIDEGATE_TEST_SECRET}"}
            upstreams: {m: {kind: meridian, mock: true, models: [a]}}
            """,
            "store.kind",
        ),
        (
            """\
            upstreams: {m: {kind: "${SIDEGATE_TEST_SECRET}", mock: true, models: [a]}}
            """,
            "upstreams.m.kind",
        ),
        (
            """\
            upstreams:
              m:
                kind: meridian
                base_url: "https://${SIDEGATE_TEST_SECRET}"
                keys: [{id: a, secret: b}]
                models: [a]
            """,
            "upstreams.m.base_url",
        ),
        (
            """\
            server: {port: "${SIDEGATE_TEST_SECRET}"}
            upstreams: {m: {kind: meridian, mock: true, models: [a]}}
            """,
            "server.port",
        ),
        (
            """\
            upstreams: {m: {kind: meridian, mock: true, models: [a]}}
            models: {fast: {upstream: m, model: "${SIDEGATE_TEST_SECRET}"}}
            teams: {t: {models: ["${SIDEGATE_TEST_SECRET}"]}}
            """,
            "models.fast.model",
        ),
        (
            """\
            upstreams:
              m: {kind: meridian, mock: true, models: [a, "${SIDEGATE_TEST_SECRET}"]}
              n: {kind: meivan, mock: true, models: ["${SIDEGATE_TEST_SECRET}"]}
            models: {fast: {upstream: n, model: a}}
            """,
            "upstreams.n.models[0]",
        ),
    ],
)
def test_failing_field_does_not_echo_its_interpolated_value(
    monkeypatch: pytest.MonkeyPatch, text: str, path: str
) -> None:
    monkeypatch.setenv("SIDEGATE_TEST_SECRET", SECRET)

    error = _error(text)

    assert path in [problem.path for problem in error.problems]
    _assert_hidden(error)


def test_secret_from_a_file_is_not_echoed(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(SECRET + "\n")

    error = _error(
        """\
        upstreams:
          m:
            kind: meridian
            base_url: https://api.meridian.so
            keys: [{id: "${file:key}", secret: x}, {id: "${file:key}", secret: y}]
            models: [a]
        """,
        base_dir=tmp_path,
    )

    assert [p.path for p in error.problems] == [
        "upstreams.m.keys[0].id",
        "upstreams.m.keys[1].id",
        "upstreams.m.keys[1].id",
    ]
    assert "duplicate key id the interpolated value" in error.problems[2].message
    _assert_hidden(error)


def test_secret_is_not_echoed_when_interpolation_fails_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIDEGATE_TEST_SECRET", SECRET)
    monkeypatch.delenv("SIDEGATE_TEST_MISSING", raising=False)

    error = _error("""\
        upstreams:
          m:
            kind: meridian
            base_url: https://api.meridian.so
            keys: [{id: a, secret: "${SIDEGATE_TEST_SECRET}${SIDEGATE_TEST_MISSING}"}]
            models: [a]
        """)

    assert [(p.path, p.line) for p in error.problems] == [("upstreams.m.keys[0].secret", 5)]
    assert "SIDEGATE_TEST_MISSING is not set" in error.problems[0].message
    _assert_hidden(error)

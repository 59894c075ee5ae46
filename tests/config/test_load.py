from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sidegate.config import ConfigError, Problem, load_config, load_config_text


def test_design_example_loads(example_file: Path) -> None:
    config = load_config(example_file)

    meridian = config.upstreams["meridian"]
    assert [key.id for key in meridian.keys] == ["primary", "backup"]
    assert meridian.keys[0].secret.get_secret_value() == "sk-meridian-primary"
    assert meridian.keys[1].secret.get_secret_value() == "sk-meridian-backup"
    assert [model.id for model in config.upstreams["meivan"].models] == ["llm.general.v1"]
    assert config.models["fast"].model == "meridian-1-turbo"
    assert config.pricing["meridian-1"].output == 10.0
    assert config.teams["search"].models == ["meridian-1", "meridian-embed-3"]
    assert config.store.kind == "sqlite"
    assert config.rate_limit_headers.mode == "team"


def test_minimal_config_gets_defaults(minimal: str) -> None:
    config = load_config_text(minimal)

    assert config.server.port == 8080
    assert config.store.kind == "sqlite"
    assert config.models == {}


def test_env_default_applies_when_unset_or_empty(
    monkeypatch: pytest.MonkeyPatch, minimal: str
) -> None:
    monkeypatch.delenv("SIDEGATE_TEST_UNSET", raising=False)
    monkeypatch.setenv("SIDEGATE_TEST_EMPTY", "")
    monkeypatch.setenv("SIDEGATE_TEST_SET", "9000")
    text = minimal + textwrap.dedent("""\
        server:
          host: "${SIDEGATE_TEST_UNSET:-0.0.0.0}"
          port: ${SIDEGATE_TEST_SET:-1234}
        store: {kind: sqlite, path: "${SIDEGATE_TEST_EMPTY:-state.db}"}
        """)

    config = load_config_text(text)

    assert config.server.host == "0.0.0.0"
    assert config.server.port == 9000
    assert config.store.kind == "sqlite"
    assert config.store.path == "state.db"


def test_dollar_dollar_brace_is_a_literal_and_values_are_not_rescanned(
    monkeypatch: pytest.MonkeyPatch, minimal: str
) -> None:
    monkeypatch.setenv("SIDEGATE_TEST_TRICKY", "a${NOT_SET}b")
    text = minimal.replace("sk-test", "${SIDEGATE_TEST_TRICKY}") + textwrap.dedent("""\
        server: {host: "x$${NOT_SET}y$$z"}
        """)

    config = load_config_text(text)

    assert config.server.host == "x${NOT_SET}y$$z"
    secret = config.upstreams["meridian"].keys[0].secret
    assert secret.get_secret_value() == "a${NOT_SET}b"


def test_relative_file_reference_is_taken_from_the_config_directory(
    tmp_path: Path, minimal: str
) -> None:
    conf = tmp_path / "conf"
    (conf / "secrets").mkdir(parents=True)
    (conf / "secrets" / "key").write_text("sk-from-file\n\n")
    path = conf / "sidegate.yaml"
    path.write_text(minimal.replace("sk-test", "${file:secrets/key}"))

    from_file = load_config(path)
    from_text = load_config_text(path.read_text(), base_dir=conf)

    for config in (from_file, from_text):
        secret = config.upstreams["meridian"].keys[0].secret
        assert secret.get_secret_value() == "sk-from-file\n"


def test_anchors_and_merge_keys_work(minimal: str) -> None:
    text = minimal + textwrap.dedent("""\
        teams:
          search: &defaults
            rate_limit: {requests_per_minute: 60}
            models: [meridian-1]
          ads:
            <<: *defaults
            models: [meridian-embed-3]
        """)

    config = load_config_text(text)

    ads = config.teams["ads"]
    assert ads.models == ["meridian-embed-3"]
    assert ads.rate_limit is not None
    assert ads.rate_limit.requests_per_minute == 60


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError) as info:
        load_config(missing)

    assert info.value.source == str(missing)
    [problem] = info.value.problems
    assert problem.line is None
    assert problem.path == ""
    assert "cannot read the config file" in problem.message
    assert str(info.value).startswith(f"{missing}: cannot read")


def test_errors_name_the_file_they_came_from(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("upstreams: {}\n")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert info.value.problems == [Problem("upstreams", 1, info.value.problems[0].message)]
    assert str(info.value).startswith(f"{path}:1: upstreams: ")

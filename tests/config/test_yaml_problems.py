"""Problems found before validation: YAML syntax, duplicate keys, the shape of the document."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sidegate.config import ConfigError, Problem, load_config_text

Load = Callable[[str], list[Problem]]


def test_syntax_error_points_at_its_line(problems: Load) -> None:
    found = problems("""\
        upstreams:
          meridian:
            kind: meridian
           base_url: https://api.meridian.so
        """)

    [problem] = found
    assert problem.line == 4
    assert problem.path == ""
    assert problem.message.startswith("invalid YAML: ")


def test_duplicate_key_points_at_the_second_key(problems: Load, minimal: str) -> None:
    found = problems(minimal + "server: {port: 1}\nretry: {}\nserver: {port: 2}\n")

    assert found == [Problem("server", 9, "duplicate key 'server' (first on line 7)")]


def test_duplicate_key_in_a_nested_mapping(problems: Load) -> None:
    found = problems("""\
        upstreams:
          meridian:
            kind: meridian
            mock: true
            models: [meridian-1]
            kind: meivan
        """)

    assert found == [
        Problem("upstreams.meridian.kind", 6, "duplicate key 'kind' (first on line 3)")
    ]


@pytest.mark.parametrize("text", ["", "\n", "# nothing but a comment\n"])
def test_empty_file_is_a_clear_problem(problems: Load, text: str) -> None:
    [problem] = problems(text)

    assert problem.line == 1
    assert problem.message.startswith("the config is empty; expected a mapping of sections (")
    assert "upstreams" in problem.message


def test_top_level_must_be_a_mapping(problems: Load) -> None:
    [problem] = problems("\n- upstreams\n- teams\n")

    assert problem.line == 2
    assert problem.message.startswith("expected a mapping of sections (server, store, upstreams")
    assert problem.message.endswith("not a list")


def test_several_documents_are_refused(problems: Load, minimal: str) -> None:
    [problem] = problems(minimal + "---\nteams: {}\n")

    assert problem.line == 7
    assert "single document" in problem.message


def test_unsafe_tag_is_refused(problems: Load, minimal: str) -> None:
    found = problems(minimal + "server: {host: !!python/name:os.system ''}\n")

    assert [(p.path, p.line) for p in found] == [("server.host", 7)]
    assert "could not determine a constructor" in found[0].message


def test_recursive_alias_is_refused(problems: Load, minimal: str) -> None:
    found = problems(minimal + "teams: &loop\n  search: *loop\n")

    assert [(p.path, p.line, p.message) for p in found] == [
        ("teams.search", 8, "recursive alias: a node may not contain itself"),
    ]


def test_unknown_top_level_key_is_an_error(problems: Load, minimal: str) -> None:
    found = problems(minimal + "retyr: {max_attempts: 3}\n")

    [problem] = found
    assert problem.path == "retyr"
    assert problem.line == 7
    assert problem.message.startswith("unknown key 'retyr' (allowed: server, store, upstreams,")


def test_problems_format_as_file_line_path_message() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text("upstreams: {}\nretyr: 1\n", source="conf/sidegate.yaml")

    assert str(info.value).splitlines() == [
        "conf/sidegate.yaml:1: upstreams: should have at least 1 item, not 0",
        "conf/sidegate.yaml:2: retyr: unknown key 'retyr' (allowed: server, store, upstreams, "
        "models, pricing, auth, teams, budgets, retry, cache, rate_limit_headers)",
    ]

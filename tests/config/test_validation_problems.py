"""pydantic's findings, placed on the YAML path and line they are about."""

from __future__ import annotations

from collections.abc import Callable

from sidegate.config import Problem

Load = Callable[[str], list[Problem]]


def test_wrong_type_points_at_the_value(problems: Load, minimal: str) -> None:
    found = problems(minimal + "server:\n  host: 0.0.0.0\n  port: eighty\n")

    assert found == [
        Problem("server.port", 9, "should be a valid integer, unable to parse string as an integer")
    ]


def test_missing_key_points_at_the_parent_mapping(problems: Load) -> None:
    found = problems("""\
        upstreams:
          meridian:
            kind: meridian
            mock: true
        """)

    assert found == [Problem("upstreams.meridian.models", 2, "missing required key 'models'")]


def test_missing_section_points_at_the_top(problems: Load) -> None:
    found = problems("\n\nserver: {port: 8080}\n")

    assert found == [Problem("upstreams", 3, "missing required key 'upstreams'")]


def test_model_validator_error_points_at_its_section(problems: Load) -> None:
    found = problems("""\
        upstreams:
          meridian:
            kind: meridian
            mock: true
            base_url: https://api.meridian.so
            models: [meridian-1]
        """)

    assert found == [
        Problem("upstreams.meridian", 2, "set either base_url or mock: true, not both"),
    ]


def test_unknown_key_lists_the_allowed_ones(problems: Load) -> None:
    found = problems("""\
        upstreams:
          meridian:
            kind: meridian
            mock: true
            models:
              - id: meridian-1
                max_tokens: 8
        """)

    assert found == [
        Problem(
            "upstreams.meridian.models[0].max_tokens",
            7,
            "unknown key 'max_tokens' (allowed: id, capabilities, max_context_tokens, regions)",
        ),
    ]


def test_list_items_are_indexed_in_brackets(problems: Load) -> None:
    found = problems("""\
        upstreams:
          meridian:
            kind: meridian
            base_url: https://api.meridian.so
            keys:
              - {id: primary, secret: a}
              - id: "not ok"
                secret: b
            models: [meridian-1]
        """)

    assert [(p.path, p.line) for p in found] == [("upstreams.meridian.keys[1].id", 7)]
    assert found[0].message.startswith("should match pattern")


def test_discriminated_store_points_at_kind(problems: Load, minimal: str) -> None:
    found = problems(minimal + "store:\n  kind: postgres\n")

    assert found == [Problem("store.kind", 8, "must be one of 'memory', 'sqlite', 'redis'")]


def test_store_fields_are_reported_without_the_union_tag(problems: Load, minimal: str) -> None:
    found = problems(minimal + "store:\n  kind: redis\n  uri: redis://x\n")

    assert [(p.path, p.line) for p in found] == [("store.uri", 9)]
    assert found[0].message == "unknown key 'uri' (allowed: kind, url, batch_s)"


def test_store_batching_is_bounded_and_not_for_the_memory_store(
    problems: Load, minimal: str
) -> None:
    negative = problems(minimal + "store: {kind: sqlite, batch_s: -1}\n")
    memory = problems(minimal + "store: {kind: memory, batch_s: 1}\n")

    assert [(p.path, p.line) for p in negative] == [("store.batch_s", 7)]
    assert "greater than or equal to 0" in negative[0].message
    assert [(p.path, p.message) for p in memory] == [
        ("store.batch_s", "unknown key 'batch_s' (allowed: kind)")
    ]


def test_store_without_kind(problems: Load, minimal: str) -> None:
    found = problems(minimal + "store: {path: x.db}\n")

    assert found == [Problem("store.kind", 7, "missing required key 'kind'")]


def test_dotted_keys_are_quoted_in_paths(problems: Load) -> None:
    found = problems("""\
        upstreams:
          meivan: {kind: meivan, mock: true, models: [llm.general.v1]}
        pricing:
          llm.general.v1: {input: cheap}
        """)

    assert [(p.path, p.line) for p in found] == [('pricing["llm.general.v1"].input', 4)]


def test_empty_section_says_so(problems: Load, minimal: str) -> None:
    found = problems(minimal + "auth:\n")

    assert found == [Problem("auth", 7, "expected a mapping, not empty")]


def test_model_entry_of_the_wrong_type(problems: Load) -> None:
    found = problems("""\
        upstreams:
          meridian:
            kind: meridian
            mock: true
            models:
              - meridian-1
              - [meridian-2]
        """)

    assert found == [
        Problem("upstreams.meridian.models[1]", 7, "expected a model id or a mapping with 'id'"),
    ]

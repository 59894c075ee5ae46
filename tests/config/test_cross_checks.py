"""Checks across sections, each reported at the line of the name that does not add up."""

from __future__ import annotations

import textwrap
from collections.abc import Callable

import pytest

from sidegate.config import ConfigError, Problem, load_config_text

Load = Callable[[str], list[Problem]]

TWO_UPSTREAMS = textwrap.dedent("""\
    upstreams:
      meridian:
        kind: meridian
        mock: true
        models: [meridian-1, meridian-embed-3]
      meivan:
        kind: meivan
        mock: true
        models: [llm.general.v1]
    """)


def test_alias_to_an_unknown_upstream(problems: Load) -> None:
    found = problems(TWO_UPSTREAMS + "models:\n  fast: {upstream: meridan, model: meridian-1}\n")

    assert found == [
        Problem(
            "models.fast.upstream", 11, "unknown upstream 'meridan' (configured: meridian, meivan)"
        )
    ]


def test_alias_to_a_model_its_upstream_does_not_serve(problems: Load) -> None:
    found = problems(
        TWO_UPSTREAMS + "models:\n  fast:\n    upstream: meivan\n    model: meridian-1\n"
    )

    assert found == [
        Problem(
            "models.fast.model",
            13,
            "upstream 'meivan' does not serve 'meridian-1'; upstream 'meridian' does "
            "(its models: llm.general.v1)",
        )
    ]


def test_alias_named_like_a_model(problems: Load) -> None:
    found = problems(
        TWO_UPSTREAMS + "models:\n  meridian-1: {upstream: meridian, model: meridian-1}\n"
    )

    assert found == [
        Problem(
            "models.meridian-1",
            11,
            "alias 'meridian-1' has the name of a model of upstream 'meridian'; "
            "choose another alias name",
        )
    ]


def test_model_listed_under_two_upstreams(problems: Load) -> None:
    text = TWO_UPSTREAMS.replace("[llm.general.v1]", "\n      - llm.general.v1\n      - meridian-1")

    found = problems(text)

    assert found == [
        Problem(
            "upstreams.meivan.models[1]",
            11,
            "model 'meridian-1' is already served by upstream 'meridian'; routing would be "
            "ambiguous (list each model id under one upstream only)",
        )
    ]


def test_team_naming_an_unknown_model(problems: Load) -> None:
    found = problems(TWO_UPSTREAMS + "teams:\n  search:\n    models: [meridian-1, meridian-2]\n")

    assert found == [
        Problem(
            "teams.search.models[1]",
            12,
            "unknown model 'meridian-2': neither a model id of an upstream nor an alias "
            "(did you mean 'meridian-1'?)",
        )
    ]


def test_team_may_name_models_and_aliases() -> None:
    text = TWO_UPSTREAMS + textwrap.dedent("""\
        models:
          fast: {upstream: meridian, model: meridian-1}
        teams:
          search: {models: [fast, llm.general.v1]}
        pricing:
          fast: {input: 1}
          llm.general.v1: {per_request: 0.01}
        """)

    config = load_config_text(text)

    assert config.teams["search"].models == ["fast", "llm.general.v1"]


def test_pricing_for_an_unknown_model(problems: Load) -> None:
    found = problems(TWO_UPSTREAMS + "pricing:\n  meridian-1: {input: 1}\n  gpt-4: {input: 30}\n")

    assert found == [
        Problem(
            "pricing.gpt-4",
            12,
            "unknown model 'gpt-4': neither a model id of an upstream nor an alias",
        )
    ]


def test_duplicate_key_ids_within_an_upstream(problems: Load) -> None:
    found = problems("""\
        upstreams:
          meridian:
            kind: meridian
            base_url: https://api.meridian.so
            keys:
              - {id: primary, secret: a}
              - {id: backup, secret: b}
              - {id: primary, secret: c}
            models: [meridian-1]
          other:
            kind: meivan
            base_url: https://api.meivan.example
            keys: [{id: primary, secret: d}]
            models: [llm.general.v1]
        """)

    assert found == [
        Problem(
            "upstreams.meridian.keys[2].id",
            8,
            "duplicate key id 'primary' (also keys[0]); key ids must be unique within an upstream",
        )
    ]


@pytest.mark.parametrize(
    "section",
    [
        "upstreams: [meridian]\n"
        "models: {fast: {upstream: meridian, model: x}}\n"
        "teams: {a: {models: [y]}}",
        "upstreams: {meridian: 3}\nmodels: {fast: {upstream: meridian, model: x}}",
        "upstreams: {meridian: {kind: meridian, mock: true}}\n"
        "models: {f: {upstream: meridian, model: x}}",
        "upstreams: {m: {kind: meridian, mock: true, models: 1, keys: 2}}\n"
        "teams: {a: {models: [z]}}",
        "upstreams: {m: {kind: meridian, mock: true, models: [{}, 3]}}\nmodels: [1]\npricing: 3",
        "upstreams: {m: {kind: meridian, mock: true, models: [a]}}\n"
        "models: {f: 1, g: {upstream: 3}}",
    ],
)
def test_checks_leave_malformed_sections_to_pydantic(section: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(section)

    for problem in info.value.problems:
        assert not problem.message.startswith(("unknown", "upstream '", "alias", "duplicate")) or (
            problem.message.startswith("unknown key")
        ), problem

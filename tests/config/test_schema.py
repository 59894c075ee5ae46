from __future__ import annotations

import json
from typing import Any

from sidegate.config import SidegateConfig, config_json_schema


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def test_schema_describes_every_section() -> None:
    schema = config_json_schema()

    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object"
    assert set(schema["properties"]) == set(SidegateConfig.model_fields)
    assert schema["required"] == ["upstreams"]
    json.dumps(schema)


def test_schema_forbids_unknown_keys_everywhere() -> None:
    schema = config_json_schema()

    assert schema["additionalProperties"] is False
    objects = {
        name: definition
        for name, definition in schema["$defs"].items()
        if definition.get("type") == "object"
    }
    assert {"Upstream", "UpstreamKey", "ServerConfig", "Team", "RedisStore"} <= set(objects)
    for name, definition in objects.items():
        assert definition["additionalProperties"] is False, name


def test_schema_references_resolve() -> None:
    schema = config_json_schema()

    for ref in _refs(schema):
        assert ref.startswith("#/$defs/")
        assert ref.removeprefix("#/$defs/") in schema["$defs"]


def test_schema_accepts_a_bare_model_id_and_references_in_numbers() -> None:
    schema = config_json_schema()

    model_entry = schema["$defs"]["ModelEntry"]["anyOf"]
    assert {"type": "string", "minLength": 1} in model_entry
    port = schema["$defs"]["ServerConfig"]["properties"]["port"]
    assert port["default"] == 8080
    assert {"$ref": "#/$defs/Reference"} in port["anyOf"]
    assert schema["$defs"]["Reference"]["type"] == "string"


def test_schema_is_a_fresh_copy() -> None:
    first = config_json_schema()
    first["$defs"]["Reference"]["type"] = "number"

    assert config_json_schema()["$defs"]["Reference"]["type"] == "string"

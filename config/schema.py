"""The JSON Schema of the config file, for editors (``sidegate schema`` prints it)."""

from __future__ import annotations

from typing import Any

from .models import SidegateConfig

__all__ = ["config_json_schema"]

_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_REFERENCE_DEF = {
    "type": "string",
    "pattern": r"\$\{[^}]+\}",
    "description": "A ${NAME}, ${NAME:-default} or ${file:PATH} reference, resolved on load.",
}
_REFERENCE = {"$ref": "#/$defs/Reference"}
_ANNOTATIONS = ("title", "description", "default", "examples")


def config_json_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of :class:`SidegateConfig` as written in YAML.

    Sections that forbid unknown keys say ``additionalProperties: false``; numbers and booleans
    also accept a ``${...}`` reference, since interpolation happens before validation.
    """
    schema = _allow_references(SidegateConfig.model_json_schema(mode="validation"))
    assert isinstance(schema, dict)
    schema.setdefault("$defs", {})["Reference"] = dict(_REFERENCE_DEF)
    return {"$schema": _DIALECT, **schema}


def _allow_references(node: Any) -> Any:
    if isinstance(node, list):
        return [_allow_references(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _allow_references(value) for key, value in node.items()}
    if node.get("type") not in ("integer", "number", "boolean"):
        return node
    kept = {key: node.pop(key) for key in _ANNOTATIONS if key in node}
    return {"anyOf": [node, dict(_REFERENCE)], **kept}

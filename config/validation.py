"""Validate data against :class:`SidegateConfig` and turn pydantic's errors into findings.

Messages are built from an error's ``type``, ``loc`` and ``msg`` and from the models' field
names — never from its ``input`` — so a value taken from the environment or a file cannot leak
into a message.
"""

from __future__ import annotations

import re
import types
from collections.abc import Collection
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from .models import SidegateConfig
from .problems import Finding, Loc

__all__ = ["validate"]

_SUBJECT = re.compile(r"^(?:Input|String|Dictionary|List|Tuple|Set|Value|Data) should ")
_TYPE_NAMES = {
    dict: "a mapping",
    list: "a list",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "empty",
}


def validate(data: object, secret: Collection[Loc]) -> tuple[SidegateConfig | None, list[Finding]]:
    """The config, or ``None`` and one finding per pydantic error.

    ``secret`` holds positions of interpolated values: a message that would contain such a value
    is replaced by a generic one.
    """
    try:
        return SidegateConfig.model_validate(data), []
    except ValidationError as exc:
        return None, [_finding(error, secret) for error in exc.errors(include_url=False)]


def _finding(error: ErrorDetails, secret: Collection[Loc]) -> Finding:
    loc, holder = _locate(error["loc"])
    kind = error["type"]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        loc = (*loc, str(error.get("ctx", {}).get("discriminator", "kind")).strip("'"))
    message = _message(error, loc, holder)
    value = error["input"]
    if loc in secret and isinstance(value, str) and value and value in message:
        message = f"invalid value ({kind})"
    return Finding(loc, message)


def _message(error: ErrorDetails, loc: Loc, holder: Any) -> str:
    kind = error["type"]
    name = loc[-1] if loc else None
    if kind == "extra_forbidden":
        allowed = _field_names(holder)
        return f"unknown key {name!r}" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    if kind in ("missing", "union_tag_not_found"):
        return f"missing required key {name!r}"
    if kind == "union_tag_invalid":
        return f"must be one of {error.get('ctx', {}).get('expected_tags', '')}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping, not {_type_name(error['input'])}"
    if kind == "list_type":
        return f"expected a list, not {_type_name(error['input'])}"
    if kind == "string_type":
        return f"expected a string, not {_type_name(error['input'])}"
    message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return _SUBJECT.sub("should ", message).replace(" after validation", "")


def _type_name(value: object) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _field_names(model: Any) -> list[str]:
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _locate(raw: tuple[int | str, ...]) -> tuple[Loc, Any]:
    """The YAML position of a pydantic ``loc`` (without the tags of discriminated unions, up to a
    ``[key]`` marker) and the type that holds its last element."""
    loc: list[object] = []
    holder: Any = SidegateConfig
    current: Any = SidegateConfig
    for part in raw:
        if part == "[key]":
            break
        member = _tagged_member(current, part)
        if member is not None:
            current = member
            continue
        holder = current
        loc.append(part)
        current = _child(current, part)
    return tuple(loc), _unwrap(holder)


def _unwrap(tp: Any) -> Any:
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin is Union or origin is types.UnionType:
            members = [arg for arg in get_args(tp) if arg is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp


def _child(tp: Any, part: int | str) -> Any:
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(part) if isinstance(part, str) else None
        return None if field is None else field.annotation
    origin = get_origin(tp)
    if origin is list and isinstance(part, int):
        return get_args(tp)[0]
    if origin is dict:
        return get_args(tp)[1]
    return None


def _tagged_member(tp: Any, part: int | str) -> Any:
    """The member of a union of models whose ``Literal`` field has the value ``part``."""
    tp = _unwrap(tp)
    if get_origin(tp) not in (Union, types.UnionType):
        return None
    for member in get_args(tp):
        if not (isinstance(member, type) and issubclass(member, BaseModel)):
            continue
        for field in member.model_fields.values():
            if get_origin(field.annotation) is Literal and part in get_args(field.annotation):
                return member
    return None

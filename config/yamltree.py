"""YAML to plain Python data, remembering the line every key and list item came from.

PyYAML's safe loader composes the node tree; this module walks it so that duplicate keys,
unsupported tags and recursive aliases become findings instead of silent surprises, and so that
every position in the data can be traced back to its line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .problems import Finding, Loc

__all__ = ["ParsedYaml", "SourceMap", "parse_yaml"]

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True)
class SourceMap:
    """1-based lines of the data: for a mapping entry the line of its key, for a list item the
    line it starts on, for ``()`` the line the document starts on."""

    lines: dict[Loc, int] = field(default_factory=dict)

    def line_of(self, loc: Loc) -> int | None:
        """The line of ``loc``, or of its deepest ancestor that exists in the file."""
        for depth in range(len(loc), -1, -1):
            line = self.lines.get(loc[:depth])
            if line is not None:
                return line
        return None


@dataclass(frozen=True)
class ParsedYaml:
    """The data (``None`` for an empty or unparsable text), its lines, and what went wrong.

    ``broken`` holds positions whose value could not be built; other findings there would only
    repeat the cause.
    """

    data: object
    source_map: SourceMap
    findings: list[Finding]
    broken: set[Loc]


def parse_yaml(text: str) -> ParsedYaml:
    """Parse one YAML document with safe semantics; never raises for bad input."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        return ParsedYaml(None, SourceMap(), [_syntax_finding(exc)], set())
    except yaml.YAMLError as exc:
        return ParsedYaml(None, SourceMap(), [Finding((), f"invalid YAML: {exc}")], set())
    try:
        if root is None:
            return ParsedYaml(None, SourceMap(), [], set())
        builder = _Builder(loader)
        builder.source_map.lines[()] = _line(root)
        data = builder.build(root, ())
        return ParsedYaml(data, builder.source_map, builder.findings, builder.broken)
    finally:
        loader.dispose()


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _syntax_finding(exc: yaml.MarkedYAMLError) -> Finding:
    mark = exc.problem_mark or exc.context_mark
    message = f"invalid YAML: {exc.problem or exc.context}"
    if exc.problem and exc.context and exc.context_mark is not None:
        message += f" ({exc.context} on line {exc.context_mark.line + 1})"
    return Finding((), message, None if mark is None else mark.line + 1)


class _Builder:
    def __init__(self, loader: yaml.SafeLoader) -> None:
        self.loader = loader
        self.source_map = SourceMap()
        self.findings: list[Finding] = []
        self.broken: set[Loc] = set()
        self._open: set[int] = set()

    def build(self, node: Node, loc: Loc) -> object:
        if isinstance(node, ScalarNode):
            return self._scalar(node, loc)
        if id(node) in self._open:
            self._fail(loc, "recursive alias: a node may not contain itself")
            return None
        expected = _MAP_TAG if isinstance(node, MappingNode) else _SEQ_TAG
        if node.tag != expected:
            self._fail(loc, f"unsupported tag {node.tag!r}")
            return None
        self._open.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, loc, {})
            assert isinstance(node, SequenceNode)
            return self._sequence(node, loc)
        finally:
            self._open.discard(id(node))

    def _fail(self, loc: Loc, message: str) -> None:
        self.findings.append(Finding(loc, message))
        self.broken.add(loc)

    def _scalar(self, node: ScalarNode, loc: Loc) -> object:
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as exc:
            self._fail(loc, str(exc.problem or exc.context))
            return None

    def _sequence(self, node: SequenceNode, loc: Loc) -> list[object]:
        items: list[object] = []
        for index, item in enumerate(node.value):
            self.source_map.lines[(*loc, index)] = _line(item)
            items.append(self.build(item, (*loc, index)))
        return items

    def _mapping(self, node: MappingNode, loc: Loc, into: dict[object, object]) -> object:
        """Fill ``into`` with the explicit keys of ``node``, then with keys merged by ``<<``
        that are not already there (the YAML merge-key rule)."""
        first_lines: dict[object, int] = {}
        merged: list[MappingNode] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged.extend(self._merge_sources(value_node, loc))
                continue
            if not isinstance(key_node, ScalarNode):
                self.findings.append(
                    Finding(loc, "a key must be a plain scalar, not a collection", _line(key_node))
                )
                continue
            try:
                key = self.loader.construct_object(key_node, deep=True)
            except yaml.MarkedYAMLError as exc:
                self.findings.append(Finding(loc, str(exc.problem or exc.context), _line(key_node)))
                continue
            line = _line(key_node)
            if key in first_lines:
                self.findings.append(
                    Finding(
                        (*loc, key),
                        f"duplicate key {key!r} (first on line {first_lines[key]})",
                        line,
                    )
                )
                continue
            first_lines[key] = line
            if key in into:
                continue
            self.source_map.lines[(*loc, key)] = line
            into[key] = self.build(value_node, (*loc, key))
        for source in merged:
            self._open.add(id(source))
            try:
                self._mapping(source, loc, into)
            finally:
                self._open.discard(id(source))
        return into

    def _merge_sources(self, node: Node, loc: Loc) -> list[MappingNode]:
        sources = node.value if isinstance(node, SequenceNode) else [node]
        good = [source for source in sources if isinstance(source, MappingNode)]
        if len(good) != len(sources):
            self._fail(loc, "'<<' merges a mapping or a list of mappings only")
        return [source for source in good if id(source) not in self._open]

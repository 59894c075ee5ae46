"""Load a config: parse, interpolate, validate and cross-check, reporting every problem at once."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .checks import cross_check
from .interpolate import resolve_tree
from .models import SidegateConfig
from .problems import ConfigError, Finding, Loc, Problem, format_path
from .validation import validate
from .yamltree import SourceMap, parse_yaml

__all__ = ["load_config", "load_config_text"]

_SECTIONS = ", ".join(SidegateConfig.model_fields)


def load_config(path: str | os.PathLike[str]) -> SidegateConfig:
    """Read and load the config file at ``path``.

    Relative ``${file:...}`` paths are taken from the file's directory. Raises
    :class:`ConfigError` with every problem, also when the file cannot be read.
    """
    file = Path(path)
    source = os.fspath(path)
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        problem = Problem("", None, f"not UTF-8 text (byte {exc.start})")
        raise ConfigError([problem], source) from None
    except OSError as exc:
        problem = Problem("", None, f"cannot read the config file: {exc.strerror or exc}")
        raise ConfigError([problem], source) from None
    return load_config_text(text, source=source, base_dir=file.absolute().parent)


def load_config_text(
    text: str, *, source: str = "<string>", base_dir: Path | None = None
) -> SidegateConfig:
    """Load a config from YAML ``text``; ``source`` names it in problems.

    ``${NAME}`` references read the process environment; relative ``${file:...}`` paths are
    taken from ``base_dir`` (the working directory if ``None``). Raises :class:`ConfigError`.
    """
    parsed = parse_yaml(text)
    findings = list(parsed.findings)
    if not isinstance(parsed.data, dict):
        if not findings:
            findings.append(_not_a_mapping(parsed.data))
        raise ConfigError(_place(findings, parsed.source_map), source)
    resolved = resolve_tree(parsed.data, os.environ, base_dir or Path.cwd())
    findings += resolved.findings
    config, invalid = validate(resolved.data, resolved.substituted)
    consequences = [*invalid, *cross_check(resolved.data, resolved.substituted)]
    settled = parsed.broken | resolved.failed
    findings += [f for f in consequences if not _under(f.loc, settled)]
    if findings or config is None:
        raise ConfigError(_place(findings, parsed.source_map), source)
    return config


def _not_a_mapping(data: object) -> Finding:
    if data is None:
        return Finding((), f"the config is empty; expected a mapping of sections ({_SECTIONS})", 1)
    kind = "a list" if isinstance(data, list) else "a single value"
    return Finding((), f"expected a mapping of sections ({_SECTIONS}), not {kind}")


def _under(loc: Loc, settled: set[Loc]) -> bool:
    return any(loc[:depth] in settled for depth in range(len(loc) + 1))


def _place(findings: Iterable[Finding], source_map: SourceMap) -> list[Problem]:
    placed: dict[Problem, None] = {}
    for finding in findings:
        line = finding.line if finding.line is not None else source_map.line_of(finding.loc)
        placed.setdefault(Problem(format_path(finding.loc), line, finding.message))
    return list(placed)

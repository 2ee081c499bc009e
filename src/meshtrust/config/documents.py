"""What a loaded config file is: mappings and sequences that remember their lines, the
line of a field path, and the loader's limits and error.

Nothing here needs PyYAML, so a module can name these types (``meshtrust agent`` does, via
:mod:`meshtrust.config`) without loading the parser; :mod:`meshtrust.config.yaml` reads files
into them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshtrust.errors import ConfigError

__all__ = [
    "DEFAULT_LIMITS",
    "LineMap",
    "LineSeq",
    "YamlError",
    "YamlLimits",
    "line_for",
]


@dataclass(frozen=True)
class YamlLimits:
    """Caps that keep loading a hostile file cheap. The defaults are far above any real
    config file (the largest policy files seen in Istio deployments are a few hundred KiB,
    a dozen levels deep)."""

    max_bytes: int = 1024 * 1024
    max_depth: int = 64
    max_aliases: int = 1000
    max_nodes: int = 200_000  # after expanding every alias


DEFAULT_LIMITS = YamlLimits()


class LineMap(dict[Any, Any]):
    """A YAML mapping that remembers the (1-based) line of each key."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.key_lines: dict[Any, int] = {}


class LineSeq(list[Any]):
    """A YAML sequence that remembers the (1-based) line of each item."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.item_lines: list[int] = []


class YamlError(ConfigError):
    """A file that is not acceptable YAML; ``document`` is the 1-based document it is in
    (``None`` when the file as a whole is the problem: unreadable, too large, not UTF-8)."""

    def __init__(
        self,
        problem: str,
        *,
        file: Path,
        line: int | None,
        document: int | None,
        field: str = "",
    ) -> None:
        super().__init__(problem, file=file, line=line, field=field)
        self.document = document


_STEP = re.compile(r"\[(\d+)\]|\.?([^.\[\]]+)")


def line_for(root: object, field: str) -> int | None:
    """The line of ``field`` (``services[1].upstreams[0].localPort``) in a loaded document, or
    of its nearest ancestor that has one; keys match with ``-`` and ``_`` taken as equal."""
    node = root
    line = node.line if isinstance(node, LineMap | LineSeq) else None
    for match in _STEP.finditer(field):
        index, key = match.group(1), match.group(2)
        if index is not None and isinstance(node, LineSeq) and int(index) < len(node):
            line, node = node.item_lines[int(index)], node[int(index)]
        elif key is not None and isinstance(node, LineMap):
            found = _find_key(node, key)
            if found is None:
                break
            line, node = node.key_lines[found], node[found]
        else:
            break
    return line


def _find_key(mapping: LineMap, key: str) -> object | None:
    if key in mapping:
        return key
    norm = key.replace("-", "_")
    for candidate in mapping:
        if isinstance(candidate, str) and candidate.replace("-", "_") == norm:
            return candidate
    return None

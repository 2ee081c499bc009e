"""YAML that remembers where things are: mappings and sequences carry the line of each key
and item, so a policy error can say "line 10". Duplicate keys are refused (PyYAML would keep
the last one silently, and a policy that says two things must not mean one of them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from meshtrust.errors import PolicyError

__all__ = ["LineLoader", "LineMap", "LineSeq", "read_yaml_documents"]


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


class LineLoader(yaml.SafeLoader):
    """SafeLoader building :class:`LineMap`/:class:`LineSeq` and refusing duplicate keys."""


def _construct_map(loader: LineLoader, node: yaml.MappingNode) -> Iterator[LineMap]:
    data = LineMap(node.start_mark.line + 1)
    yield data
    # Duplicate keys are refused (PyYAML keeps the last silently); keys merged in with "<<"
    # may be overridden, as YAML says.
    seen: set[object] = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            key = loader.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError as exc:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                "found an unhashable key",
                key_node.start_mark,
            ) from exc
        data[key] = loader.construct_object(value_node, deep=True)
        data.key_lines[key] = key_node.start_mark.line + 1


def _construct_seq(loader: LineLoader, node: yaml.SequenceNode) -> Iterator[LineSeq]:
    data = LineSeq(node.start_mark.line + 1)
    yield data
    for item in node.value:
        data.append(loader.construct_object(item, deep=True))
        data.item_lines.append(item.start_mark.line + 1)


LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def read_yaml_documents(path: Path) -> list[tuple[int, object]]:
    """``(document number, document)`` for every non-empty document of ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(path, "", "", f"cannot be read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise PolicyError(path, "", "", "is not UTF-8 text") from exc
    documents: list[tuple[int, object]] = []
    number = 0
    try:
        for document in yaml.load_all(text, Loader=LineLoader):
            number += 1
            if document is not None:
                documents.append((number, document))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        column = f" (column {mark.column + 1})" if mark is not None else ""
        raise PolicyError(
            path,
            f"document {number + 1}",
            "",
            f"is not valid YAML{column}: {problem}",
            line=mark.line + 1 if mark is not None else None,
        ) from exc
    return documents

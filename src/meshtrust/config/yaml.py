"""The one YAML loader: every file meshtrust reads goes through :func:`load_yaml_documents`.

What it guarantees, for mesh.yaml, sidecar.yaml, agent and CA ``--config`` files and policies
alike:

* Mappings and sequences come back as :class:`LineMap` / :class:`LineSeq` (a ``dict`` and a
  ``list`` that remember the 1-based line of each key and item), so every error can name the
  line; :func:`line_for` finds the line of a field path such as ``services[1].port``.
* A duplicate key is refused (PyYAML keeps the last one silently: a file that says two things
  must not mean one of them). The merge key ``<<`` is refused too: Kubernetes tooling gives it
  no meaning in these files, and a merged key that silently loses to a written one is the same
  trap as a duplicate.
* Bounded time and memory whatever the input (billion-laughs alias bombs, 20,000 levels of
  nesting): the file size is capped, and before anything is built a first pass over PyYAML's
  event stream (an iterative parser, no recursion) counts aliases, nesting depth and the number
  of nodes the document would have once every alias is expanded, and refuses the file past
  :class:`YamlLimits`. Only then does the (recursive) composer run, on input known to be small
  and shallow.
* Non-UTF-8 text, NUL bytes and YAML syntax errors are :class:`ConfigError`\\ s naming the line.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from meshtrust.errors import ConfigError

__all__ = [
    "DEFAULT_LIMITS",
    "LineLoader",
    "LineMap",
    "LineSeq",
    "YamlLimits",
    "line_for",
    "load_yaml_documents",
    "load_yaml_mapping",
    "parse_yaml_documents",
]

_MERGE_TAG = "tag:yaml.org,2002:merge"


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


# libyaml's parser when PyYAML has it (it does in every wheel): the same events and marks,
# several times faster on a large file. Pure Python otherwise.
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class LineLoader(_BaseLoader):  # type: ignore[valid-type,misc]
    """SafeLoader building :class:`LineMap`/:class:`LineSeq`. Use it through
    :func:`load_yaml_documents`, which checks limits and keys before constructing."""


def _problem(node: yaml.Node, problem: str) -> yaml.constructor.ConstructorError:
    return yaml.constructor.ConstructorError(None, None, problem, node.start_mark)


def _construct_map(loader: LineLoader, node: yaml.MappingNode) -> Iterator[LineMap]:
    # Keys were checked by _check_keys (no duplicates, no "<<", only scalars).
    data = LineMap(node.start_mark.line + 1)
    yield data
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:  # a scalar with a tag that builds a list, say
            raise _problem(key_node, "a key must be a string or a number") from None
        if key in data:  # written differently, read the same: `1` and `0x1`, `yes` and `true`
            raise _problem(key_node, f"duplicate key {key!r} (first on line {data.key_lines[key]})")
        data[key] = loader.construct_object(value_node, deep=True)
        data.key_lines[key] = key_node.start_mark.line + 1


def _child(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _check_keys(root: yaml.Node, file: Path, document: int) -> None:
    """Refuse duplicate keys, the merge key and non-scalar keys anywhere under ``root``,
    naming the field path (``services[1].name``). Iterative; an aliased subtree is checked
    once."""
    pending: list[tuple[yaml.Node, str]] = [(root, "")]
    seen: set[int] = set()
    while pending:
        node, path = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            pending += [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        if not isinstance(node, yaml.MappingNode):
            continue
        first: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlError(
                    "a key must be a string or a number, not a list or mapping",
                    file=file,
                    line=line,
                    document=document,
                    field=path,
                )
            key = str(key_node.value)
            if key_node.tag == _MERGE_TAG:
                raise YamlError(
                    "the YAML merge key '<<' is not supported; write the keys out "
                    "(Kubernetes tooling gives '<<' no meaning either)",
                    file=file,
                    line=line,
                    document=document,
                    field=_child(path, key),
                )
            identity = (key_node.tag, key)
            if identity in first:
                raise YamlError(
                    f"duplicate key {key!r} (first on line {first[identity]}); "
                    "a key may appear only once",
                    file=file,
                    line=line,
                    document=document,
                    field=_child(path, key),
                )
            first[identity] = line
            pending.append((value_node, _child(path, key)))


def _construct_seq(loader: LineLoader, node: yaml.SequenceNode) -> Iterator[LineSeq]:
    data = LineSeq(node.start_mark.line + 1)
    yield data
    for item in node.value:
        data.append(loader.construct_object(item, deep=True))
        data.item_lines.append(item.start_mark.line + 1)


LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


@dataclass
class _Open:
    """A collection whose end event has not come yet."""

    is_map: bool
    anchor: str | None
    count: int = 1  # nodes in it so far, itself included, aliases expanded
    height: int = 0  # levels below it so far
    children: int = 0  # finished children (for a mapping: keys and values)
    key: str = ""  # for a mapping: the last key


class _LimitCheck:
    """Walks the event stream once, keeping what the limits need: the open collections (for
    depth and the field path of a refusal), the size and height of every anchored value (so
    an alias counts as what it would expand to), the alias count and the expanded total."""

    def __init__(self, file: Path, limits: YamlLimits) -> None:
        self.file = file
        self.limits = limits
        self.open: list[_Open] = []
        self.anchors: dict[str, tuple[int, int]] = {}
        self.aliases = 0
        self.total = 0
        self.document = 0

    def feed(self, event: yaml.Event) -> None:
        if isinstance(event, yaml.DocumentStartEvent):
            self.document += 1
        elif isinstance(event, yaml.CollectionStartEvent):
            if len(self.open) >= self.limits.max_depth:
                self.refuse_depth(event)
            self.open.append(_Open(isinstance(event, yaml.MappingStartEvent), event.anchor))
            self.total += 1
        elif isinstance(event, yaml.CollectionEndEvent):
            done = self.open.pop()
            if done.anchor is not None:
                self.anchors[done.anchor] = (done.count, done.height)
            self.finished(event, done.count, done.height, new=0)
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                self.anchors[event.anchor] = (1, 0)
            self.finished(event, 1, 0, new=1, scalar=event.value)
        elif isinstance(event, yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > self.limits.max_aliases:
                self.refuse(event, f"has more than {self.limits.max_aliases} aliases")
            if any(o.anchor == event.anchor for o in self.open):
                self.refuse(event, f"alias *{event.anchor} refers to a value that contains it")
            count, height = self.anchors.get(event.anchor or "", (1, 0))
            self.finished(event, count, height, new=count)

    def finished(
        self, event: yaml.Event, count: int, height: int, *, new: int, scalar: str = ""
    ) -> None:
        """A value of ``count`` nodes and ``height`` levels is complete; ``new`` of its nodes
        are not in the total yet (a collection's were counted as they came)."""
        self.total += new
        if len(self.open) + height > self.limits.max_depth:
            self.refuse_depth(event)
        if self.total > self.limits.max_nodes:
            what = "expands to more than" if self.aliases else "has more than"
            bomb = " (an alias bomb?)" if self.aliases else ""
            self.refuse(event, f"{what} {self.limits.max_nodes} values{bomb}")
        if self.open:
            parent = self.open[-1]
            parent.count += count
            parent.height = max(parent.height, height + 1)
            if parent.is_map and parent.children % 2 == 0:
                parent.key = scalar
            parent.children += 1

    def field(self, *, steps: int | None = None) -> str:
        """The path to where the stream is now (``services[1].labels``), its first ``steps``
        steps only when given."""
        path = ""
        for o in self.open[:steps]:
            if not o.is_map:
                path += f"[{o.children}]"
            elif o.children % 2:  # inside the value of o.key
                path = f"{path}.{o.key}" if path else o.key
            else:
                break  # inside a key (a complex key): no further path
        return path

    def refuse_depth(self, event: yaml.Event) -> None:
        # Named by its top-level field: the full path would be dozens of steps long, and how
        # far the parser had read ahead when it refused is not the user's business.
        problem = f"nests deeper than {self.limits.max_depth} levels"
        self.refuse(event, problem, field=self.field(steps=1))

    def refuse(self, event: yaml.Event, problem: str, *, field: str | None = None) -> None:
        line = event.start_mark.line + 1 if event.start_mark else None
        field = self.field() if field is None else field
        raise YamlError(problem, file=self.file, line=line, document=self.document, field=field)


def _check_limits(text: str, file: Path, limits: YamlLimits) -> None:
    """Refuse ``text`` if it nests deeper, has more aliases or would expand to more nodes than
    ``limits`` allow. Iterative over the event stream, so it cannot itself blow the stack."""
    check = _LimitCheck(file, limits)
    events = yaml.parse(text, Loader=_BaseLoader)
    while True:
        try:
            event = next(events, None)
        except yaml.YAMLError as exc:
            document = max(check.document, 1)
            if "maximum nesting depth" in str(getattr(exc, "problem", "")):
                # libyaml's own cap (1000 levels) can trip before our count does, because
                # its scanner reads ahead; it is the same refusal.
                mark = getattr(exc, "problem_mark", None)
                line = mark.line + 1 if mark else None
                problem = f"nests deeper than {limits.max_depth} levels"
                field = check.field(steps=1)
                raise YamlError(
                    problem, file=file, line=line, document=document, field=field
                ) from None
            raise _yaml_error(exc, file, document, text) from None
        if event is None:
            return
        check.feed(event)


def _decode(data: bytes, file: Path) -> str:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise YamlError("is not UTF-8 text", file=file, line=line, document=None) from None
    return text


def _read(file: Path, limits: YamlLimits) -> str:
    try:
        with file.open("rb") as handle:
            data = handle.read(limits.max_bytes + 1)
    except OSError as exc:
        problem = f"cannot be read: {exc.strerror or exc}"
        raise YamlError(problem, file=file, line=None, document=None) from exc
    if len(data) > limits.max_bytes:
        problem = f"is larger than {limits.max_bytes} bytes"
        raise YamlError(problem, file=file, line=None, document=None)
    return _decode(data, file)


def _yaml_error(exc: yaml.YAMLError, file: Path, document: int, text: str) -> YamlError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    line: int | None = mark.line + 1 if mark is not None else None
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        problem = f"character {chr(exc.character)!r} is not allowed in YAML"
        return YamlError(problem, file=file, line=line, document=document)
    if isinstance(exc, yaml.constructor.ConstructorError):
        return YamlError(problem, file=file, line=line, document=document)
    column = f", column {mark.column + 1}" if mark is not None else ""
    where = f" at line {line}{column}" if line else ""
    return YamlError(
        f"is not valid YAML{where}: {problem}", file=file, line=line, document=document
    )


def load_yaml_documents(
    file: Path, *, limits: YamlLimits = DEFAULT_LIMITS
) -> list[tuple[int, object]]:
    """``(document number, document)`` for every non-empty document of ``file``.

    Raises :class:`ConfigError` (a :class:`YamlError`) naming the file and line for an
    unreadable, oversized, non-UTF-8 or invalid file, a duplicate key, ``<<``, or input past
    ``limits``.
    """
    return parse_yaml_documents(_read(file, limits), file, limits=limits)


def parse_yaml_documents(
    text: str, file: Path, *, limits: YamlLimits = DEFAULT_LIMITS
) -> list[tuple[int, object]]:
    """:func:`load_yaml_documents` for text already read (``file`` names it in errors)."""
    if len(text.encode("utf-8", "surrogatepass")) > limits.max_bytes:
        problem = f"is larger than {limits.max_bytes} bytes"
        raise YamlError(problem, file=file, line=None, document=None)
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise YamlError("contains a NUL character", file=file, line=line, document=None)
    _check_limits(text, file, limits)  # syntax errors are found (and reported) here
    documents: list[tuple[int, object]] = []
    number = 0
    loader = LineLoader(text)
    try:
        while loader.check_node():
            number += 1
            node = loader.get_node()
            if node is None:
                continue
            _check_keys(node, file, number)
            document = loader.construct_document(node)
            if document is not None:
                documents.append((number, document))
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, file, max(number, 1), text) from None
    finally:
        loader.dispose()
    return documents


def load_yaml_mapping(file: Path, *, limits: YamlLimits = DEFAULT_LIMITS) -> LineMap:
    """The top-level mapping of a single-document file (empty file: an empty mapping).

    Raises :class:`ConfigError` as :func:`load_yaml_documents` does, and when the file holds
    several documents or something other than a mapping at the top.
    """
    documents = load_yaml_documents(file, limits=limits)
    if not documents:
        return LineMap(1)
    if len(documents) > 1:
        raise ConfigError("holds more than one YAML document; expected one", file=file)
    document = documents[0][1]
    if not isinstance(document, LineMap):
        raise ConfigError("expected a mapping of settings at the top", file=file, line=1)
    return document


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

"""PyYAML's half of the config loader: the limit check over the event stream, the key
checks, and construction into :class:`LineMap`/:class:`LineSeq`.

Only :func:`meshtrust.config.yaml.parse_yaml_documents` uses it, after its own size and NUL
checks; the guarantees are described there.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from meshtrust.config.documents import LineMap, LineSeq, YamlError, YamlLimits

__all__ = ["LineLoader", "parse_documents"]

_MERGE_TAG = "tag:yaml.org,2002:merge"


# libyaml's parser when PyYAML has it (it does in every wheel): the same events and marks,
# several times faster on a large file. Pure Python otherwise.
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class LineLoader(_BaseLoader):  # type: ignore[valid-type,misc]
    """SafeLoader building :class:`LineMap`/:class:`LineSeq`. Use it through
    :func:`~meshtrust.config.yaml.load_yaml_documents`, which checks limits and keys before
    constructing."""


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


def parse_documents(text: str, file: Path, limits: YamlLimits) -> list[tuple[int, object]]:
    """``(document number, document)`` for every non-empty document of ``text``, which the
    caller has checked for size and NUL characters. Raises :class:`YamlError`."""
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

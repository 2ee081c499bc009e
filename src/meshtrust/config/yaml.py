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

The types a loaded file is made of live in :mod:`meshtrust.config.documents`; the PyYAML side
(limit check, key checks, construction) in :mod:`meshtrust.config.yaml_parser`, which this
module imports only when it parses.
"""

from __future__ import annotations

from pathlib import Path

from meshtrust.config.documents import DEFAULT_LIMITS, LineMap, YamlError, YamlLimits
from meshtrust.errors import ConfigError

__all__ = ["load_yaml_documents", "load_yaml_mapping", "parse_yaml_documents"]


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
    # PyYAML and the parser (about 1 MB resident: PyYAML's 18 modules and libyaml) load on
    # the first file read, not with the config layer: `meshtrust agent` configured by flags
    # alone reads no YAML (benchmarks/agent.py, phase 2).
    from meshtrust.config.yaml_parser import parse_documents

    return parse_documents(text, file, limits)


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

"""Settings files: YAML mappings whose keys are the command's flag names.

Each command declares its keys as ``{flag-name: (field name, converter)}``; a converter gets
the raw YAML value, a "where" string for messages (file and key) and the file's directory
(relative paths in a file are relative to the file). Flags given on the command line
override the file. Unknown keys, wrong types and bad values are :class:`ConfigError`s that
name the file and the key.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from meshtrust.durations import parse_duration
from meshtrust.errors import ConfigError, InvalidDuration, InvalidSpiffeId
from meshtrust.spiffe import TrustDomain

__all__ = [
    "Converter",
    "as_duration",
    "as_float",
    "as_int",
    "as_names",
    "as_path",
    "as_str",
    "as_trust_domain",
    "load_settings",
    "read_yaml_mapping",
]

Converter = Callable[[object, str, Path], Any]


def as_str(value: object, where: str, base: Path) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string")
    return value


def as_int(value: object, where: str, base: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer")
    return value


def as_float(value: object, where: str, base: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected a number")
    return float(value)


def as_path(value: object, where: str, base: Path) -> Path:
    path = Path(as_str(value, where, base))
    return path if path.is_absolute() else base / path


def as_duration(value: object, where: str, base: Path) -> dt.timedelta:
    try:
        return parse_duration(
            value if isinstance(value, str | int | float) else str(value), what=where
        )
    except InvalidDuration as exc:
        raise ConfigError(str(exc)) from exc


def as_trust_domain(value: object, where: str, base: Path) -> TrustDomain:
    try:
        return TrustDomain.parse(as_str(value, where, base))
    except InvalidSpiffeId as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def as_names(value: object, where: str, base: Path) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{where}: expected a name or a list of names")


def read_yaml_mapping(path: Path, *, what: str = "config file") -> dict[object, object]:
    """The top-level mapping of a YAML file; ConfigError with line/column when it is not."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{what} {path} is not valid YAML{where}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path}: expected a mapping of settings at the top")
    return raw


def load_settings(path: Path, keys: Mapping[str, tuple[str, Converter]]) -> dict[str, Any]:
    """Read ``path`` and convert each key with ``keys``; returns ``{field name: value}``."""
    raw = read_yaml_mapping(path)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        norm = str(key).replace("_", "-")
        if norm not in keys:
            known = ", ".join(sorted(keys))
            raise ConfigError(f"config file {path}: unknown key {key!r} (known keys: {known})")
        name, convert = keys[norm]
        out[name] = convert(value, f"config file {path}, key {key!r}", path.parent)
    return out

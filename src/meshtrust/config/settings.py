"""Settings files: YAML mappings whose keys are a command's flag names (``agent --config``,
``ca serve --config``).

Each command declares its keys as ``{flag-name: (field name, converter)}``; a converter gets
the raw YAML value, the key (for messages) and the file's directory (relative paths in a file
are relative to the file). Flags given on the command line override the file. Unknown keys
(``max_ttl`` and ``max-ttl`` are the same key; both at once is a duplicate), wrong types and
bad values are :class:`ConfigError`\\ s naming the file, the line and the key.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from meshtrust.config.documents import line_for
from meshtrust.config.validators import (
    check_duration,
    check_float,
    check_host_port,
    check_int,
    check_path,
    check_string,
    check_trust_domain,
)
from meshtrust.config.yaml import load_yaml_mapping
from meshtrust.errors import ConfigError
from meshtrust.spiffe import TrustDomain

__all__ = [
    "Converter",
    "as_address",
    "as_duration",
    "as_float",
    "as_int",
    "as_names",
    "as_path",
    "as_str",
    "as_trust_domain",
    "load_settings",
]

Converter = Callable[[object, str, Path], Any]


def as_str(value: object, field: str, base: Path) -> str:
    return check_string(value, field)


def as_int(value: object, field: str, base: Path) -> int:
    return check_int(value, field)


def as_float(value: object, field: str, base: Path) -> float:
    return check_float(value, field)


def as_path(value: object, field: str, base: Path) -> Path:
    return check_path(value, field, base)


def as_address(value: object, field: str, base: Path) -> str:
    return check_host_port(value, field)


def as_duration(value: object, field: str, base: Path) -> dt.timedelta:
    return check_duration(value, field)


def as_trust_domain(value: object, field: str, base: Path) -> TrustDomain:
    return check_trust_domain(value, field)


def as_names(value: object, field: str, base: Path) -> tuple[str, ...]:
    if isinstance(value, str):
        return (check_string(value, field),)
    if isinstance(value, list):
        return tuple(check_string(v, f"{field}[{i}]") for i, v in enumerate(value))
    raise ConfigError("expected a name or a list of names", field=field)


def load_settings(path: Path, keys: Mapping[str, tuple[str, Converter]]) -> dict[str, Any]:
    """Read ``path`` and convert each key with ``keys``; returns ``{field name: value}``.

    Raises :class:`ConfigError` naming the file, line and key.
    """
    raw = load_yaml_mapping(path)
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in raw.items():
        line = raw.key_lines[key]
        norm = str(key).replace("_", "-")
        if norm not in keys:
            known = ", ".join(sorted(keys))
            problem = f"unknown key (known keys: {known})"
            raise ConfigError(problem, file=path, line=line, field=str(key))
        if norm in given:
            problem = f"given twice (as {given[norm]!r} and {str(key)!r})"
            raise ConfigError(problem, file=path, line=line, field=str(key))
        given[norm] = str(key)
        name, convert = keys[norm]
        try:
            out[name] = convert(value, str(key), path.parent)
        except ConfigError as exc:
            raise exc.located(path, line_for(raw, exc.field) or line) from None
    return out

"""The validators every config file shares: names, ports, HOST:PORT, labels, durations, paths,
trust domains and SPIFFE IDs.

Each is ``check(value, field) -> value`` and raises :class:`ConfigError` with ``field`` set
(``services[1].port``, or a flag such as ``--listen``) and a problem a person can act on; the
loader that read the file adds the file and the line (:meth:`ConfigError.located`). They are
pure apart from :func:`check_directory_location`, which looks at the file system.

Because mesh.yaml, sidecar.yaml and the agent's settings all go through these, a value one of
them accepts is a value the others accept: a service name that would make a sidecar config
the agent refuses is refused in mesh.yaml, before anything starts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path

from meshtrust.durations import parse_duration
from meshtrust.errors import ConfigError, InvalidDuration, InvalidSpiffeId
from meshtrust.spiffe import SpiffeId, TrustDomain

__all__ = [
    "MAX_PATH_BYTES",
    "check_directory_location",
    "check_dns_label",
    "check_dns_subdomain",
    "check_duration",
    "check_float",
    "check_host_port",
    "check_int",
    "check_labels",
    "check_path",
    "check_port",
    "check_spiffe_id",
    "check_string",
    "check_string_list",
    "check_trust_domain",
    "describe",
    "parse_host_port",
]

MAX_PORT = 65535
MAX_PATH_BYTES = 4095  # PATH_MAX - 1 on Linux
MAX_NAME_BYTES = 255  # NAME_MAX: one path component
_SYSTEM_DIRS = (Path("/proc"), Path("/sys"), Path("/dev"))

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([-A-Za-z0-9_.]*[A-Za-z0-9_])?")


def describe(value: object) -> str:
    """``value`` for a message: short, quoted, never a huge nested structure."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, str):
        return ascii(value) if len(value) <= 80 else f"{ascii(value[:80])}..."
    if isinstance(value, int | float):
        return repr(value)
    return type(value).__name__


def check_string(value: object, field: str, *, empty: bool = False) -> str:
    """A string (non-empty unless ``empty``) without NUL characters."""
    if not isinstance(value, str):
        raise ConfigError(f"expected a string, got {describe(value)}", field=field)
    if not value and not empty:
        raise ConfigError("must not be empty", field=field)
    if "\x00" in value:
        raise ConfigError("must not contain a NUL character", field=field)
    return value


def check_string_list(value: object, field: str) -> tuple[str, ...]:
    """A non-empty list of strings (a command line, say)."""
    if not isinstance(value, list) or not value:
        raise ConfigError(
            f"expected a non-empty list of strings, got {describe(value)}", field=field
        )
    return tuple(check_string(item, f"{field}[{i}]", empty=True) for i, item in enumerate(value))


def check_int(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"expected an integer, got {describe(value)}", field=field)
    return value


def check_float(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"expected a number, got {describe(value)}", field=field)
    return float(value)


def check_port(value: object, field: str, *, zero: bool = False) -> int:
    """A TCP port 1-65535 (0 too when ``zero``: "any free port")."""
    low = 0 if zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_PORT:
        raise ConfigError(f"expected a port {low}-{MAX_PORT}, got {describe(value)}", field=field)
    return value


def check_dns_label(value: object, field: str) -> str:
    """An RFC 1123 label, as Kubernetes names namespaces and services: ``web-1``."""
    text = check_string(value, field)
    if len(text) > 63 or not _DNS_LABEL.fullmatch(text):
        raise ConfigError(
            f"{describe(text)} is not a name (lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters)",
            field=field,
        )
    return text


def check_dns_subdomain(value: object, field: str) -> str:
    """An RFC 1123 subdomain (labels joined by '.', at most 253 characters)."""
    text = check_string(value, field)
    if len(text) > 253 or not all(_DNS_LABEL.fullmatch(part) for part in text.split(".")):
        raise ConfigError(
            f"{describe(text)} is not a DNS name (lower-case letters, digits, '-' and '.', "
            "at most 253 characters)",
            field=field,
        )
    return text


def _label_key_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and (len(prefix) > 253 or not all(_DNS_LABEL.fullmatch(p) for p in prefix.split("."))):
        return f"label key {describe(key)}: the prefix before '/' must be a DNS name"
    if len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        return (
            f"label key {describe(key)}: the name must be at most 63 letters, digits, "
            "'-', '_' or '.', starting and ending with a letter or digit"
        )
    return None


def check_labels(value: object, field: str) -> dict[str, str]:
    """Kubernetes labels: ``[prefix/]name`` keys, values of at most 63 such characters."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping of labels, got {describe(value)}", field=field)
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise ConfigError(f"label keys must be strings, got {describe(key)}", field=field)
        problem = _label_key_problem(key)
        if problem:
            raise ConfigError(problem, field=field)
        where = f"{field}.{key}"
        if not isinstance(item, str):
            raise ConfigError(
                f"expected a string, got {describe(item)} (quote numbers and booleans)",
                field=where,
            )
        if item and (len(item) > 63 or not _LABEL_NAME.fullmatch(item)):
            raise ConfigError(
                f"{describe(item)} is not a label value (at most 63 letters, digits, '-', '_' "
                "or '.', starting and ending with a letter or digit)",
                field=where,
            )
        out[key] = item
    return out


def check_duration(value: object, field: str) -> dt.timedelta:
    """``90s``, ``15m``, ``24h``, ``90d`` or a number of seconds."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(
            f"expected a duration like 90s, 15m, 24h or 90d, got {describe(value)}", field=field
        )
    try:
        return parse_duration(value, what=field)
    except InvalidDuration as exc:
        raise ConfigError(str(exc).removeprefix(f"{field}: "), field=field) from exc


def parse_host_port(text: str, *, what: str, zero: bool = True) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:15012`` for IPv6) -> (host, port), the one parser of addresses.

    ``zero`` allows port 0 (a listen address: "any free port"). Raises :class:`ConfigError`
    with ``field`` = ``what``.
    """
    host, sep, port = text.strip().rpartition(":")
    ok = bool(sep) and port.isascii() and port.isdigit() and len(port) <= 5
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ok = ok and isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
        except ValueError:
            ok = False
    elif not _HOST_NAME.fullmatch(host) or len(host) > 253:
        ok = False  # also an IPv6 address without brackets: the port would be ambiguous
    if ok and not (0 if zero else 1) <= int(port) <= MAX_PORT:
        ok = False
    if not ok:
        raise ConfigError(
            f"{describe(text)} is not HOST:PORT (for example 127.0.0.1:15012 or [::1]:15012)",
            field=what,
        )
    return host, int(port)


def check_host_port(value: object, field: str, *, zero: bool = True) -> str:
    """A ``HOST:PORT`` string, returned as written."""
    text = check_string(value, field)
    parse_host_port(text, what=field, zero=zero)
    return text


def check_path(value: object, field: str, base: Path) -> Path:
    """A file system path; relative paths are relative to ``base`` (the file's directory)."""
    text = check_string(value, field)
    path = Path(text) if Path(text).is_absolute() else base / text
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise ConfigError(f"path is longer than {MAX_PATH_BYTES} bytes", field=field)
    for part in path.parts:
        if len(os.fsencode(part)) > MAX_NAME_BYTES:
            raise ConfigError(
                f"path component {describe(part)} is longer than {MAX_NAME_BYTES} bytes",
                field=field,
            )
    return path


def check_directory_location(path: Path, field: str) -> Path:
    """Refuse a directory meshtrust would create or write at ``path`` if it cannot be one:
    an existing non-directory, a path below a regular file, or a path in ``/proc``, ``/sys``
    or ``/dev``. Reads the file system (``stat`` only); creates nothing."""
    absolute = Path(os.path.abspath(path))
    for system in _SYSTEM_DIRS:
        if absolute == system or system in absolute.parents:
            raise ConfigError(
                f"{path} is under {system}, which is not a place for files", field=field
            )
    if absolute.exists() and not absolute.is_dir():
        raise ConfigError(f"{path} exists and is not a directory", field=field)
    for parent in absolute.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(
                    f"{path} is below {parent}, which is not a directory", field=field
                )
            break
    return path


def check_trust_domain(value: object, field: str) -> TrustDomain:
    try:
        return TrustDomain.parse(check_string(value, field))
    except InvalidSpiffeId as exc:
        raise ConfigError(str(exc), field=field) from exc


def check_spiffe_id(value: object, field: str) -> SpiffeId:
    try:
        return SpiffeId.parse(check_string(value, field))
    except InvalidSpiffeId as exc:
        raise ConfigError(str(exc), field=field) from exc

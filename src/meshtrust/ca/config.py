"""``ca serve`` settings: from flags, from a YAML file (``--config``), or both (flags win)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from meshtrust.durations import format_duration, parse_duration
from meshtrust.errors import ConfigError, InvalidDuration, InvalidSpiffeId
from meshtrust.spiffe import TrustDomain

__all__ = ["CaServeConfig", "load_config_file", "parse_host_port", "parse_issuer_flag"]


@dataclass(frozen=True)
class CaServeConfig:
    ca_dir: Path = Path("./ca")
    listen: str = "127.0.0.1:15012"
    ledger: str | None = None  # default: sqlite file ledger.db in ca_dir
    jwt_issuers: tuple[tuple[str, Path], ...] = ()
    audience: str = "istio-ca"
    default_ttl: dt.timedelta = dt.timedelta(hours=24)
    max_ttl: dt.timedelta = dt.timedelta(days=90)
    metrics_listen: str | None = "127.0.0.1:15014"
    server_names: tuple[str, ...] = ()
    trust_domain: TrustDomain | None = None
    workers: int = 1
    drain_grace: dt.timedelta = dt.timedelta(seconds=10)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parse_host_port(self.listen, what="listen")
        if self.metrics_listen is not None:
            parse_host_port(self.metrics_listen, what="metrics-listen")
        if self.default_ttl > self.max_ttl:
            raise ConfigError(
                f"default TTL {format_duration(self.default_ttl)} is above the maximum TTL "
                f"{format_duration(self.max_ttl)}"
            )
        if self.default_ttl <= dt.timedelta(0):
            raise ConfigError("default TTL must be positive")
        if not 1 <= self.workers <= 64:
            raise ConfigError(f"workers must be between 1 and 64, got {self.workers}")


def parse_host_port(text: str, *, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:15012`` for IPv6) -> (host, port); :class:`ConfigError` if bad."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: {text!r} is not HOST:PORT (for example 127.0.0.1:15012)")
    return host.strip("[]"), int(port)


# YAML key -> (field name, converter)
def _issuers(value: object, src: str) -> tuple[tuple[str, Path], ...]:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, dict) and set(item) == {"issuer", "jwks"}:
            out.append((str(item["issuer"]), Path(str(item["jwks"]))))
        elif isinstance(item, str):
            out.append(parse_issuer_flag(item, where=src))
        else:
            raise ConfigError(
                f"{src}: each jwt-issuer is 'ISSUER=JWKS_FILE' or {{issuer: ..., jwks: ...}}"
            )
    return tuple(out)


def parse_issuer_flag(text: str, *, where: str = "--jwt-issuer") -> tuple[str, Path]:
    issuer, sep, path = text.rpartition("=")
    if not sep or not issuer or not path:
        raise ConfigError(f"{where}: {text!r} is not ISSUER=JWKS_FILE")
    return issuer, Path(path)


def _duration(value: object, src: str) -> dt.timedelta:
    try:
        return parse_duration(
            value if isinstance(value, str | int | float) else str(value), what=src
        )
    except InvalidDuration as exc:
        raise ConfigError(str(exc)) from exc


def _trust_domain(value: object, src: str) -> TrustDomain:
    try:
        return TrustDomain.parse(str(value))
    except InvalidSpiffeId as exc:
        raise ConfigError(f"{src}: {exc}") from exc


def _names(value: object, src: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{src}: expected a name or a list of names")


def _int(value: object, src: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{src}: expected an integer")
    return value


def _str(value: object, src: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{src}: expected a string")
    return value


_KEYS: dict[str, tuple[str, Any]] = {
    "ca-dir": ("ca_dir", lambda v, s: Path(_str(v, s))),
    "listen": ("listen", _str),
    "ledger": ("ledger", _str),
    "jwt-issuer": ("jwt_issuers", _issuers),
    "jwt-issuers": ("jwt_issuers", _issuers),
    "audience": ("audience", _str),
    "default-ttl": ("default_ttl", _duration),
    "max-ttl": ("max_ttl", _duration),
    "metrics-listen": ("metrics_listen", _str),
    "server-name": ("server_names", _names),
    "server-names": ("server_names", _names),
    "trust-domain": ("trust_domain", _trust_domain),
    "workers": ("workers", _int),
    "drain-grace": ("drain_grace", _duration),
}


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a ``ca serve`` YAML file into field values; relative paths are resolved against
    the file's directory. Raises :class:`ConfigError` naming the file and the key."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of settings at the top")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        norm = str(key).replace("_", "-")
        if norm not in _KEYS:
            known = ", ".join(sorted(k for k in _KEYS if not k.endswith("s") or k == "ca-dir"))
            raise ConfigError(f"config file {path}: unknown key {key!r} (known keys: {known})")
        name, convert = _KEYS[norm]
        out[name] = convert(value, f"config file {path}, key {key!r}")
    base = path.parent
    if "ca_dir" in out and not out["ca_dir"].is_absolute():
        out["ca_dir"] = base / out["ca_dir"]
    if "jwt_issuers" in out:
        out["jwt_issuers"] = tuple(
            (iss, p if p.is_absolute() else base / p) for iss, p in out["jwt_issuers"]
        )
    valid = {f.name for f in fields(CaServeConfig)}
    assert set(out) <= valid
    return out

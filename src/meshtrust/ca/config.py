"""``ca serve`` settings: from flags, from a YAML file (``--config``), or both (flags win)."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshtrust.durations import format_duration
from meshtrust.errors import ConfigError
from meshtrust.settings import (
    Converter,
    as_duration,
    as_int,
    as_names,
    as_path,
    as_str,
    as_trust_domain,
    load_settings,
)
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
    # One per CPU (capped: beyond 8 the shared ledger, not the CPUs, is the limit).
    workers: int = field(default_factory=lambda: min(os.cpu_count() or 1, 8))
    drain_grace: dt.timedelta = dt.timedelta(seconds=10)

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


def _issuers(value: object, src: str, base: Path) -> tuple[tuple[str, Path], ...]:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, dict) and set(item) == {"issuer", "jwks"}:
            out.append((str(item["issuer"]), as_path(item["jwks"], src, base)))
        elif isinstance(item, str):
            issuer, path = parse_issuer_flag(item, where=src)
            out.append((issuer, path if path.is_absolute() else base / path))
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


_KEYS: dict[str, tuple[str, Converter]] = {
    "ca-dir": ("ca_dir", as_path),
    "listen": ("listen", as_str),
    "ledger": ("ledger", as_str),
    "jwt-issuer": ("jwt_issuers", _issuers),
    "audience": ("audience", as_str),
    "default-ttl": ("default_ttl", as_duration),
    "max-ttl": ("max_ttl", as_duration),
    "metrics-listen": ("metrics_listen", as_str),
    "server-name": ("server_names", as_names),
    "trust-domain": ("trust_domain", as_trust_domain),
    "workers": ("workers", as_int),
    "drain-grace": ("drain_grace", as_duration),
}


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a ``ca serve`` YAML file into field values; relative paths are resolved against
    the file's directory. Raises :class:`ConfigError` naming the file and the key."""
    return load_settings(path, _KEYS)

"""``ca serve`` settings: from flags, from a YAML file (``--config``), or both (flags win)."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshtrust.config import (
    Converter,
    as_address,
    as_duration,
    as_int,
    as_names,
    as_path,
    as_str,
    as_trust_domain,
    check_path,
    check_string,
    load_settings,
    parse_host_port,
)
from meshtrust.config.federation import FederationConfig, check_federation
from meshtrust.durations import format_duration
from meshtrust.errors import ConfigError
from meshtrust.spiffe import TrustDomain

__all__ = ["CaServeConfig", "load_config_file", "parse_issuer_flag"]


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
    # Kubernetes (ca/kube_authn.py): "in-cluster" or a kubeconfig path; None: off.
    kube_tokenreview: str | None = None
    kube_jwks: str | None = None
    # SPIFFE federation (ca/federation.py): the bundle endpoint and the federated domains.
    federation: FederationConfig | None = None

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


def _issuers(value: object, field: str, base: Path) -> tuple[tuple[str, Path], ...]:
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]" if isinstance(value, list) else field
        if isinstance(item, dict) and set(item) == {"issuer", "jwks"}:
            issuer = check_string(item["issuer"], f"{where}.issuer")
            out.append((issuer, check_path(item["jwks"], f"{where}.jwks", base)))
        elif isinstance(item, str):
            issuer, path = parse_issuer_flag(item, where=where)
            out.append((issuer, check_path(str(path), where, base)))
        else:
            raise ConfigError(
                "each jwt-issuer is 'ISSUER=JWKS_FILE' or {issuer: ..., jwks: ...}", field=where
            )
    return tuple(out)


def parse_issuer_flag(text: str, *, where: str = "--jwt-issuer") -> tuple[str, Path]:
    issuer, sep, path = text.rpartition("=")
    if not sep or not issuer or not path:
        raise ConfigError(f"{text!r} is not ISSUER=JWKS_FILE", field=where)
    return issuer, Path(path)


def _kube_source(value: object, field: str, base: Path) -> str:
    text = check_string(value, field)
    return text if text == "in-cluster" else str(check_path(text, field, base))


_KEYS: dict[str, tuple[str, Converter]] = {
    "ca-dir": ("ca_dir", as_path),
    "listen": ("listen", as_address),
    "ledger": ("ledger", as_str),
    "jwt-issuer": ("jwt_issuers", _issuers),
    "audience": ("audience", as_str),
    "default-ttl": ("default_ttl", as_duration),
    "max-ttl": ("max_ttl", as_duration),
    "metrics-listen": ("metrics_listen", as_address),
    "server-name": ("server_names", as_names),
    "trust-domain": ("trust_domain", as_trust_domain),
    "workers": ("workers", as_int),
    "drain-grace": ("drain_grace", as_duration),
    "kube-tokenreview": ("kube_tokenreview", _kube_source),
    "kube-jwks": ("kube_jwks", _kube_source),
    "federation": ("federation", check_federation),
}


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a ``ca serve`` YAML file into field values; relative paths are resolved against
    the file's directory. Raises :class:`ConfigError` naming the file and the key."""
    return load_settings(path, _KEYS)

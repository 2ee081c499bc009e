"""``meshtrust agent`` settings, and working out which identity the agent is for."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meshtrust.agent.rotation import check_rotation
from meshtrust.config import (
    Converter,
    as_address,
    as_duration,
    as_float,
    as_path,
    as_str,
    as_trust_domain,
    check_host_port,
    load_settings,
    parse_host_port,
)
from meshtrust.errors import ConfigError, InvalidSpiffeId
from meshtrust.pki import KeyType
from meshtrust.spiffe import SpiffeId, TrustDomain

__all__ = ["AgentConfig", "identity_from_token", "load_agent_settings", "resolve_identity"]


@dataclass(frozen=True)
class AgentConfig:
    ca_root: Path | None = None  # required unless join gives the trust bundle
    # One address, or several (``--ca-address`` repeated): the CA replicas the agent fails
    # over between (meshtrust.caapi.failover). A name may stand for several addresses.
    ca_address: str | Sequence[str] = "127.0.0.1:15012"
    ca_server_name: str | None = None
    token_file: Path | None = None
    trust_domain: TrustDomain | None = None
    namespace: str | None = None
    service_account: str | None = None
    key_type: KeyType = KeyType.EC_P256
    cert_ttl: dt.timedelta = dt.timedelta(hours=24)
    rotation_ratio: float = 0.5
    rotation_jitter: float = 0.01
    sds_socket: Path | None = None
    workload_socket: Path | None = None
    output_dir: Path | None = None
    status_listen: str | None = "127.0.0.1:15021"
    # The Envoy sidecar (optional): its YAML config, the Istio policy files, where Envoy's
    # generated files live (default: beside the SDS socket).
    sidecar: Path | None = None
    policy_files: tuple[Path, ...] = ()
    root_namespace: str = "istio-system"
    # Istio's trustDomainAliases: principals of these trust domains are the mesh's own.
    trust_domain_aliases: tuple[TrustDomain, ...] = ()
    envoy_workdir: Path | None = None
    # A join file (meshtrust join create): trust bundle, CA address and first token.
    join: Path | None = None

    @property
    def ca_addresses(self) -> tuple[str, ...]:
        """Every CA address, in the order given."""
        if isinstance(self.ca_address, str):
            return (self.ca_address,)
        return tuple(self.ca_address)

    def __post_init__(self) -> None:
        if self.join is None and self.ca_root is None:
            raise ConfigError("--ca-root is required (the CA's root-cert.pem), or --join FILE")
        if self.join is not None and (self.ca_root is not None or self.token_file is not None):
            raise ConfigError(
                "--join gives the trust bundle and the first token; drop --ca-root/--token-file"
            )
        if not isinstance(self.ca_address, str):  # a list from a caller: keep it immutable
            object.__setattr__(self, "ca_address", tuple(self.ca_address))
        if not self.ca_addresses:
            raise ConfigError("at least one CA address is needed", field="ca-address")
        for i, address in enumerate(self.ca_addresses):
            field = "ca-address" if isinstance(self.ca_address, str) else f"ca-address[{i}]"
            parse_host_port(address, what=field, zero=False)
        if self.status_listen is not None:
            parse_host_port(self.status_listen, what="status-listen")
        if self.cert_ttl < dt.timedelta(seconds=1):
            raise ConfigError("cert-ttl must be at least 1s")
        try:
            check_rotation(self.rotation_ratio, self.rotation_jitter)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.sidecar is not None and self.sds_socket is None:
            raise ConfigError("--sidecar needs --sds-socket: Envoy gets its certificates over SDS")
        if self.policy_files and self.sidecar is None:
            raise ConfigError("--policy applies to the Envoy sidecar; give --sidecar too")
        if not (self.sds_socket or self.workload_socket or self.output_dir):
            raise ConfigError(
                "nothing to serve: give at least one of --sds-socket, --workload-socket, "
                "--output-dir"
            )


def _key_type(value: object, field: str, base: Path) -> KeyType:
    try:
        return KeyType.parse(as_str(value, field, base))
    except ConfigError as exc:
        raise ConfigError(exc.problem, field=field) from exc


def _addresses(value: object, field: str, base: Path) -> str | tuple[str, ...]:
    """``ca-address: HOST:PORT`` or a list of them (the replicas to fail over between)."""
    if isinstance(value, list):
        if not value:
            raise ConfigError("expected at least one HOST:PORT", field=field)
        return tuple(
            check_host_port(item, f"{field}[{i}]", zero=False) for i, item in enumerate(value)
        )
    return check_host_port(value, field, zero=False)


def _paths(value: object, field: str, base: Path) -> tuple[Path, ...]:
    if isinstance(value, list):
        return tuple(as_path(item, f"{field}[{i}]", base) for i, item in enumerate(value))
    return (as_path(value, field, base),)


def _trust_domains(value: object, field: str, base: Path) -> tuple[TrustDomain, ...]:
    items = value if isinstance(value, list) else [value]
    return tuple(as_trust_domain(item, f"{field}[{i}]", base) for i, item in enumerate(items))


_KEYS: dict[str, tuple[str, Converter]] = {
    "ca-address": ("ca_address", _addresses),
    "ca-root": ("ca_root", as_path),
    "ca-server-name": ("ca_server_name", as_str),
    "token-file": ("token_file", as_path),
    "trust-domain": ("trust_domain", as_trust_domain),
    "namespace": ("namespace", as_str),
    "service-account": ("service_account", as_str),
    "key-type": ("key_type", _key_type),
    "cert-ttl": ("cert_ttl", as_duration),
    "rotation-ratio": ("rotation_ratio", as_float),
    "rotation-jitter": ("rotation_jitter", as_float),
    "sds-socket": ("sds_socket", as_path),
    "workload-socket": ("workload_socket", as_path),
    "output-dir": ("output_dir", as_path),
    "status-listen": ("status_listen", as_address),
    "sidecar": ("sidecar", as_path),
    "policy": ("policy_files", _paths),
    "root-namespace": ("root_namespace", as_str),
    "trust-domain-aliases": ("trust_domain_aliases", _trust_domains),
    "envoy-workdir": ("envoy_workdir", as_path),
    "join": ("join", as_path),
}


def load_agent_settings(path: Path) -> dict[str, object]:
    """Read an ``agent --config`` file into :class:`AgentConfig` field values; relative paths
    are relative to the file. Raises :class:`ConfigError` naming the file, line and key."""
    return load_settings(path, _KEYS)


def identity_from_token(token: str) -> tuple[str, str]:
    """(namespace, service account) from a service-account token's ``sub``, unverified.

    Only used to *expect* an identity; the CA verifies the token. Raises ConfigError.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise ConfigError("the token is not a JWT; pass --namespace and --service-account")
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(
            "the token's claims cannot be read; pass --namespace and --service-account"
        ) from None
    sub = claims.get("sub") if isinstance(claims, dict) else None
    prefix = "system:serviceaccount:"
    if not isinstance(sub, str) or not sub.startswith(prefix) or sub.count(":") != 3:
        raise ConfigError(
            "the token's subject is not a service account; pass --namespace and --service-account"
        )
    namespace, service_account = sub[len(prefix) :].split(":")
    return namespace, service_account


def resolve_identity(
    config: AgentConfig, token: str | None, trust_domain_hint: TrustDomain | None
) -> SpiffeId:
    """The SPIFFE ID this agent must obtain: flags first, then the token's claims.

    Flags and token must agree (the CA would refuse otherwise; better to say so at start).
    """
    td = config.trust_domain or trust_domain_hint
    if td is None:
        raise ConfigError("cannot tell the trust domain from the CA root; pass --trust-domain")
    ns, sa = config.namespace, config.service_account
    if token is not None and (ns is None or sa is None):
        tns, tsa = identity_from_token(token)
        ns, sa = ns or tns, sa or tsa
    elif token is not None:
        try:
            claimed: tuple[str | None, str | None] = identity_from_token(token)
        except ConfigError:
            claimed = (ns, sa)  # an opaque token: the CA will judge it
        if claimed != (ns, sa):
            raise ConfigError(
                f"the token is for namespace {claimed[0]!r} service account {claimed[1]!r}, "
                "but the flags "
                f"say {ns!r} / {sa!r}"
            )
    if ns is None or sa is None:
        raise ConfigError(
            "which workload is this? pass --namespace and --service-account "
            "(or --token-file with a service-account token)"
        )
    try:
        return SpiffeId.for_workload(td, ns, sa)
    except InvalidSpiffeId as exc:
        raise ConfigError(str(exc)) from exc

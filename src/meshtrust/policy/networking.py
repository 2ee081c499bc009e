"""Services of another mesh: Istio ``ServiceEntry`` and ``DestinationRule`` as plain values,
and the pure lookup an outbound upstream needs (where to connect, whom to expect).

:mod:`meshtrust.policy.istio` reads them with the security policies (same file/line/field
refusals). What is accepted is the subset that describes a mesh-internal service reached
with Istio mutual TLS (the seed's ``multi-cluster-mtls.yaml``): ``location: MESH_INTERNAL``,
``resolution: STATIC | DNS``, ``trafficPolicy.tls.mode: ISTIO_MUTUAL``. The identity the
sidecar accepts is the DestinationRule's ``subjectAltNames``, else the ServiceEntry's, else
the endpoints' ``serviceAccount`` in the ServiceEntry's namespace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from meshtrust.errors import InvalidInput, InvalidSpiffeId
from meshtrust.spiffe import SpiffeId, TrustDomain

__all__ = [
    "DESTINATION_RULE",
    "NETWORKING_API_VERSIONS",
    "SERVICE_ENTRY",
    "DestinationRule",
    "RemoteService",
    "ServiceEndpoint",
    "ServiceEntry",
    "ServicePort",
    "UnknownHost",
    "host_matches",
    "resolve_remote_service",
]

NETWORKING_API_VERSIONS = (
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
)
SERVICE_ENTRY = "ServiceEntry"
DESTINATION_RULE = "DestinationRule"


class UnknownHost(InvalidInput):
    """An upstream names a host no ServiceEntry describes (or a port it does not have)."""


@dataclass(frozen=True, slots=True)
class ServicePort:
    number: int
    name: str
    protocol: str
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class ServiceEndpoint:
    address: str
    ports: Mapping[str, int] = field(default_factory=dict)  # port name -> endpoint port
    labels: Mapping[str, str] = field(default_factory=dict)
    service_account: str | None = None


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    namespace: str
    name: str
    hosts: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    endpoints: tuple[ServiceEndpoint, ...]
    resolution: str  # STATIC or DNS
    subject_alt_names: tuple[str, ...] = ()
    file: Path | None = None
    line: int | None = None

    @property
    def obj(self) -> str:
        return f"{SERVICE_ENTRY} {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class DestinationRule:
    namespace: str
    name: str
    host: str
    tls_mode: str | None  # ISTIO_MUTUAL, or None without trafficPolicy.tls
    subject_alt_names: tuple[str, ...] = ()
    sni: str | None = None
    file: Path | None = None
    line: int | None = None

    @property
    def obj(self) -> str:
        return f"{DESTINATION_RULE} {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class RemoteService:
    """Where an upstream naming a ServiceEntry host connects, and whom it accepts there."""

    host: str
    port: int
    addresses: tuple[tuple[str, int], ...]  # (endpoint address, port), in the entry's order
    expected: tuple[SpiffeId, ...]
    sni: str | None
    entry: ServiceEntry


def host_matches(pattern: str, host: str) -> bool:
    """Istio's host matching: exact, or ``*.suffix`` for any name ending in ``.suffix``."""
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return pattern == host


def _specificity(pattern: str) -> tuple[int, int]:
    return (0 if pattern.startswith("*") else 1, len(pattern))


def resolve_remote_service(
    entries: Sequence[ServiceEntry],
    rules: Sequence[DestinationRule],
    host: str,
    port: int,
    trust_domain: TrustDomain,
) -> RemoteService:
    """The endpoints and expected identities of ``host:port``.

    The most specific matching host wins (exact before wildcard, longer before shorter), as
    in Istio. Raises :class:`UnknownHost` when no ServiceEntry has the host or the port,
    when a DestinationRule for it does not say ISTIO_MUTUAL, or when there is no identity to
    expect (no subjectAltNames and no endpoint serviceAccount).
    """
    matching = [
        (pattern, entry)
        for entry in entries
        for pattern in entry.hosts
        if host_matches(pattern, host)
    ]
    if not matching:
        raise UnknownHost(f"no ServiceEntry has host {host!r}")
    pattern, entry = max(matching, key=lambda item: _specificity(item[0]))
    chosen = next((p for p in entry.ports if p.number == port), None)
    if chosen is None:
        numbers = ", ".join(str(p.number) for p in entry.ports) or "none"
        raise UnknownHost(f"{entry.obj} has no port {port} for {host} (ports: {numbers})")
    rule_matches = [r for r in rules if host_matches(r.host, host)]
    rule = max(rule_matches, key=lambda r: _specificity(r.host)) if rule_matches else None
    if rule is not None and rule.tls_mode != "ISTIO_MUTUAL":
        raise UnknownHost(f"{rule.obj} does not set trafficPolicy.tls.mode: ISTIO_MUTUAL")
    addresses = []
    for endpoint in entry.endpoints:
        target = endpoint.ports.get(chosen.name) or chosen.target_port or chosen.number
        addresses.append((endpoint.address, target))
    if not addresses:
        addresses = [(host, chosen.target_port or chosen.number)]
    expected = _expected(entry, rule, trust_domain)
    if not expected:
        raise UnknownHost(
            f"{entry.obj}: no identity to expect for {host}: give subjectAltNames (here or "
            "in a DestinationRule) or an endpoint serviceAccount"
        )
    sni = rule.sni if rule is not None else None
    return RemoteService(host, port, tuple(addresses), expected, sni, entry)


def _expected(
    entry: ServiceEntry, rule: DestinationRule | None, trust_domain: TrustDomain
) -> tuple[SpiffeId, ...]:
    names = (rule.subject_alt_names if rule is not None else ()) or entry.subject_alt_names
    if names:
        return tuple(SpiffeId.parse(n) for n in names)
    out: list[SpiffeId] = []
    for endpoint in entry.endpoints:
        if endpoint.service_account:
            try:
                spiffe_id = SpiffeId.parse(
                    f"spiffe://{trust_domain.name}/ns/{entry.namespace}/sa/{endpoint.service_account}"
                )
            except InvalidSpiffeId:
                continue
            if spiffe_id not in out:
                out.append(spiffe_id)
    return tuple(out)

"""The Istio security objects meshtrust enforces, as plain immutable values.

:mod:`meshtrust.policy.istio` makes them from YAML and :mod:`meshtrust.policy.compile` turns
them into Envoy configuration; both import this module and neither imports the other's
internals, so the package has no import cycle (istio -> compile -> objects).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from meshtrust.policy.model import MtlsMode

__all__ = [
    "API_VERSIONS",
    "AUTHORIZATION_POLICY",
    "DEFAULT_NAMESPACE",
    "PEER_AUTHENTICATION",
    "Action",
    "AuthorizationPolicy",
    "Operation",
    "PeerAuthentication",
    "Rule",
    "Source",
]

API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
PEER_AUTHENTICATION = "PeerAuthentication"
AUTHORIZATION_POLICY = "AuthorizationPolicy"
DEFAULT_NAMESPACE = "default"  # what kubectl uses for an object without metadata.namespace


class Action(enum.StrEnum):
    """AuthorizationPolicy ``action`` values meshtrust enforces."""

    ALLOW = "ALLOW"
    DENY = "DENY"


@dataclass(frozen=True)
class PeerAuthentication:
    """One PeerAuthentication. ``mode`` None is UNSET (inherit from the parent level)."""

    namespace: str
    name: str
    selector: Mapping[str, str] | None = None  # matchLabels; None: namespace- or mesh-wide
    mode: MtlsMode | None = None
    port_level_mtls: Mapping[int, MtlsMode | None] = field(default_factory=dict)
    file: Path | None = None
    line: int | None = None

    @property
    def obj(self) -> str:
        return f"{PEER_AUTHENTICATION} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class Source:
    """``from[].source``: fields AND'd, values within a field OR'd (Istio's wildcards kept)."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()


@dataclass(frozen=True)
class Operation:
    """``to[].operation``: fields AND'd, values within a field OR'd."""

    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()

    @property
    def http_only_fields(self) -> tuple[str, ...]:
        """The Istio names of the HTTP-only fields this operation sets."""
        named = (
            ("paths", self.paths),
            ("notPaths", self.not_paths),
            ("methods", self.methods),
            ("notMethods", self.not_methods),
        )
        return tuple(name for name, values in named if values)


@dataclass(frozen=True)
class Rule:
    """One rule: any of ``sources`` AND any of ``operations``; empty means "any"."""

    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()


@dataclass(frozen=True)
class AuthorizationPolicy:
    """One AuthorizationPolicy. No rules: an ALLOW policy that matches nothing (deny all)."""

    namespace: str
    name: str
    selector: Mapping[str, str] = field(default_factory=dict)  # empty: all workloads in scope
    action: Action = Action.ALLOW
    rules: tuple[Rule, ...] = ()
    file: Path | None = None
    line: int | None = None

    @property
    def obj(self) -> str:
        return f"{AUTHORIZATION_POLICY} {self.namespace}/{self.name}"

"""``meshtrust status``: observe the running mesh once, then describe it as one document.

:func:`observe_mesh` does the I/O — is each process alive, each agent's ``/debug/status``,
each Envoy's stats, the CA's metrics — with short timeouts; a component that does not answer
is observed as missing, never a traceback. :func:`status_document` is pure: it turns that
observation into the document ``status --json`` prints (and the table and the live view
show), in the schema of ``docs/status-json.md``: integer counts and seconds, timestamps in
RFC 3339 UTC ending in ``Z``, serials as :func:`meshtrust.pki.format_serial` prints them.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshtrust.clock import SystemClock
from meshtrust.mesh.probes import (
    agent_status,
    alive,
    ca_up,
    envoy_info,
    envoy_stats,
    fetch,
    serial_text,
)
from meshtrust.mesh.rbac_stats import rbac_allowed, rbac_denials
from meshtrust.mesh.state import MeshState, ServiceState
from meshtrust.mesh.timestamps import format_timestamp, parse_timestamp

__all__ = [
    "SCHEMA_VERSION",
    "IdentityObservation",
    "MeshObservation",
    "ServiceObservation",
    "mesh_status",
    "observe_mesh",
    "status_document",
]

SCHEMA_VERSION = 1

_STATS = r"rbac|ssl\.handshake|ssl\.connection_error|no_filter_chain"


@dataclass(frozen=True)
class ServiceObservation:
    service: ServiceState
    agent_alive: bool
    app_alive: bool | None  # None: the service has no app
    agent: Mapping[str, Any] | None  # its /debug/status, None when it does not answer
    envoy_stats: Mapping[str, int] | None  # None when Envoy does not answer


@dataclass(frozen=True)
class IdentityObservation:
    """One identity of the mesh and its latest certificate in the CA's ledger."""

    spiffe_id: str
    host: str | None
    serial: str | None  # None: never issued
    not_after: dt.datetime | None


@dataclass(frozen=True)
class MeshObservation:
    state: MeshState
    ca_alive: bool
    ca_metrics: str | None  # the CA's /metrics text, None when it does not answer
    services: tuple[ServiceObservation, ...]
    identities: tuple[IdentityObservation, ...] = ()  # on the CA's host only
    ledger_error: str | None = None


def observe_ledger(
    state: MeshState,
) -> tuple[tuple[IdentityObservation, ...], str | None]:
    """Every identity of the mesh (``state.identities``) with its latest certificate, read
    from the CA's ledger; only on the CA's host (elsewhere: nothing)."""
    if state.ca is None or not state.identities:
        return (), None
    from pathlib import Path

    from meshtrust.ca.ledger import SqlLedger, default_ledger_url
    from meshtrust.errors import MeshTrustError

    try:
        ledger = SqlLedger(default_ledger_url(Path(state.ca.ca_dir)))
    except MeshTrustError as exc:
        return (), str(exc)
    try:
        out = []
        for spiffe_id, host in state.identities.items():
            records = ledger.certificates(spiffe_id=spiffe_id)
            latest = max(records, key=lambda r: r.not_after, default=None)
            out.append(
                IdentityObservation(
                    spiffe_id,
                    host,
                    None if latest is None else latest.serial,
                    None if latest is None else latest.not_after,
                )
            )
        return tuple(out), None
    except MeshTrustError as exc:
        return (), str(exc)
    finally:
        ledger.close()


def observe_mesh(state: MeshState) -> MeshObservation:
    """Everything ``status`` needs, read once from the live mesh."""
    services = []
    for svc in state.services:
        agent = agent_status(svc)
        admin = envoy_info(agent).get("admin")
        services.append(
            ServiceObservation(
                service=svc,
                agent_alive=alive(svc.agent_pid),
                app_alive=None if svc.app_pid is None else alive(svc.app_pid),
                agent=agent,
                envoy_stats=envoy_stats(admin if isinstance(admin, str) else None, _STATS),
            )
        )
    identities, ledger_error = observe_ledger(state)
    return MeshObservation(
        state=state,
        ca_alive=ca_up(state),
        ca_metrics=None if state.ca is None else fetch(f"http://{state.ca.metrics}/metrics"),
        services=tuple(services),
        identities=identities,
        ledger_error=ledger_error,
    )


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _seconds_until(t: dt.datetime | None, now: dt.datetime) -> int | None:
    return None if t is None else math.floor((t - now).total_seconds())


def _timestamp(t: dt.datetime | None) -> str | None:
    return None if t is None else format_timestamp(t)


def service_document(obs: ServiceObservation, now: dt.datetime) -> dict[str, Any]:
    """One entry of ``services`` (docs/status-json.md)."""
    svc, agent = obs.service, obs.agent or {}
    not_after = parse_timestamp(agent.get("not_after"))
    next_rotation = parse_timestamp(agent.get("next_rotation"))
    envoy = envoy_info(agent)
    stats = obs.envoy_stats or {}
    prefix = f"listener.inbound_{svc.inbound_port}."
    ready = agent.get("ready")
    return {
        "name": svc.name,
        "spiffe_id": svc.spiffe_id,
        "agent": "running" if obs.agent_alive else "down",
        "app": None if obs.app_alive is None else ("running" if obs.app_alive else "down"),
        "inbound_port": svc.inbound_port,
        "state": _str(agent.get("state")),
        "ready": ready if isinstance(ready, bool) else None,
        "serial": serial_text(agent.get("serial")),
        "not_before": _timestamp(parse_timestamp(agent.get("not_before"))),
        "not_after": _timestamp(not_after),
        "expires_in_seconds": _seconds_until(not_after, now),
        "next_rotation": _timestamp(next_rotation),
        "next_rotation_in_seconds": _seconds_until(next_rotation, now),
        "rotations": _int(agent.get("rotations")),
        "last_error": _str(agent.get("last_error")),
        "envoy": {
            "state": ("live" if envoy.get("live") else "not ready") if envoy else "unknown",
            "reason": None if envoy.get("live") else _str(envoy.get("not_live_reason")),
            "pid": _int(envoy.get("pid")),
            "restarts": _int(envoy.get("restarts")),
            "admin": _str(envoy.get("admin")),
            "mtls_mode": _str(envoy.get("mtls_mode")),
            "policy_version": _int(envoy.get("policy_version")),
            "policy_error": _str(envoy.get("policy_error")),
        },
        "connections": {
            "allowed": rbac_allowed(stats),
            "denied": sum(value for _, value in rbac_denials(stats)),
            "tls_handshakes": stats.get(prefix + "ssl.handshake", 0),
            "tls_errors": stats.get(prefix + "ssl.connection_error", 0),
            "plaintext_refused": stats.get(prefix + "no_filter_chain_match", 0),
        },
    }


def _metric(text: str, name: str) -> int | None:
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+([0-9.eE+-]+)$", line)
        if m:
            return int(float(m.group(2)))
    return None


def _refusals(text: str) -> int:
    total = 0
    for line in text.splitlines():
        if line.startswith("meshtrust_ca_refusals_total"):
            try:
                total += int(float(line.rsplit(" ", 1)[1]))
            except ValueError:
                continue
    return total


def identity_document(obs: IdentityObservation, now: dt.datetime) -> dict[str, Any]:
    """One entry of ``identities`` (docs/status-json.md): ``renewing`` is false once the
    latest certificate has expired (or none was ever issued)."""
    return {
        "spiffe_id": obs.spiffe_id,
        "host": obs.host,
        "serial": serial_text(obs.serial),
        "not_after": _timestamp(obs.not_after),
        "expires_in_seconds": _seconds_until(obs.not_after, now),
        "renewing": obs.not_after is not None and obs.not_after > now,
    }


def _mesh_state(obs: MeshObservation, services: list[dict[str, Any]]) -> str:
    # Another host's CA is not this host's process: its reachability is reported, not judged.
    ca = [obs.ca_alive] if obs.state.ca is not None else []
    processes = ca + [s.agent_alive for s in obs.services]
    processes += [s.app_alive for s in obs.services if s.app_alive is not None]
    if not any(processes):
        return "down"
    sidecars_live = all(s["envoy"]["state"] == "live" for s in services)
    return "running" if all(processes) and sidecars_live else "degraded"


def status_document(obs: MeshObservation, now: dt.datetime) -> dict[str, Any]:
    """The ``status --json`` document of ``obs`` at ``now`` (docs/status-json.md)."""
    state, metrics = obs.state, obs.ca_metrics
    services = [service_document(s, now) for s in obs.services]
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_at": format_timestamp(now),
        "mesh_file": state.mesh_file,
        "trust_domain": state.trust_domain,
        "cert_ttl_seconds": math.floor(state.cert_ttl_seconds),
        "state": _mesh_state(obs, services),
        "host": state.host,
        "ca": {
            "address": state.ca_address if state.ca is None else state.ca.address,
            "state": _ca_state(obs),
            "issued": None
            if metrics is None
            else _metric(metrics, "citadel_server_success_cert_issuance_count"),
            "refused": None if metrics is None else _refusals(metrics),
        },
        "services": services,
        "identities": [identity_document(i, now) for i in obs.identities],
    }


def _ca_state(obs: MeshObservation) -> str:
    if obs.state.ca is None:
        return "reachable" if obs.ca_alive else "unreachable"
    return "running" if obs.ca_alive else "down"


def mesh_status(state: MeshState, now: dt.datetime | None = None) -> dict[str, Any]:
    """Observe ``state``'s mesh and describe it (see :func:`status_document`)."""
    return status_document(observe_mesh(state), now or SystemClock().now())

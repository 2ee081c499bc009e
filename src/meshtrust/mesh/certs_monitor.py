"""``meshtrust certs monitor``: every workload's certificate expiry, OK / WARN / EXPIRED /
MISSING, from its agent or, when the agent does not answer, from the files it wrote.

:func:`observe_certificates` reads each agent's status and certificate file once;
:func:`judge_expiry` decides each row without I/O.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from cryptography import x509

from meshtrust.clock import SystemClock
from meshtrust.durations import format_duration
from meshtrust.mesh.probes import agent_status, ca_up, parse_serial, read_chain
from meshtrust.mesh.state import MeshState, ServiceState
from meshtrust.mesh.timestamps import format_timestamp, parse_timestamp
from meshtrust.pki import format_serial

__all__ = ["CertExpiry", "CertObservation", "judge_expiry", "monitor_certs", "observe_certificates"]


@dataclass
class CertExpiry:
    service: str
    spiffe_id: str
    serial: str | None  # format_serial
    not_after: str | None
    expires_in_seconds: int | None  # whole seconds, rounded down; negative when expired
    status: str  # OK | WARN | EXPIRED | MISSING
    source: str  # "agent" (its /debug/status) or "files" (cert-chain.pem)
    message: str
    last_error: str | None = None  # the agent's last renewal error, if any

    @property
    def fine(self) -> bool:
        return self.status == "OK"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CertObservation:
    service: ServiceState
    agent: Mapping[str, Any] | None  # its /debug/status; None when it does not answer
    chain: list[x509.Certificate] | None  # cert-chain.pem, None when missing or unreadable
    ca_alive: bool


def observe_certificates(state: MeshState) -> list[CertObservation]:
    ca_alive = ca_up(state)
    return [
        CertObservation(svc, agent_status(svc), read_chain(svc)[0], ca_alive)
        for svc in state.services
    ]


def _left(seconds: float) -> str:
    return format_duration(dt.timedelta(seconds=int(seconds)))


def judge_expiry(obs: CertObservation, warn_within: dt.timedelta, now: dt.datetime) -> CertExpiry:
    """One row: OK, WARN (expires within ``warn_within``), EXPIRED or MISSING. Pure."""
    svc, agent = obs.service, obs.agent
    serial: int | None = None
    not_after: dt.datetime | None = None
    source = "agent"
    if agent is not None:
        serial = parse_serial(agent.get("serial")) if agent.get("serial") else None
        not_after = parse_timestamp(agent.get("not_after"))
    if not_after is None:
        source = "files"
        if obs.chain:
            serial, not_after = obs.chain[0].serial_number, obs.chain[0].not_valid_after_utc
    last_error = str(agent["last_error"]) if agent and agent.get("last_error") else None
    if not_after is None:
        return CertExpiry(
            svc.name,
            svc.spiffe_id,
            None,
            None,
            None,
            "MISSING",
            source,
            "no certificate (agent down or never issued)",
        )
    left = (not_after - now).total_seconds()
    if left <= 0:
        status = "EXPIRED"
        message = f"expired {_left(-left)} ago"
        if not obs.ca_alive:
            message += "; the CA is not running"
        elif last_error:
            message += "; renewal failing"
    elif left < warn_within.total_seconds():
        status = "WARN"
        message = f"expires in {_left(left)}, within {format_duration(warn_within)}"
    else:
        status = "OK"
        message = f"expires in {_left(left)}"
    if source == "files":
        message += " (the agent does not answer: read from cert-chain.pem)"
    return CertExpiry(
        service=svc.name,
        spiffe_id=svc.spiffe_id,
        serial=format_serial(serial) if serial is not None else None,
        not_after=format_timestamp(not_after),
        expires_in_seconds=math.floor(left),
        status=status,
        source=source,
        message=message,
        last_error=last_error,
    )


def monitor_certs(
    state: MeshState, warn_within: dt.timedelta, now: dt.datetime | None = None
) -> list[CertExpiry]:
    """Every service's certificate expiry (see :func:`judge_expiry`)."""
    at = now or SystemClock().now()
    return [judge_expiry(obs, warn_within, at) for obs in observe_certificates(state)]

"""``meshtrust check``: the troubleshooting walk over one workload (or, with
:func:`check_mesh`, the CA and then every workload), observe then judge.

:func:`observe_workload` gathers, once, everything true of the workload that the walk looks
at: which processes are alive, the agent's ``/debug/status``, whether the app listens, the
certificate files, the mesh root, what Envoy serves (``/certs``) and its counters
(``/stats``). Each ``check_*`` in :data:`CHECKS` is then a pure function of that
:class:`Observation` and the time, returning one :class:`CheckStep`: a verdict, what was
seen, and — for WARN and FAIL — a hint on what to do. A step that cannot be judged because
an earlier one failed is SKIP, saying why.
"""

from __future__ import annotations

import datetime as dt
import enum
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from meshtrust.ca.signing import chain_expiry_warning, preparation_time
from meshtrust.clock import SystemClock
from meshtrust.durations import format_duration
from meshtrust.errors import MeshTrustError
from meshtrust.mesh.probes import (
    admin_json,
    agent_status,
    alive,
    ca_up,
    certs_entries,
    envoy_info,
    envoy_stats,
    fetch,
    parse_serial,
    port_open,
    read_chain,
    read_roots,
)
from meshtrust.mesh.proxy_config import uri_sans
from meshtrust.mesh.rbac_stats import rbac_denials
from meshtrust.mesh.state import MeshState, ServiceState
from meshtrust.mesh.timestamps import format_timestamp, parse_timestamp
from meshtrust.pki import TrustBundle, cas_without_key_usage, format_serial, verify_svid
from meshtrust.spiffe import TrustDomain

__all__ = [
    "CA_CHECKS",
    "CHECKS",
    "CaObservation",
    "ChainObservation",
    "MeshCheck",
    "WARN_FRACTION",
    "CheckStep",
    "Observation",
    "Verdict",
    "check_mesh",
    "check_workload",
    "judge",
    "judge_ca",
    "observe_ca",
    "observe_workload",
]

#: The time-left step warns when less than this share of the certificate TTL is left.
WARN_FRACTION = 0.2


class Verdict(enum.StrEnum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"  # could not be judged because an earlier step failed (the detail says which)


@dataclass
class CheckStep:
    id: str  # stable key: agent, app, envoy, certificate, chain, identity, envoy-cert, ...
    title: str
    verdict: Verdict
    detail: str
    hint: str | None = None  # what to do, for WARN and FAIL

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Observation:
    """What is true of one workload, read once by :func:`observe_workload`."""

    mesh: MeshState
    service: ServiceState
    ca_alive: bool
    agent_alive: bool
    agent: Mapping[str, Any] | None  # its /debug/status; None when it does not answer
    app_alive: bool | None  # None: the mesh file gives the service no app
    app_listening: bool
    chain: tuple[x509.Certificate, ...] | None  # cert-chain.pem, leaf first
    chain_error: str | None
    roots: tuple[x509.Certificate, ...] | None  # the mesh's root-cert.pem
    roots_where: str  # its path, or why it cannot be read
    envoy_answers: bool  # Envoy's admin API answered /certs
    envoy_leaf: Mapping[str, Any] | None  # Envoy's /certs entry of the `default` leaf
    envoy_roots: tuple[int, ...] = ()  # serials of Envoy's ROOTCA
    stats: Mapping[str, int] | None = None  # Envoy's counters; None when unreachable

    @property
    def envoy(self) -> dict[str, Any]:
        return envoy_info(self.agent)

    @property
    def admin(self) -> str | None:
        admin = self.envoy.get("admin")
        return admin if isinstance(admin, str) else None

    @property
    def agent_serial(self) -> int | None:
        return parse_serial(self.agent.get("serial")) if self.agent else None

    @property
    def file_serial(self) -> int | None:
        return self.chain[0].serial_number if self.chain else None

    @property
    def envoy_serial(self) -> int | None:
        return parse_serial(self.envoy_leaf.get("serial_number")) if self.envoy_leaf else None

    @property
    def envoy_log(self) -> Path:
        return Path(self.service.envoy_workdir) / f"envoy-{self.service.name}.log"


# --------------------------------------------------------------------------------------------
# Observing

_STATS_PATTERN = r"ssl\.|rbac|no_filter_chain_match|upstream_cx_connect_fail|lds\.update_rejected"


def _envoy_certs(admin: str | None) -> tuple[dict[str, Any] | None, tuple[int, ...], bool]:
    if not admin:
        return None, (), False
    certs_json = admin_json(admin, "/certs")
    if certs_json is None:
        return None, (), False
    leaves = certs_entries(certs_json, "cert_chain")
    roots = {parse_serial(e.get("serial_number")) for e in certs_entries(certs_json, "ca_cert")}
    return (leaves[0] if leaves else None), tuple(sorted(r for r in roots if r is not None)), True


def caught_mid_rotation(agent: int | None, files: int | None, envoy: int | None) -> bool:
    """Whether the agent, its files and Envoy name different serials, all present: a
    rotation seen halfway, which a second look a moment later resolves. When one is missing,
    or all agree, looking again will not change the verdict."""
    serials = (agent, files, envoy)
    return None not in serials and len(set(serials)) > 1


def observe_workload(
    state: MeshState, workload: str, attempts: int = 4, pause: float = 0.5
) -> Observation:
    """Read everything ``check`` judges about ``workload``. If a rotation is caught midway
    (agent, files and Envoy name different serials) read again, a few times.

    Raises ConfigError for an unknown workload.
    """
    svc = state.service(workload)
    for attempt in range(attempts):
        if attempt:
            time.sleep(pause)
        agent = agent_status(svc)
        chain, chain_error = read_chain(svc)
        leaf, envoy_roots, answers = _envoy_certs(envoy_info(agent).get("admin"))
        serials = (
            parse_serial(agent.get("serial")) if agent else None,
            chain[0].serial_number if chain else None,
            parse_serial(leaf.get("serial_number")) if leaf else None,
        )
        if not caught_mid_rotation(*serials):
            break
    admin = envoy_info(agent).get("admin")
    roots, roots_where = read_roots(state)
    return Observation(
        mesh=state,
        service=svc,
        ca_alive=ca_up(state),
        agent_alive=alive(svc.agent_pid),
        agent=agent,
        app_alive=None if svc.app_pid is None else alive(svc.app_pid),
        app_listening=svc.app_pid is not None and port_open(svc.app_port),
        chain=tuple(chain) if chain is not None else None,
        chain_error=chain_error,
        roots=tuple(roots) if roots is not None else None,
        roots_where=roots_where,
        envoy_answers=answers,
        envoy_leaf=leaf,
        envoy_roots=envoy_roots,
        stats=envoy_stats(admin, _STATS_PATTERN) if isinstance(admin, str) and answers else None,
    )


# --------------------------------------------------------------------------------------------
# Hints shared by several checks


def _restart_hint(state: MeshState) -> str:
    return f"restart the mesh: `meshtrust down` then `meshtrust up {state.mesh_file}`"


def _renewal_hint(obs: Observation) -> str:
    state = obs.mesh
    if state.ca is None:
        reach = "reachable" if obs.ca_alive else "not reachable from this host"
        parts = [
            f"the CA at {state.ca_address} is {reach}; the agent renews at its rotation "
            "point when it can reach it (`meshtrust status` on the CA's host)"
        ]
    elif not obs.ca_alive:
        parts = [
            f"the CA (pid {state.ca.pid}) is not running, so the agent cannot renew: "
            f"{_restart_hint(state)} (CA log: {state.ca.log})"
        ]
    else:
        parts = [
            f"the agent renews at half-life; is the CA at {state.ca.address} reachable? "
            f"(`meshtrust status`, CA log {state.ca.log})"
        ]
    if obs.agent and obs.agent.get("last_error"):
        parts.append(f"the agent's last error: {obs.agent['last_error']}")
    return "; ".join(parts)


def _duration(seconds: float) -> str:
    return format_duration(dt.timedelta(seconds=int(seconds)))


# --------------------------------------------------------------------------------------------
# The checks, in the order of the walk


def check_agent(obs: Observation, now: dt.datetime) -> CheckStep:
    svc = obs.service
    step = "agent", "agent running"
    if not obs.agent_alive:
        return CheckStep(
            *step,
            Verdict.FAIL,
            f"the agent (pid {svc.agent_pid}) is not running",
            f"its log {svc.agent_log} says why it stopped; {_restart_hint(obs.mesh)}",
        )
    if obs.agent is None:
        return CheckStep(
            *step,
            Verdict.FAIL,
            f"pid {svc.agent_pid} is alive but http://{svc.status}/debug/status does not answer",
            f"the agent may be hung; see {svc.agent_log}; {_restart_hint(obs.mesh)}",
        )
    return CheckStep(
        *step,
        Verdict.PASS,
        f"pid {svc.agent_pid}, certificate state {obs.agent.get('state')}, "
        f"ready {obs.agent.get('ready')}",
    )


def check_app(obs: Observation, now: dt.datetime) -> CheckStep:
    svc = obs.service
    step = "app", "app running"
    if obs.app_alive is None:
        return CheckStep(*step, Verdict.SKIP, "no app: the mesh file gives this service no command")
    if not obs.app_alive:
        return CheckStep(
            *step,
            Verdict.FAIL,
            f"the app (pid {svc.app_pid}) is not running",
            f"its log {svc.app_log} says why it stopped; {_restart_hint(obs.mesh)}",
        )
    if not obs.app_listening:
        return CheckStep(
            *step,
            Verdict.WARN,
            f"pid {svc.app_pid} is alive but nothing listens on 127.0.0.1:{svc.app_port}",
            f"the sidecar forwards callers to that port: is the app still starting, or "
            f"listening elsewhere? (log {svc.app_log})",
        )
    return CheckStep(*step, Verdict.PASS, f"pid {svc.app_pid}, listening on :{svc.app_port}")


def check_envoy(obs: Observation, now: dt.datetime) -> CheckStep:
    envoy, step = obs.envoy, ("envoy", "Envoy live")
    if obs.agent is None:
        return CheckStep(*step, Verdict.SKIP, "the agent, which runs Envoy, does not answer")
    if not envoy:
        return CheckStep(
            *step,
            Verdict.FAIL,
            "the agent runs no Envoy sidecar",
            "the agent was started without --sidecar; restart the mesh",
        )
    if not envoy.get("live") or not obs.envoy_answers:
        return CheckStep(
            *step,
            Verdict.FAIL,
            f"Envoy (pid {envoy.get('pid')}) is not live"
            + (f": {envoy['not_live_reason']}" if envoy.get("not_live_reason") else "")
            + ("" if obs.envoy_answers else f"; its admin API {obs.admin} does not answer"),
            f"the agent restarts it (restarts so far: {envoy.get('restarts')}); "
            f"see {obs.envoy_log} and {obs.service.agent_log}",
        )
    if envoy.get("restarts"):
        return CheckStep(
            *step,
            Verdict.WARN,
            f"pid {envoy.get('pid')}, admin {obs.admin}, but restarted {envoy['restarts']}×",
            f"Envoy exited and the agent started it again; {obs.envoy_log} says why",
        )
    return CheckStep(*step, Verdict.PASS, f"pid {envoy.get('pid')}, admin {obs.admin}")


def check_certificate(obs: Observation, now: dt.datetime) -> CheckStep:
    step = "certificate", "certificate present"
    if obs.chain is None:
        return CheckStep(
            *step,
            Verdict.FAIL,
            obs.chain_error or "no certificate",
            f"the agent has no certificate yet: {_renewal_hint(obs)} "
            f"(agent log {obs.service.agent_log})",
        )
    return CheckStep(
        *step,
        Verdict.PASS,
        f"{Path(obs.service.cert_dir) / 'cert-chain.pem'}, "
        f"serial {format_serial(obs.chain[0].serial_number)}",
    )


def check_chain(obs: Observation, now: dt.datetime) -> CheckStep:
    step = "chain", "chain valid to the mesh root"
    chain = obs.chain
    if not chain:
        return CheckStep(*step, Verdict.SKIP, "no certificate to verify")
    if obs.roots is None:
        return CheckStep(
            *step,
            Verdict.FAIL,
            obs.roots_where,
            f"the mesh's trust bundle {obs.mesh.root_cert} is damaged or gone",
        )
    leaf = chain[0]
    # Expiry is the time-left step's verdict; here: is the chain signed by the mesh root?
    at = min(max(now, leaf.not_valid_before_utc), leaf.not_valid_after_utc)
    try:
        bundle = TrustBundle(TrustDomain.parse(obs.mesh.trust_domain), obs.roots)
        verified = verify_svid(list(chain), bundle, at).chain
    except MeshTrustError as exc:
        return CheckStep(
            *step,
            Verdict.FAIL,
            str(exc),
            f"this certificate was not issued under the mesh root {obs.roots_where}: was the "
            f"CA directory re-created while the agent kept an old certificate? "
            f"{_restart_hint(obs.mesh)}",
        )
    anchor = verified[-1]
    detail = (
        f"{len(chain)} certificate(s) to the root {anchor.subject.rfc4514_string()} "
        f"(serial {format_serial(anchor.serial_number)})"
    )
    without = cas_without_key_usage(verified[1:])
    if without:
        names = ", ".join(c.subject.rfc4514_string() for c in without)
        return CheckStep(
            *step,
            Verdict.WARN,
            f"{detail}; no KeyUsage extension in {names}",
            "accepted, as Istio, Envoy and OpenSSL accept it (`openssl req -x509` makes CAs "
            "without one), but a CA certificate should say keyCertSign, cRLSign: make the "
            'next one with -addext "keyUsage=critical,keyCertSign,cRLSign" '
            "(or `meshtrust ca init`)",
        )
    return CheckStep(*step, Verdict.PASS, detail)


def check_identity(obs: Observation, now: dt.datetime) -> CheckStep:
    step, expected = ("identity", "identity as expected"), obs.service.spiffe_id
    if not obs.chain:
        return CheckStep(*step, Verdict.SKIP, "no certificate to read")
    sans = uri_sans(obs.chain[0])
    if sans == [expected]:
        return CheckStep(*step, Verdict.PASS, expected)
    return CheckStep(
        *step,
        Verdict.FAIL,
        f"the certificate names {', '.join(sans) or 'no SPIFFE ID'}, the mesh expects {expected}",
        "the agent's token or --namespace/--service-account do not match the mesh "
        f"file; {_restart_hint(obs.mesh)}",
    )


def check_envoy_cert(obs: Observation, now: dt.datetime) -> CheckStep:
    step, name = ("envoy-cert", "Envoy serves the certificate"), obs.service.name
    if not obs.envoy_answers or obs.agent is None:
        return CheckStep(*step, Verdict.SKIP, "Envoy's admin API is not reachable")
    envoy_serial, agent_serial, file_serial = obs.envoy_serial, obs.agent_serial, obs.file_serial
    if envoy_serial is None:
        return CheckStep(
            *step,
            Verdict.FAIL,
            "Envoy holds no workload certificate (SDS `default` never arrived)",
            f"see `meshtrust proxy-config secret {name}` and the agent log {obs.service.agent_log}",
        )
    problems, hints = [], []
    if agent_serial is not None and envoy_serial != agent_serial:
        problems.append(
            f"Envoy serves serial {format_serial(envoy_serial)}, the agent's current "
            f"certificate is {format_serial(agent_serial)}"
        )
        hints.append(
            "the SDS push did not reach Envoy or Envoy refused it "
            f"(`meshtrust proxy-config secret {name}`, {obs.envoy_log})"
        )
    if file_serial is not None and agent_serial is not None and file_serial != agent_serial:
        problems.append(
            f"cert-chain.pem holds serial {format_serial(file_serial)}, not the agent's current one"
        )
        hints.append("the agent did not refresh its output files (istio#53118)")
    root_serials = {r.serial_number for r in obs.roots or ()}
    if root_serials and not root_serials & set(obs.envoy_roots):
        problems.append("Envoy's ROOTCA does not contain the mesh root")
        hints.append("peers' certificates will be refused; " + _restart_hint(obs.mesh))
    if problems:
        return CheckStep(*step, Verdict.WARN, "; ".join(problems), "; ".join(hints))
    return CheckStep(
        *step,
        Verdict.PASS,
        f"serial {format_serial(envoy_serial)} (same as the agent's and the files'), "
        "ROOTCA has the mesh root",
    )


def check_time_left(obs: Observation, now: dt.datetime) -> CheckStep:
    """On the certificate Envoy serves (else the agent's, else the file's)."""
    step = "time-left", "time left"
    not_after = parse_timestamp(obs.envoy_leaf.get("expiration_time")) if obs.envoy_leaf else None
    if not_after is None and obs.agent is not None:
        not_after = parse_timestamp(obs.agent.get("not_after"))
    if not_after is None and obs.chain:
        not_after = obs.chain[0].not_valid_after_utc
    if not_after is None:
        return CheckStep(*step, Verdict.SKIP, "no certificate")
    left, ttl = (not_after - now).total_seconds(), obs.mesh.cert_ttl_seconds
    if left <= 0:
        return CheckStep(
            *step,
            Verdict.FAIL,
            f"EXPIRED {_duration(-left)} ago (NotAfter {format_timestamp(not_after)}): peers "
            "refuse this workload's mTLS handshakes",
            _renewal_hint(obs),
        )
    if left < WARN_FRACTION * ttl:
        return CheckStep(
            *step,
            Verdict.WARN,
            f"{_duration(left)} left of a {_duration(ttl)} certificate "
            f"(NotAfter {format_timestamp(not_after)})",
            "it should have been renewed at half-life: " + _renewal_hint(obs),
        )
    return CheckStep(
        *step, Verdict.PASS, f"{_duration(left)} (NotAfter {format_timestamp(not_after)})"
    )


def check_policy(obs: Observation, now: dt.datetime) -> CheckStep:
    step, envoy = ("policy", "policy mode"), obs.envoy
    files = ", ".join(obs.mesh.policy_files) or "the policy files"
    if obs.agent is None or not envoy:
        return CheckStep(*step, Verdict.SKIP, "the agent does not answer")
    if envoy.get("policy_error"):
        return CheckStep(
            *step,
            Verdict.FAIL,
            f"the policy files were refused: {envoy['policy_error']}",
            f"fix {files}; until then the sidecar keeps the last good policy "
            f"({envoy.get('mtls_mode')}, version {envoy.get('policy_version')})",
        )
    mode = envoy.get("mtls_mode")
    rejected = (obs.stats or {}).get("listener_manager.lds.update_rejected", 0)
    detail = f"{mode}, policy version {envoy.get('policy_version')}"
    if rejected:
        return CheckStep(
            *step,
            Verdict.WARN,
            f"{detail}; Envoy rejected {rejected} listener update(s)",
            f"Envoy runs the previous listener; {obs.envoy_log} says why",
        )
    if mode == "DISABLE":
        return CheckStep(
            *step,
            Verdict.WARN,
            f"{detail}: plain text only, no mTLS",
            "a PeerAuthentication with mode DISABLE applies to this workload; "
            "use STRICT (or PERMISSIVE while migrating)",
        )
    if mode is None:
        return CheckStep(
            *step, Verdict.WARN, "no policy compiled yet", f"see {obs.service.agent_log}"
        )
    if mode == "PERMISSIVE":
        return CheckStep(
            *step, Verdict.PASS, f"{detail} (mTLS or plain text; STRICT would refuse plain text)"
        )
    return CheckStep(*step, Verdict.PASS, detail)


# Envoy counters that mean trouble on the way in or out, and what they usually mean.
_TLS_INBOUND = {
    "ssl.connection_error": "TLS handshakes that failed (a caller with an expired or "
    "foreign certificate, or a protocol mismatch)",
    "ssl.fail_verify_no_cert": "callers that spoke TLS without a client certificate "
    "(not a mesh sidecar)",
    "ssl.fail_verify_error": "caller certificates that do not verify against the mesh root "
    "(another CA, or expired)",
    "ssl.fail_verify_san": "caller certificates with an unexpected identity",
    "ssl.fail_verify_cert_hash": "caller certificates with an unexpected hash",
    "no_filter_chain_match": "plain-text connections refused (STRICT mTLS)",
}
_TLS_OUTBOUND = {
    "ssl.connection_error": "TLS handshakes to the upstream that failed",
    "ssl.fail_verify_error": "upstream certificates that do not verify against the mesh root",
    "ssl.fail_verify_san": "the upstream presented another identity than the mesh file says",
    "ssl.fail_verify_no_cert": "the upstream presented no certificate",
    "upstream_cx_connect_fail": "connections to the upstream's sidecar that failed (is it up?)",
}


def _tls_errors(stats: Mapping[str, int], svc: ServiceState) -> list[tuple[str, int, str]]:
    found: list[tuple[str, int, str]] = []
    inbound = f"listener.inbound_{svc.inbound_port}."
    for suffix, meaning in _TLS_INBOUND.items():
        value = stats.get(inbound + suffix, 0)
        if value:
            found.append((inbound + suffix, value, meaning))
    for name, value in sorted(stats.items()):
        if not value or not name.startswith("cluster.outbound|"):
            continue
        for suffix, meaning in _TLS_OUTBOUND.items():
            if name.endswith("." + suffix):
                found.append((name, value, meaning))
    return found


def _counts(items: Iterable[tuple[str, int]]) -> str:
    return ", ".join(f"{name}={value}" for name, value in items)


def _since(obs: Observation) -> str:
    return f"since Envoy (pid {obs.envoy.get('pid')}) started"


def check_tls_errors(obs: Observation, now: dt.datetime) -> CheckStep:
    step = "tls-errors", "TLS handshake errors"
    if obs.stats is None:
        return CheckStep(*step, Verdict.SKIP, "Envoy's stats are unreachable")
    errors = _tls_errors(obs.stats, obs.service)
    if errors:
        return CheckStep(
            *step,
            Verdict.WARN,
            f"{_counts((n, v) for n, v, _ in errors)} ({_since(obs)})",
            "; ".join(f"{n.rsplit('.', 1)[-1]}: {m}" for n, _, m in errors),
        )
    return CheckStep(*step, Verdict.PASS, f"none {_since(obs)}")


def check_rbac(obs: Observation, now: dt.datetime) -> CheckStep:
    step = "rbac", "RBAC denials"
    if obs.stats is None:
        return CheckStep(*step, Verdict.SKIP, "Envoy's stats are unreachable")
    denials = rbac_denials(obs.stats)
    if denials:
        files = ", ".join(obs.mesh.policy_files) or "the policy files"
        return CheckStep(
            *step,
            Verdict.WARN,
            f"{sum(v for _, v in denials)} denied: {_counts(denials)} ({_since(obs)})",
            "an AuthorizationPolicy refused these calls (a DENY rule matched, or no ALLOW "
            f"rule did); if they should pass, see {files}",
        )
    return CheckStep(*step, Verdict.PASS, f"none {_since(obs)}")


Check = Callable[[Observation, dt.datetime], CheckStep]

#: The walk, in order.
CHECKS: tuple[Check, ...] = (
    check_agent,
    check_app,
    check_envoy,
    check_certificate,
    check_chain,
    check_identity,
    check_envoy_cert,
    check_time_left,
    check_policy,
    check_tls_errors,
    check_rbac,
)


def judge(obs: Observation, now: dt.datetime) -> list[CheckStep]:
    """Every check over one observation. Pure."""
    return [check(obs, now) for check in CHECKS]


def check_workload(
    state: MeshState, workload: str, now: dt.datetime | None = None
) -> list[CheckStep]:
    """The troubleshooting walk for ``workload``: one :class:`CheckStep` per step.

    Raises ConfigError for an unknown workload; everything else is a verdict.
    """
    obs = observe_workload(state, workload)
    return judge(obs, now or SystemClock().now())


# --------------------------------------------------------------------------------------------
# The whole mesh: the CA, then every workload (as `linkerd check` walks the control plane,
# then the data plane)

#: The root step warns when the mesh root expires within this time.
ROOT_WARN_WITHIN = dt.timedelta(days=30)


@dataclass(frozen=True)
class ChainObservation:
    """The CA's active signing chain, as the ledger's signing slots say: what the CA's
    chain-expiry warning (log line, gauge ``meshtrust_ca_chain_expiry_warning``, ``ca slots
    --check``) is computed from."""

    generation: int
    issued_at: dt.datetime  # when the intermediate was made (slot lifetimes start here)
    not_after: dt.datetime  # the earliest NotAfter of the chain
    rotates: bool  # the CA directory holds root-key.pem: the CA rotates the intermediate


@dataclass(frozen=True)
class CaObservation:
    """What is true of the mesh's CA, read once by :func:`observe_ca`."""

    mesh: MeshState
    alive: bool  # its process (on the CA's host) or its address (elsewhere)
    ready: bool | None  # its /ready said 200; None where it cannot be asked (another host)
    roots: tuple[x509.Certificate, ...] | None
    roots_where: str
    chain: ChainObservation | None = None  # None: see chain_error, else chain_missing
    chain_missing: str = "not observed"  # why there is no chain to judge
    chain_error: str | None = None  # the ledger could not be read: the error


def observe_ca(state: MeshState) -> CaObservation:
    roots, where = read_roots(state)
    ready = None
    if state.ca is not None:
        ready = fetch(f"http://{state.ca.metrics}/ready") is not None
    chain, missing, error = observe_signing_chain(state)
    return CaObservation(
        mesh=state,
        alive=ca_up(state),
        ready=ready,
        roots=tuple(roots) if roots is not None else None,
        roots_where=where,
        chain=chain,
        chain_missing=missing,
        chain_error=error,
    )


def observe_signing_chain(state: MeshState) -> tuple[ChainObservation | None, str, str | None]:
    """The active signing slot, read from the CA's ledger as ``ca slots`` reads it, and
    whether the CA holds the root key: (chain, why none, ledger error). Only on the CA's
    host; the ledger is not created when it is not there."""
    if state.ca is None:
        return None, "the CA runs on another host: `meshtrust check` there judges its chain", None
    from meshtrust.ca.ledger import SqlLedger, default_ledger_url
    from meshtrust.ca.signing import SlotLedger

    ca_dir = Path(state.ca.ca_dir)
    if not (ca_dir / "ledger.db").exists():
        return None, f"no ledger at {ca_dir / 'ledger.db'}: the CA has not started yet", None
    try:
        sql = SqlLedger(default_ledger_url(ca_dir))
    except MeshTrustError as exc:
        return None, "", str(exc)
    try:
        active = SlotLedger(sql.engine).slots().active
    except MeshTrustError as exc:
        return None, "", str(exc)
    finally:
        sql.close()
    if active is None:
        return None, "the ledger records no active signing CA yet", None
    rotates = (ca_dir / "root-key.pem").exists()
    return (
        ChainObservation(active.generation, active.issued_at, active.chain_not_after, rotates),
        "",
        None,
    )


def check_ca_running(obs: CaObservation, now: dt.datetime) -> CheckStep:
    state, step = obs.mesh, ("ca", "CA running")
    if state.ca is None:
        if obs.alive:
            return CheckStep(*step, Verdict.PASS, f"{state.ca_address} accepts connections")
        return CheckStep(
            *step,
            Verdict.FAIL,
            f"the CA at {state.ca_address} is not reachable from this host",
            "run `meshtrust status` on the CA's host; agents cannot renew meanwhile",
        )
    if not obs.alive:
        return CheckStep(
            *step,
            Verdict.FAIL,
            f"the CA (pid {state.ca.pid}) is not running",
            f"agents cannot renew; its log {state.ca.log} says why it stopped; "
            f"{_restart_hint(state)}",
        )
    if obs.ready is False:
        return CheckStep(
            *step,
            Verdict.FAIL,
            f"pid {state.ca.pid} is alive but http://{state.ca.metrics}/ready does not say ready",
            f"see its log {state.ca.log}",
        )
    return CheckStep(*step, Verdict.PASS, f"pid {state.ca.pid}, {state.ca.address}, ready")


def check_ca_root(obs: CaObservation, now: dt.datetime) -> CheckStep:
    step = "root", "mesh root valid"
    if obs.roots is None:
        return CheckStep(
            *step,
            Verdict.FAIL,
            obs.roots_where,
            f"the mesh's trust bundle {obs.mesh.root_cert} is damaged or gone; "
            f"{_restart_hint(obs.mesh)}",
        )
    valid = [r for r in obs.roots if r.not_valid_before_utc <= now < r.not_valid_after_utc]
    if not valid:
        return CheckStep(
            *step,
            Verdict.FAIL,
            f"every root in {obs.roots_where} has expired or is not valid yet",
            "no certificate of this mesh verifies; make a new CA (`meshtrust ca init`) or "
            "rotate the root",
        )
    last = max(valid, key=lambda r: r.not_valid_after_utc)
    left = last.not_valid_after_utc - now
    detail = (
        f"{len(obs.roots)} root(s); the last to expire: {_duration(left.total_seconds())} left "
        f"(NotAfter {format_timestamp(last.not_valid_after_utc)})"
    )
    if left < ROOT_WARN_WITHIN:
        return CheckStep(
            *step,
            Verdict.WARN,
            detail,
            "rotate the root before it expires: every certificate of the mesh chains to it "
            "(istio#14516)",
        )
    return CheckStep(*step, Verdict.PASS, detail)


def check_ca_chain(obs: CaObservation, now: dt.datetime) -> CheckStep:
    """The signing CA chain's expiry: a CA without the root key cannot rotate its
    intermediate and warns as it nears expiry, by the same :func:`chain_expiry_warning` as
    its log line, its gauge and ``ca slots --check``; a CA with it rotates the intermediate
    itself (:mod:`meshtrust.ca.signing`) and passes unless the chain has expired."""
    step = "signing-chain", "signing CA chain"
    slots_hint = f"`meshtrust ca slots --ca-dir {obs.mesh.ca.ca_dir}`" if obs.mesh.ca else ""
    if obs.chain_error is not None:
        return CheckStep(
            *step,
            Verdict.WARN,
            f"cannot read the signing slots: {obs.chain_error}",
            f"is the ledger intact? {slots_hint} reads the same slots",
        )
    chain = obs.chain
    if chain is None:
        return CheckStep(*step, Verdict.SKIP, obs.chain_missing)
    left = chain.not_after - now
    expires = f"generation {chain.generation}, NotAfter {format_timestamp(chain.not_after)}"
    warning = None if chain.rotates else chain_expiry_warning(chain.issued_at, chain.not_after, now)
    if left <= dt.timedelta(0):
        return CheckStep(
            *step,
            Verdict.FAIL,
            f"the signing CA chain ({expires}) EXPIRED {_duration(-left.total_seconds())} ago: "
            "certificates the CA issues do not verify",
            warning.advice
            if warning is not None
            else f"the CA rotates it itself: is it running? {slots_hint} shows the slots",
        )
    if warning is not None:
        return CheckStep(*step, Verdict.WARN, warning.summary, warning.advice)
    due = format_timestamp(preparation_time(chain.issued_at, chain.not_after))
    how = (
        f"the CA rotates it (root-key.pem in the CA directory), a successor from {due}"
        if chain.rotates
        else f"a plugged-in CA (no root key): this step warns from {due}"
    )
    return CheckStep(
        *step, Verdict.PASS, f"{_duration(left.total_seconds())} left ({expires}); {how}"
    )


CaCheck = Callable[[CaObservation, dt.datetime], CheckStep]

#: The CA's part of the mesh-wide walk, in order.
CA_CHECKS: tuple[CaCheck, ...] = (check_ca_running, check_ca_root, check_ca_chain)


@dataclass(frozen=True)
class MeshCheck:
    """The mesh-wide walk: the CA's steps, then each workload's (this host's services)."""

    ca: list[CheckStep]
    workloads: dict[str, list[CheckStep]]

    @property
    def failed(self) -> bool:
        steps = [*self.ca, *(s for w in self.workloads.values() for s in w)]
        return any(s.verdict == Verdict.FAIL for s in steps)

    def to_json(self) -> dict[str, Any]:
        def ok(steps: list[CheckStep]) -> bool:
            return not any(s.verdict == Verdict.FAIL for s in steps)

        return {
            "ok": not self.failed,
            "ca": {"ok": ok(self.ca), "steps": [s.to_json() for s in self.ca]},
            "workloads": [
                {"workload": name, "ok": ok(steps), "steps": [s.to_json() for s in steps]}
                for name, steps in self.workloads.items()
            ],
        }


def judge_ca(obs: CaObservation, now: dt.datetime) -> list[CheckStep]:
    """The CA's checks over one observation. Pure."""
    return [check(obs, now) for check in CA_CHECKS]


def check_mesh(state: MeshState, now: dt.datetime | None = None) -> MeshCheck:
    """The whole walk: the CA, then every workload of ``state`` (one host's share)."""
    at = now or SystemClock().now()
    ca = judge_ca(observe_ca(state), at)
    workloads = {svc.name: judge(observe_workload(state, svc.name), at) for svc in state.services}
    return MeshCheck(ca=ca, workloads=workloads)

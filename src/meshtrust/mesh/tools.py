"""The operator's tools over a running local mesh: ``proxy-config secret``, ``check`` and
``certs monitor`` (DESIGN.md "Operator's tools").

Everything here reads what is live — the agent's ``/debug/status``, Envoy's admin API
(``/certs``, ``/config_dump``, ``/stats``), the certificate files the agent writes — and never
changes anything. Every probe has a short timeout; a component that does not answer becomes
a clear verdict or a :class:`WorkloadUnavailable`, never a traceback.

Validity is always computed here from the certificate's own NotBefore/NotAfter against the
current time: Envoy's ``days_until_expiration`` is a whole number of days that reads ``"0"``
both for a certificate with seconds left and for one that expired (istio#44929 is
``istioctl proxy-config secret`` trusting such figures).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import enum
import json
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from meshtrust.clock import SystemClock
from meshtrust.durations import format_duration
from meshtrust.errors import ConfigError, EnvironmentFault, MeshTrustError
from meshtrust.mesh.probes import agent_status, alive, envoy_stats, fetch
from meshtrust.mesh.state import MeshState, ServiceState, find_state, read_state
from meshtrust.pki import TrustBundle, format_serial, load_certs_pem, verify_svid
from meshtrust.spiffe import TrustDomain

__all__ = [
    "CertExpiry",
    "CheckStep",
    "SecretRow",
    "Verdict",
    "WorkloadUnavailable",
    "check_workload",
    "envoy_serial",
    "load_running_state",
    "monitor_certs",
    "proxy_secrets",
]

#: ``check``'s time-left step warns when less than this share of the certificate TTL is left.
WARN_FRACTION = 0.2

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class WorkloadUnavailable(EnvironmentFault):
    """The workload's agent or Envoy is not there to be asked."""


class Verdict(enum.StrEnum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"  # could not be judged because an earlier step failed (the detail says which)


# --------------------------------------------------------------------------------------------
# Reading the live mesh


def load_running_state(mesh_file: Path | None) -> MeshState:
    """The state of ``mesh_file``'s mesh (or of the mesh started last on this machine).

    Raises ConfigError when no mesh was started, or none of its processes is alive.
    """
    state = read_state(find_state(mesh_file))
    if not any(alive(pid) for pid in state.pids()):
        raise ConfigError(
            f"the mesh {state.mesh_file} is not running (none of its processes is alive); "
            f"start it with `meshtrust up {state.mesh_file}`"
        )
    return state


def _envoy_info(status: Mapping[str, Any] | None) -> dict[str, Any]:
    envoy = status.get("envoy") if status else None
    return envoy if isinstance(envoy, dict) else {}


def _fetch_json(url: str, timeout: float = 2.0) -> Any:
    raw = fetch(url, timeout=timeout)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def envoy_serial(serial: int) -> str:
    """A serial number as Envoy's admin API shows it (see :func:`meshtrust.pki.format_serial`)."""
    return format_serial(serial)


def _serial_int(text: object) -> int | None:
    try:
        return int(str(text), 16)
    except ValueError:
        return None


def _fmt(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime(TIME_FORMAT)


def _parse_time(text: object) -> dt.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def _require_admin(svc: ServiceState) -> tuple[dict[str, Any], str]:
    """The agent's status and its Envoy's admin URL, or a WorkloadUnavailable saying why not."""
    status = agent_status(svc)
    if status is None:
        if not alive(svc.agent_pid):
            raise WorkloadUnavailable(
                f"the agent of {svc.name} (pid {svc.agent_pid}) is not running, so neither is "
                f"its Envoy; see its log {svc.agent_log}, then restart the mesh "
                "(`meshtrust down`, `meshtrust up MESH_FILE`)"
            )
        raise WorkloadUnavailable(
            f"the agent of {svc.name} (pid {svc.agent_pid}) does not answer on "
            f"http://{svc.status}/debug/status; see its log {svc.agent_log}"
        )
    envoy = _envoy_info(status)
    admin = envoy.get("admin")
    if not envoy:
        raise WorkloadUnavailable(f"the agent of {svc.name} runs no Envoy sidecar")
    if not isinstance(admin, str) or not envoy.get("live"):
        raise WorkloadUnavailable(
            f"the Envoy of {svc.name} is not live (the agent restarts it; restarts so far: "
            f"{envoy.get('restarts')}); see {svc.agent_log} and the Envoy log in "
            f"{svc.envoy_workdir}"
        )
    return status, admin


# --------------------------------------------------------------------------------------------
# proxy-config secret


@dataclass
class SecretRow:
    """One row of ``proxy-config secret``: istioctl's columns, plus a few more in JSON."""

    resource_name: str
    type: str  # "Cert Chain" | "CA" | the Secret's field name for anything else
    status: str  # "ACTIVE" | "WARMING"
    valid_cert: bool  # NotBefore <= now < NotAfter, computed here
    serial_number: str  # as Envoy shows it ("" when there is no certificate)
    not_after: str  # 2006-01-02T15:04:05Z ("" when there is no certificate)
    not_before: str
    version_info: str | None = None
    last_updated: str | None = None
    subject_alt_names: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _secret_pem(source: object) -> bytes | None:
    """The bytes of an Envoy DataSource (inline_bytes, inline_string or filename)."""
    if not isinstance(source, dict):
        return None
    if isinstance(source.get("inline_bytes"), str):
        try:
            return base64.b64decode(source["inline_bytes"], validate=True)
        except (binascii.Error, ValueError):
            return None
    if isinstance(source.get("inline_string"), str):
        return str(source["inline_string"]).encode()
    if isinstance(source.get("filename"), str):
        try:
            return Path(source["filename"]).read_bytes()
        except OSError:
            return None
    return None


def _certs_entries(certs_json: Any, key: str) -> list[dict[str, Any]]:
    """Every certificate listed under ``key`` (cert_chain / ca_cert) in Envoy's ``/certs``."""
    out: list[dict[str, Any]] = []
    if not isinstance(certs_json, dict):
        return out
    for context in certs_json.get("certificates") or []:
        if isinstance(context, dict):
            out += [c for c in context.get(key) or [] if isinstance(c, dict)]
    return out


def _rows_for_secret(
    config: Mapping[str, Any],
    status: str,
    certs_json: Any,
    now: dt.datetime,
) -> list[SecretRow]:
    name = str(config.get("name", "?"))
    version = config.get("version_info")
    updated = config.get("last_updated")
    secret = config.get("secret")
    secret = secret if isinstance(secret, dict) else {}

    def row(
        kind: str,
        valid: bool = False,
        serial: str = "",
        not_after: str = "",
        not_before: str = "",
        sans: list[str] | None = None,
    ) -> SecretRow:
        return SecretRow(
            resource_name=name,
            type=kind,
            status=status,
            valid_cert=valid,
            serial_number=serial,
            not_after=not_after,
            not_before=not_before,
            version_info=str(version) if version is not None else None,
            last_updated=str(updated) if updated is not None else None,
            subject_alt_names=sans or [],
        )

    if "tls_certificate" in secret:
        kind, certs_key = "Cert Chain", "cert_chain"
        pem = _secret_pem((secret["tls_certificate"] or {}).get("certificate_chain"))
    elif "validation_context" in secret:
        kind, certs_key = "CA", "ca_cert"
        pem = _secret_pem((secret["validation_context"] or {}).get("trusted_ca"))
    else:
        kinds = [k for k in secret if k not in ("@type", "name")]
        return [row(kinds[0] if kinds else "-")]

    # Envoy's own rendering of each serial/time, by serial number.
    shown = {_serial_int(e.get("serial_number")): e for e in _certs_entries(certs_json, certs_key)}
    certs: list[x509.Certificate] = []
    if pem is not None:
        try:
            certs = load_certs_pem(pem, source=f"Envoy secret {name}")
        except MeshTrustError:
            certs = []
    if kind == "Cert Chain":
        certs = certs[:1]  # the leaf is what the row describes; the rest is its chain

    rows: list[SecretRow] = []
    for cert in certs:
        entry = shown.get(cert.serial_number, {})
        nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
        rows.append(
            row(
                kind,
                valid=nb <= now < na,
                serial=str(entry.get("serial_number") or envoy_serial(cert.serial_number)),
                not_after=_fmt(na),
                not_before=_fmt(nb),
                sans=_uri_sans(cert),
            )
        )
    if rows:
        return rows
    # No PEM in the config dump (a future Envoy might redact it): fall back to /certs,
    # which lists certificates per TLS context but without the resource names.
    entries = _certs_entries(certs_json, certs_key)
    if kind == "Cert Chain":
        entries = entries[:1]
    seen: set[object] = set()
    for entry in entries:
        serial = entry.get("serial_number")
        if serial in seen:
            continue
        seen.add(serial)
        nb_t, na_t = _parse_time(entry.get("valid_from")), _parse_time(entry.get("expiration_time"))
        sans = [
            str(s["uri"])
            for s in entry.get("subject_alt_names") or []
            if isinstance(s, dict) and "uri" in s
        ]
        rows.append(
            row(
                kind,
                valid=nb_t is not None and na_t is not None and nb_t <= now < na_t,
                serial=str(serial or ""),
                not_after=_fmt(na_t) if na_t else "",
                not_before=_fmt(nb_t) if nb_t else "",
                sans=sans,
            )
        )
    return rows or [row(kind)]


def _dump_configs(dump: Any) -> list[dict[str, Any]]:
    # With no secret of the kind, Envoy answers `{}` rather than `{"configs": []}`.
    if not isinstance(dump, dict):
        return []
    return [c for c in dump.get("configs") or [] if isinstance(c, dict)]


def proxy_secrets(
    state: MeshState, workload: str, now: dt.datetime | None = None
) -> list[SecretRow]:
    """``istioctl proxy-config secret``'s rows for ``workload``, from its live Envoy.

    Raises ConfigError for an unknown workload, WorkloadUnavailable when its agent or Envoy
    is down.
    """
    svc = state.service(workload)
    _, admin = _require_admin(svc)
    now = now or SystemClock().now()
    active = _fetch_json(f"{admin}/config_dump?resource=dynamic_active_secrets")
    if active is None:
        raise WorkloadUnavailable(f"the Envoy of {workload} does not answer on {admin}")
    warming = _fetch_json(f"{admin}/config_dump?resource=dynamic_warming_secrets")
    certs_json = _fetch_json(f"{admin}/certs")
    rows: list[SecretRow] = []
    for config in _dump_configs(active):
        rows += _rows_for_secret(config, "ACTIVE", certs_json, now)
    for config in _dump_configs(warming):
        rows += _rows_for_secret(config, "WARMING", certs_json, now)
    return rows


# --------------------------------------------------------------------------------------------
# check


@dataclass
class CheckStep:
    id: str  # stable key: agent, app, envoy, certificate, chain, identity, envoy-cert, ...
    title: str
    verdict: Verdict
    detail: str
    hint: str | None = None  # what to do, for WARN and FAIL

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Served:
    """What the agent, the certificate files and Envoy each hold, read together."""

    agent: dict[str, Any] | None
    chain: list[x509.Certificate] | None
    chain_error: str | None
    envoy_leaf: dict[str, Any] | None  # Envoy's /certs entry of the `default` leaf
    envoy_roots: list[int]
    envoy_answers: bool

    @property
    def agent_serial(self) -> int | None:
        return _serial_int(self.agent.get("serial")) if self.agent else None

    @property
    def file_serial(self) -> int | None:
        return self.chain[0].serial_number if self.chain else None

    @property
    def envoy_serial(self) -> int | None:
        return _serial_int(self.envoy_leaf.get("serial_number")) if self.envoy_leaf else None

    def consistent(self) -> bool:
        serials = {self.agent_serial, self.file_serial, self.envoy_serial}
        return len(serials) == 1 and None not in serials


def _read_chain(svc: ServiceState) -> tuple[list[x509.Certificate] | None, str | None]:
    path = Path(svc.cert_dir) / "cert-chain.pem"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, f"{path} does not exist"
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror}"
    try:
        return load_certs_pem(data, source=str(path)), None
    except MeshTrustError as exc:
        return None, str(exc)


def _envoy_certs(admin: str | None) -> tuple[dict[str, Any] | None, list[int], bool]:
    if not admin:
        return None, [], False
    certs_json = _fetch_json(f"{admin}/certs")
    if certs_json is None:
        return None, [], False
    leaves = _certs_entries(certs_json, "cert_chain")
    roots = {_serial_int(e.get("serial_number")) for e in _certs_entries(certs_json, "ca_cert")}
    return (leaves[0] if leaves else None), sorted(r for r in roots if r is not None), True


def _read_served(svc: ServiceState, attempts: int = 4, pause: float = 0.5) -> _Served:
    """Read agent, files and Envoy; re-read a few times if a rotation is caught midway."""
    served: _Served | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(pause)
        status = agent_status(svc)
        chain, chain_error = _read_chain(svc)
        leaf, roots, answers = _envoy_certs(_envoy_info(status).get("admin"))
        served = _Served(status, chain, chain_error, leaf, roots, answers)
        serials = (served.agent_serial, served.file_serial, served.envoy_serial)
        if served.consistent() or None in serials:
            break  # all agree, or something is missing: re-reading will not help
    assert served is not None
    return served


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _load_roots(state: MeshState) -> tuple[list[x509.Certificate] | None, str]:
    path = Path(state.ca.ca_dir) / "root-cert.pem"
    try:
        return load_certs_pem(path.read_bytes(), source=str(path)), str(path)
    except OSError as exc:
        return None, f"cannot read the mesh root {path}: {exc.strerror}"
    except MeshTrustError as exc:
        return None, str(exc)


def _restart_hint(state: MeshState) -> str:
    return f"restart the mesh: `meshtrust down` then `meshtrust up {state.mesh_file}`"


def _renewal_hint(state: MeshState, agent: Mapping[str, Any] | None) -> str:
    parts = []
    if not alive(state.ca.pid):
        parts.append(
            f"the CA (pid {state.ca.pid}) is not running, so the agent cannot renew: "
            f"{_restart_hint(state)} (CA log: {state.ca.log})"
        )
    else:
        parts.append(
            f"the agent renews at half-life; is the CA at {state.ca.address} reachable? "
            f"(`meshtrust status`, CA log {state.ca.log})"
        )
    if agent and agent.get("last_error"):
        parts.append(f"the agent's last error: {agent['last_error']}")
    return "; ".join(parts)


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


_STATS_PATTERN = r"ssl\.|rbac|no_filter_chain_match|upstream_cx_connect_fail|lds\.update_rejected"


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


def _rbac_denials(stats: Mapping[str, int]) -> list[tuple[str, int]]:
    return [
        (name, value)
        for name, value in sorted(stats.items())
        if value and ".rbac." in name and name.endswith("denied") and "shadow" not in name
    ]


def _counts(items: Iterable[tuple[str, int]]) -> str:
    return ", ".join(f"{name}={value}" for name, value in items)


def check_workload(
    state: MeshState,
    workload: str,
    now: dt.datetime | None = None,
) -> list[CheckStep]:
    """The troubleshooting walk for ``workload``: one :class:`CheckStep` per step.

    Raises ConfigError for an unknown workload; everything else is a verdict.
    """
    svc = state.service(workload)
    steps: list[CheckStep] = []

    def add(
        id: str, title: str, verdict: Verdict, detail: str, hint: str | None = None
    ) -> CheckStep:
        step = CheckStep(id, title, verdict, detail, hint)
        steps.append(step)
        return step

    served = _read_served(svc)
    at_now = now or SystemClock().now()
    agent = served.agent
    envoy = _envoy_info(agent)
    admin = envoy.get("admin") if isinstance(envoy.get("admin"), str) else None

    # 1. The agent.
    if not alive(svc.agent_pid):
        add(
            "agent",
            "agent running",
            Verdict.FAIL,
            f"the agent (pid {svc.agent_pid}) is not running",
            f"its log {svc.agent_log} says why it stopped; {_restart_hint(state)}",
        )
    elif agent is None:
        add(
            "agent",
            "agent running",
            Verdict.FAIL,
            f"pid {svc.agent_pid} is alive but http://{svc.status}/debug/status does not answer",
            f"the agent may be hung; see {svc.agent_log}; {_restart_hint(state)}",
        )
    else:
        add(
            "agent",
            "agent running",
            Verdict.PASS,
            f"pid {svc.agent_pid}, certificate state {agent.get('state')}, "
            f"ready {agent.get('ready')}",
        )

    # 2. The app.
    if svc.app_pid is None:
        add(
            "app",
            "app running",
            Verdict.SKIP,
            "no app: the mesh file gives this service no command",
        )
    elif not alive(svc.app_pid):
        add(
            "app",
            "app running",
            Verdict.FAIL,
            f"the app (pid {svc.app_pid}) is not running",
            f"its log {svc.app_log} says why it stopped; {_restart_hint(state)}",
        )
    elif not _port_open(svc.app_port):
        add(
            "app",
            "app running",
            Verdict.WARN,
            f"pid {svc.app_pid} is alive but nothing listens on 127.0.0.1:{svc.app_port}",
            f"the sidecar forwards callers to that port: is the app still starting, or "
            f"listening elsewhere? (log {svc.app_log})",
        )
    else:
        add("app", "app running", Verdict.PASS, f"pid {svc.app_pid}, listening on :{svc.app_port}")

    # 3. Envoy.
    envoy_log = Path(svc.envoy_workdir) / f"envoy-{svc.name}.log"
    if agent is None:
        add("envoy", "Envoy live", Verdict.SKIP, "the agent, which runs Envoy, does not answer")
    elif not envoy:
        add(
            "envoy",
            "Envoy live",
            Verdict.FAIL,
            "the agent runs no Envoy sidecar",
            "the agent was started without --sidecar; restart the mesh",
        )
    elif not envoy.get("live") or not served.envoy_answers:
        add(
            "envoy",
            "Envoy live",
            Verdict.FAIL,
            f"Envoy (pid {envoy.get('pid')}) is not live"
            + ("" if served.envoy_answers else f"; its admin API {admin} does not answer"),
            f"the agent restarts it (restarts so far: {envoy.get('restarts')}); "
            f"see {envoy_log} and {svc.agent_log}",
        )
    elif envoy.get("restarts"):
        add(
            "envoy",
            "Envoy live",
            Verdict.WARN,
            f"pid {envoy.get('pid')}, admin {admin}, but restarted {envoy['restarts']}×",
            f"Envoy exited and the agent started it again; {envoy_log} says why",
        )
    else:
        add("envoy", "Envoy live", Verdict.PASS, f"pid {envoy.get('pid')}, admin {admin}")

    # 4. The certificate files.
    chain = served.chain
    if chain is None:
        add(
            "certificate",
            "certificate present",
            Verdict.FAIL,
            served.chain_error or "no certificate",
            "the agent has no certificate yet: "
            + _renewal_hint(state, agent)
            + f" (agent log {svc.agent_log})",
        )
    else:
        add(
            "certificate",
            "certificate present",
            Verdict.PASS,
            f"{Path(svc.cert_dir) / 'cert-chain.pem'}, "
            f"serial {envoy_serial(chain[0].serial_number)}",
        )

    # 5. The chain, to the mesh root.
    leaf = chain[0] if chain else None
    roots, roots_where = _load_roots(state)
    if leaf is None or chain is None:
        add("chain", "chain valid to the mesh root", Verdict.SKIP, "no certificate to verify")
    elif roots is None:
        add(
            "chain",
            "chain valid to the mesh root",
            Verdict.FAIL,
            roots_where,
            f"the mesh's CA directory {state.ca.ca_dir} is damaged or gone",
        )
    else:
        at = at_now
        # Expiry is the time-left step's verdict; here: is the chain signed by the mesh root?
        at = min(max(at, leaf.not_valid_before_utc), leaf.not_valid_after_utc)
        try:
            bundle = TrustBundle(TrustDomain.parse(state.trust_domain), tuple(roots))
            verified = verify_svid(chain, bundle, at)
            anchor = verified.chain[-1]
            add(
                "chain",
                "chain valid to the mesh root",
                Verdict.PASS,
                f"{len(chain)} certificate(s) to the root {anchor.subject.rfc4514_string()} "
                f"(serial {envoy_serial(anchor.serial_number)})",
            )
        except MeshTrustError as exc:
            add(
                "chain",
                "chain valid to the mesh root",
                Verdict.FAIL,
                str(exc),
                f"this certificate was not issued under the mesh root {roots_where}: was the "
                f"CA directory re-created while the agent kept an old certificate? "
                f"{_restart_hint(state)}",
            )

    # 6. Identity.
    if leaf is None:
        add("identity", "identity as expected", Verdict.SKIP, "no certificate to read")
    else:
        sans = _uri_sans(leaf)
        if sans == [svc.spiffe_id]:
            add("identity", "identity as expected", Verdict.PASS, svc.spiffe_id)
        else:
            add(
                "identity",
                "identity as expected",
                Verdict.FAIL,
                f"the certificate names {', '.join(sans) or 'no SPIFFE ID'}, the mesh expects "
                f"{svc.spiffe_id}",
                "the agent's token or --namespace/--service-account do not match the mesh "
                f"file; {_restart_hint(state)}",
            )

    # 7. Envoy serves the agent's certificate and trusts the mesh root.
    if not served.envoy_answers or agent is None:
        add(
            "envoy-cert",
            "Envoy serves the certificate",
            Verdict.SKIP,
            "Envoy's admin API is not reachable",
        )
    elif served.envoy_serial is None:
        add(
            "envoy-cert",
            "Envoy serves the certificate",
            Verdict.FAIL,
            "Envoy holds no workload certificate (SDS `default` never arrived)",
            f"see `meshtrust proxy-config secret {svc.name}` and the agent log {svc.agent_log}",
        )
    else:
        problems = []
        hints = []
        if served.agent_serial is not None and served.envoy_serial != served.agent_serial:
            problems.append(
                f"Envoy serves serial {envoy_serial(served.envoy_serial)}, the agent's current "
                f"certificate is {envoy_serial(served.agent_serial)}"
            )
            hints.append(
                "the SDS push did not reach Envoy or Envoy refused it "
                f"(`meshtrust proxy-config secret {svc.name}`, {envoy_log})"
            )
        if (
            served.file_serial is not None
            and served.agent_serial is not None
            and served.file_serial != served.agent_serial
        ):
            problems.append(
                f"cert-chain.pem holds serial {envoy_serial(served.file_serial)}, not the "
                "agent's current one"
            )
            hints.append("the agent did not refresh its output files (istio#53118)")
        root_serials = {r.serial_number for r in roots or []}
        if root_serials and not root_serials & set(served.envoy_roots):
            problems.append("Envoy's ROOTCA does not contain the mesh root")
            hints.append("peers' certificates will be refused; " + _restart_hint(state))
        if problems:
            add(
                "envoy-cert",
                "Envoy serves the certificate",
                Verdict.WARN,
                "; ".join(problems),
                "; ".join(hints),
            )
        else:
            add(
                "envoy-cert",
                "Envoy serves the certificate",
                Verdict.PASS,
                f"serial {envoy_serial(served.envoy_serial)} (same as the agent's and the "
                "files'), ROOTCA has the mesh root",
            )

    # 8. Time left, on the certificate Envoy serves (else the agent's, else the file's).
    not_after = _parse_time(served.envoy_leaf.get("expiration_time")) if served.envoy_leaf else None
    if not_after is None and agent is not None:
        not_after = _parse_time(agent.get("not_after"))
    if not_after is None and leaf is not None:
        not_after = leaf.not_valid_after_utc
    ttl = state.cert_ttl_seconds
    if not_after is None:
        add("time-left", "time left", Verdict.SKIP, "no certificate")
    else:
        left = (not_after - at_now).total_seconds()
        left_text = format_duration(dt.timedelta(seconds=int(left)))
        if left <= 0:
            add(
                "time-left",
                "time left",
                Verdict.FAIL,
                f"EXPIRED {format_duration(dt.timedelta(seconds=int(-left)))} ago "
                f"(NotAfter {_fmt(not_after)}): peers refuse this workload's mTLS handshakes",
                _renewal_hint(state, agent),
            )
        elif left < WARN_FRACTION * ttl:
            add(
                "time-left",
                "time left",
                Verdict.WARN,
                f"{left_text} left of a {format_duration(dt.timedelta(seconds=int(ttl)))} "
                f"certificate (NotAfter {_fmt(not_after)})",
                "it should have been renewed at half-life: " + _renewal_hint(state, agent),
            )
        else:
            add("time-left", "time left", Verdict.PASS, f"{left_text} (NotAfter {_fmt(not_after)})")

    # 9. Policy.
    stats: dict[str, int] | None = None
    if admin and served.envoy_answers:
        stats = envoy_stats(admin, _STATS_PATTERN)
    if agent is None or not envoy:
        add("policy", "policy mode", Verdict.SKIP, "the agent does not answer")
    elif envoy.get("policy_error"):
        add(
            "policy",
            "policy mode",
            Verdict.FAIL,
            f"the policy files were refused: {envoy['policy_error']}",
            f"fix {', '.join(state.policy_files) or 'the policy files'}; until then the "
            f"sidecar keeps the last good policy ({envoy.get('mtls_mode')}, version "
            f"{envoy.get('policy_version')})",
        )
    else:
        mode = envoy.get("mtls_mode")
        rejected = (stats or {}).get("listener_manager.lds.update_rejected", 0)
        detail = f"{mode}, policy version {envoy.get('policy_version')}"
        if rejected:
            add(
                "policy",
                "policy mode",
                Verdict.WARN,
                f"{detail}; Envoy rejected {rejected} listener update(s)",
                f"Envoy runs the previous listener; {envoy_log} says why",
            )
        elif mode == "DISABLE":
            add(
                "policy",
                "policy mode",
                Verdict.WARN,
                f"{detail}: plain text only, no mTLS",
                "a PeerAuthentication with mode DISABLE applies to this workload; "
                "use STRICT (or PERMISSIVE while migrating)",
            )
        elif mode is None:
            add(
                "policy",
                "policy mode",
                Verdict.WARN,
                "no policy compiled yet",
                f"see {svc.agent_log}",
            )
        elif mode == "PERMISSIVE":
            add(
                "policy",
                "policy mode",
                Verdict.PASS,
                f"{detail} (mTLS or plain text; STRICT would refuse plain text)",
            )
        else:
            add("policy", "policy mode", Verdict.PASS, detail)

    # 10-11. TLS errors and RBAC denials from Envoy's counters.
    if stats is None:
        add("tls-errors", "TLS handshake errors", Verdict.SKIP, "Envoy's stats are unreachable")
        add("rbac", "RBAC denials", Verdict.SKIP, "Envoy's stats are unreachable")
    else:
        since = f"since Envoy (pid {envoy.get('pid')}) started"
        errors = _tls_errors(stats, svc)
        if errors:
            add(
                "tls-errors",
                "TLS handshake errors",
                Verdict.WARN,
                f"{_counts((n, v) for n, v, _ in errors)} ({since})",
                "; ".join(f"{n.rsplit('.', 1)[-1]}: {m}" for n, _, m in errors),
            )
        else:
            add("tls-errors", "TLS handshake errors", Verdict.PASS, f"none {since}")
        denials = _rbac_denials(stats)
        if denials:
            add(
                "rbac",
                "RBAC denials",
                Verdict.WARN,
                f"{sum(v for _, v in denials)} denied: {_counts(denials)} ({since})",
                "an AuthorizationPolicy refused these calls (a DENY rule matched, or no ALLOW "
                "rule did); if they should pass, see "
                f"{', '.join(state.policy_files) or 'the policy files'}",
            )
        else:
            add("rbac", "RBAC denials", Verdict.PASS, f"none {since}")
    return steps


# --------------------------------------------------------------------------------------------
# certs monitor


@dataclass
class CertExpiry:
    service: str
    spiffe_id: str
    serial: str | None  # as Envoy shows serials
    not_after: str | None
    expires_in_seconds: float | None
    status: str  # OK | WARN | EXPIRED | MISSING
    source: str  # "agent" (its /debug/status) or "files" (cert-chain.pem)
    message: str
    last_error: str | None = None  # the agent's last renewal error, if any

    @property
    def fine(self) -> bool:
        return self.status == "OK"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def monitor_certs(
    state: MeshState, warn_within: dt.timedelta, now: dt.datetime | None = None
) -> list[CertExpiry]:
    """Every service's certificate expiry: OK, WARN (within ``warn_within``), EXPIRED, or
    MISSING; from the agent's status, or the certificate files when the agent does not
    answer."""
    now = now or SystemClock().now()
    out: list[CertExpiry] = []
    for svc in state.services:
        agent = agent_status(svc)
        serial: int | None = None
        not_after: dt.datetime | None = None
        source = "agent"
        if agent is not None:
            serial = _serial_int(agent.get("serial")) if agent.get("serial") else None
            not_after = _parse_time(agent.get("not_after"))
        if not_after is None:
            source = "files"
            chain, _ = _read_chain(svc)
            if chain:
                serial, not_after = chain[0].serial_number, chain[0].not_valid_after_utc
        if not_after is None:
            out.append(
                CertExpiry(
                    svc.name,
                    svc.spiffe_id,
                    None,
                    None,
                    None,
                    "MISSING",
                    source,
                    "no certificate (agent down or never issued)",
                )
            )
            continue
        left = (not_after - now).total_seconds()
        if left <= 0:
            status = "EXPIRED"
            message = f"expired {format_duration(dt.timedelta(seconds=int(-left)))} ago"
            if not alive(state.ca.pid):
                message += "; the CA is not running"
            elif agent and agent.get("last_error"):
                message += "; renewal failing"
        elif left < warn_within.total_seconds():
            status = "WARN"
            message = (
                f"expires in {format_duration(dt.timedelta(seconds=int(left)))}, within "
                f"{format_duration(warn_within)}"
            )
        else:
            status = "OK"
            message = f"expires in {format_duration(dt.timedelta(seconds=int(left)))}"
        if source == "files":
            message += " (the agent does not answer: read from cert-chain.pem)"
        out.append(
            CertExpiry(
                service=svc.name,
                spiffe_id=svc.spiffe_id,
                serial=envoy_serial(serial) if serial is not None else None,
                not_after=_fmt(not_after),
                expires_in_seconds=left,
                status=status,
                source=source,
                message=message,
                last_error=str(agent["last_error"]) if agent and agent.get("last_error") else None,
            )
        )
    return out

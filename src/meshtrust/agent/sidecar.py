"""The Envoy sidecar, owned by the agent: generated config, launch, supervision, policy.

Theory of operation. At start the agent compiles the workload's inbound policy (Istio
policies -> mTLS mode + RBAC), writes the inbound listener to an LDS file, builds the
bootstrap (SDS cluster on the agent's socket, the local app cluster, the outbound listeners
and their mTLS clusters) and has the launcher start Envoy. Then, every ``poll`` seconds of
the injected clock:

* if Envoy has died it is started again; a start that fails is retried with exponential
  backoff (``backoff_base`` doubling up to ``backoff_cap``) and never ends supervision;
* if the policy source says something changed, the policies are loaded and compiled again;
  if that works, the new listener is written atomically and Envoy picks it up by itself (no
  restart; open connections on unchanged filter chains are untouched). If loading, compiling
  or writing fails, the error — naming the file, the object and the field — is logged and
  kept in ``last_policy_error``, and the previous policy stays in force;
* the sidecar is live when Envoy says LIVE (``/ready``: every listener has its secrets)
  *and* reports every listener the sidecar configured as active (``/listeners``): Envoy
  says LIVE even when it could not bind a listener's port because another process holds
  it. Otherwise ``not_live_reason`` says why, in words a person can act on. While a
  listener is down the listener file is written again now and then (with backoff), since
  Envoy retries a bind only when that file changes.

Revocations reach open connections too (:meth:`EnvoySidecar.follow_revocations`). Envoy checks
a peer's certificate against the CRL at the handshake only, so a caller whose certificate is
revoked would keep a pooled connection. When a CRL revokes serials the sidecar had not seen
revoked, it waits until Envoy has acknowledged that CRL over SDS (``ROOTCA``), then writes the
inbound listener again with a new *revocation epoch* in the mTLS chain's metadata. To Envoy
that is a filter-chain-only update: the mTLS chain's connections drain (the next HTTP response
says ``connection: close``, HTTP/2 gets GOAWAY, whatever is still open when the drain time
ends is closed) and their callers reconnect, to be checked against the new CRL. Callers that
are not revoked lose no request; a revoked one is refused at its new handshake.

Collaborators are constructor arguments (:class:`EnvoyLauncher`, :class:`PolicySource`, the
clock), narrow protocols owned here: the agent's assembly passes the real ones
(:class:`meshtrust.envoy.ProcessLauncher`, :class:`meshtrust.agent.build.PolicyFiles`), tests
pass fakes and run supervision on a fake clock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509

from meshtrust.agent.cache import WorkloadSecret
from meshtrust.agent.rotation import backoff_delay
from meshtrust.clock import Clock
from meshtrust.envoy import ADMIN_SOCKET
from meshtrust.envoy.sidecar import (
    PeerDomains,
    SidecarConfig,
    inbound_listeners,
    listener_problems,
    sidecar_bootstrap,
    write_lds_file,
)
from meshtrust.envoy.trust_domains import peer_root_secret
from meshtrust.errors import EnvoyFailed, InvalidInput
from meshtrust.policy import InboundPolicy, PolicySet, WorkloadRef
from meshtrust.spiffe import SpiffeId, TrustDomain

__all__ = [
    "REVOCATION_ACK_WAIT",
    "Envoy",
    "EnvoyLauncher",
    "EnvoySidecar",
    "PolicySource",
    "RootAcknowledgements",
    "SecretFeed",
    "SidecarSettings",
    "revoked_serials",
]

#: How long a revocation drain waits for Envoy to acknowledge the new CRL (SDS ``ROOTCA``)
#: before draining anyway: draining first would let callers reconnect against the old CRL.
REVOCATION_ACK_WAIT = 10.0

log = logging.getLogger("meshtrust.agent")


class Envoy(Protocol):
    """One Envoy the sidecar supervises (the real child process, or a fake)."""

    @property
    def pid(self) -> int | None: ...

    @property
    def running(self) -> bool: ...

    @property
    def admin_url(self) -> str | None: ...

    async def start(self) -> None:
        """Launch and wait until the admin API answers; raises :class:`EnvoyFailed`."""
        ...

    async def stop(self) -> None: ...

    async def ready(self) -> bool:
        """Whether Envoy says it is LIVE."""
        ...

    async def active_listeners(self) -> frozenset[str] | None:
        """The names of the listeners Envoy has bound and serves; None when it does not
        answer."""
        ...

    def log_tail(self) -> str: ...


class EnvoyLauncher(Protocol):
    def prepare(self, bootstrap: Mapping[str, Any], workdir: Path, name: str) -> Envoy:
        """An Envoy for ``bootstrap`` with its files in ``workdir``, not started yet."""
        ...


class PolicySource(Protocol):
    def load(self) -> PolicySet:
        """Every policy, validated; raises :class:`InvalidInput` (nothing is applied then)."""
        ...

    def changed(self) -> bool:
        """Whether the policies may differ from what the last :meth:`load` returned."""
        ...


class SecretFeed(Protocol):
    """The agent's secret generations (:class:`meshtrust.agent.cache.SecretCache`)."""

    async def wait_newer(self, generation: int) -> WorkloadSecret: ...


class RootAcknowledgements(Protocol):
    """Whether Envoy runs what SDS sent it (:class:`meshtrust.agent.sds.SdsServer`)."""

    async def wait_acknowledged(self, name: str, secret: WorkloadSecret, timeout: float) -> bool:
        """True once every SDS stream carrying ``name`` has acknowledged it as ``secret``
        has it (or newer); False after ``timeout`` seconds."""
        ...


def revoked_serials(crl: x509.CertificateRevocationList | None) -> frozenset[int]:
    """The serials ``crl`` revokes (none without a CRL)."""
    return frozenset() if crl is None else frozenset(r.serial_number for r in crl)


@dataclass(frozen=True)
class SidecarSettings:
    config: SidecarConfig
    workdir: Path
    root_namespace: str = "istio-system"
    trust_domain_aliases: tuple[TrustDomain, ...] = ()  # Istio's trustDomainAliases
    poll: float = 1.0
    backoff_base: float = 1.0
    backoff_cap: float = 30.0


class EnvoySidecar:
    """Runs one workload's Envoy; see the module docstring. Raises
    :class:`~meshtrust.errors.PolicyError` at construction for a bad initial policy."""

    def __init__(
        self,
        settings: SidecarSettings,
        identity: SpiffeId,
        sds_socket: Path,
        *,
        launcher: EnvoyLauncher,
        policies: PolicySource,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.sds_socket = sds_socket
        self.clock = clock
        self._launcher = launcher
        self._policies = policies
        self.workload: WorkloadRef = settings.config.workload(identity)
        self.lds_path = settings.workdir / "lds" / "listeners.json"
        self.envoy: Envoy | None = None
        self.policy: InboundPolicy | None = None
        self.policy_version = 0
        self.restarts = 0
        self.live = False
        self.not_live_reason: str | None = "Envoy is not started yet"
        self._bind_retries = 0
        self._next_bind_retry: float | None = None
        self.last_policy_error: str | None = None
        #: Bumped by each CRL that revokes something new; in the mTLS chain's metadata.
        self.revocation_epoch = 0
        #: Revocation drains asked of Envoy (one per new LDS version written for them).
        self.revocation_drains = 0
        #: The federated trust domains whose bundles the agent holds: one inbound filter
        #: chain each (envoy/trust_domains.py).
        self.federated: tuple[TrustDomain, ...] = ()
        self.federated_updates = 0
        # Compiled now, so a bad policy stops the agent before anything runs.
        self._initial_policy = self.compile_policy()

    # -- policy

    def compile_policy(self) -> InboundPolicy:
        """Load the policies and compile this workload's inbound policy (raises
        PolicyError / ConfigError; nothing is applied then)."""
        return self._policies.load().inbound_for(
            self.workload,
            root_namespace=self.settings.root_namespace,
            trust_domain=self.identity.trust_domain.name,
            trust_domain_aliases=self.settings.trust_domain_aliases,
        )

    @property
    def peers(self) -> PeerDomains:
        """The trust domains this sidecar's peers may be of (its own, its aliases, the
        federated ones its agent holds)."""
        return PeerDomains(
            self.identity.trust_domain, self.settings.trust_domain_aliases, self.federated
        )

    def _listeners(self, policy: InboundPolicy) -> list[dict[str, Any]]:
        return inbound_listeners(
            self.settings.config,
            policy,
            revocation_epoch=self.revocation_epoch,
            peers=self.peers,
        )

    def _lds_version(self, policy_version: int) -> str:
        """``<policy version>``, then ``.r<epoch>`` once a revocation drained connections and
        ``.f<n>`` once the federated trust domains changed."""
        epoch = f".r{self.revocation_epoch}" if self.revocation_epoch else ""
        federated = f".f{self.federated_updates}" if self.federated_updates else ""
        return f"{policy_version}{epoch}{federated}"

    def _apply(self, policy: InboundPolicy) -> None:
        version = self.policy_version + 1
        listeners = self._listeners(policy)
        try:
            self.lds_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_lds_file(self.lds_path, listeners, self._lds_version(version))
        except OSError as exc:
            raise EnvoyFailed(f"cannot write Envoy's listener file {self.lds_path}: {exc}") from exc
        self.policy, self.policy_version = policy, version
        log.info(
            "inbound policy v%d for %s: mTLS %s, %d RBAC filter(s)",
            version,
            self.workload.name,
            policy.mode,
            len(policy.rbac_filters),
        )

    def reload_policy(self) -> bool:
        """Load the policies again; apply them if valid. Returns whether they were applied."""
        try:
            self._apply(self.compile_policy())
        except (InvalidInput, EnvoyFailed) as exc:
            self.last_policy_error = str(exc)
            log.error("policy not applied, the previous one stays in force: %s", exc)
            return False
        self.last_policy_error = None
        return True

    # -- lifecycle

    def bootstrap(self) -> dict[str, Any]:
        """Envoy's bootstrap for this workload (pure)."""
        cfg = self.settings.config
        return sidecar_bootstrap(
            cfg,
            sds_socket=self.sds_socket,
            lds_path=self.lds_path,
            node_id=f"sidecar~127.0.0.1~{cfg.name}.{cfg.namespace}~{cfg.namespace}.svc",
            admin_socket=self.admin_socket,
            peers=self.peers,
        )

    @property
    def admin_socket(self) -> Path:
        """Envoy's admin API: a Unix socket (0600) in the workload's Envoy directory."""
        return self.settings.workdir / ADMIN_SOCKET

    async def start(self) -> None:
        """Write the policy, start Envoy and wait until its admin answers (not until it is
        LIVE: that needs the first certificate, which may wait for the CA; :meth:`run`
        watches that). Raises :class:`EnvoyFailed`."""
        self._apply(self._initial_policy)
        name = f"envoy-{self.settings.config.name}"
        self.envoy = self._launcher.prepare(self.bootstrap(), self.settings.workdir, name)
        await self._launch()

    async def _launch(self) -> None:
        envoy = self._require_envoy()
        await envoy.start()
        log.info(
            "Envoy for %s started (pid %s, admin %s)", self.workload.name, envoy.pid, self.admin_url
        )

    @property
    def admin_url(self) -> str | None:
        return self.envoy.admin_url if self.envoy is not None else None

    async def run(self) -> None:
        """Supervise Envoy and watch the policies until cancelled."""
        attempt = 0
        while True:
            await self.clock.sleep(self.settings.poll)
            envoy = self._require_envoy()
            if not envoy.running:
                attempt = await self._restart(envoy, attempt)
                continue
            await self._judge(envoy)
            if self._policies.changed():
                self.reload_policy()

    async def _judge(self, envoy: Envoy) -> None:
        """Set ``live`` and ``not_live_reason`` from what Envoy reports; log changes."""
        was_live, old_reason = self.live, self.not_live_reason
        reason: str | None
        if not await envoy.ready():
            reason = "Envoy is not LIVE yet (waiting for its certificate from the agent?)"
        else:
            active = await envoy.active_listeners()
            if active is None:
                reason = f"Envoy's admin API {self.admin_url} does not answer"
            else:
                problems = listener_problems(self.settings.config, active)
                reason = "; ".join(problems) if problems else None
                self._retry_bind(bool(problems))
        self.live, self.not_live_reason = reason is None, reason
        if self.live and not was_live:
            log.info("Envoy for %s is live", self.workload.name)
        elif reason is not None and reason != old_reason:
            log.warning("Envoy for %s is not ready: %s", self.workload.name, reason)

    def _retry_bind(self, needed: bool) -> None:
        """Envoy does not retry a listener it could not bind; it does when its listener file
        changes. So while a listener is down, write the same listeners again (a new LDS
        version, same policy), backing off like restarts do: once the other process lets
        the port go, the sidecar becomes ready by itself."""
        if not needed:
            self._bind_retries, self._next_bind_retry = 0, None
            return
        s, now = self.settings, self.clock.monotonic()
        if self._next_bind_retry is None or now >= self._next_bind_retry:
            if self._next_bind_retry is not None and self.policy is not None:
                self._bind_retries += 1
                version = f"{self._lds_version(self.policy_version)}.{self._bind_retries}"
                try:
                    write_lds_file(self.lds_path, self._listeners(self.policy), version)
                except OSError as exc:
                    log.error("cannot write Envoy's listener file %s: %s", self.lds_path, exc)
            delay = backoff_delay(
                self._bind_retries, base=s.backoff_base, cap=s.backoff_cap, jitter=0.0
            )
            self._next_bind_retry = now + delay

    # -- revocations

    async def follow_revocations(
        self, secrets: SecretFeed, acks: RootAcknowledgements | None = None
    ) -> None:
        """Drain the inbound mTLS connections whenever a CRL revokes a serial not revoked
        before (see the module docstring), once Envoy holds that CRL (``acks``; at most
        :data:`REVOCATION_ACK_WAIT` s). Runs until cancelled."""
        seen, revoked = 0, frozenset[int]()
        while True:
            secret = await secrets.wait_newer(seen)
            seen = secret.generation
            self.follow_federated(secret.federated)
            current = revoked_serials(secret.crl).union(
                *(revoked_serials(c) for crls in secret.federated_crls.values() for c in crls)
            )
            added, revoked = current - revoked, current
            if not added:
                continue
            names = ["ROOTCA", *(peer_root_secret(td) for td in secret.federated_crls)]
            if acks is not None and not all(
                [await acks.wait_acknowledged(n, secret, REVOCATION_ACK_WAIT) for n in names]
            ):
                log.warning(
                    "Envoy for %s has not acknowledged the CRL after %.0fs; draining its "
                    "inbound connections anyway",
                    self.workload.name,
                    REVOCATION_ACK_WAIT,
                )
            self.drain_for_revocation(len(added))

    def follow_federated(self, federated: Iterable[TrustDomain]) -> bool:
        """Hold the trust domains of ``federated``; when they changed, write the inbound
        listener again (a chain comes or goes; the others keep their connections). Returns
        whether the file was written."""
        tds = tuple(sorted(set(federated), key=lambda t: t.name))
        if tds == self.federated:
            return False
        if self.policy is None:
            self.federated = tds
            return False  # start() writes the listener with them
        held = self.federated
        self.federated = tds
        self.federated_updates += 1
        version = self._lds_version(self.policy_version)
        try:
            write_lds_file(self.lds_path, self._listeners(self.policy), version)
        except OSError as exc:
            # Kept as before, so the next secret tries again.
            self.federated, self.federated_updates = held, self.federated_updates - 1
            log.error("cannot write Envoy's listener file %s: %s", self.lds_path, exc)
            return False
        log.info(
            "federated trust domains for %s: %s (LDS %s)",
            self.workload.name,
            ", ".join(td.name for td in tds) or "none",
            version,
        )
        return True

    def drain_for_revocation(self, added: int) -> bool:
        """Write the inbound listener with the next revocation epoch, so Envoy drains the
        mTLS chain's connections. Returns whether the file was written (not before the
        sidecar has started; an unwritable file is logged, and the next write carries the
        epoch)."""
        self.revocation_epoch += 1
        if self.policy is None:
            return False
        version = self._lds_version(self.policy_version)
        try:
            write_lds_file(self.lds_path, self._listeners(self.policy), version)
        except OSError as exc:
            log.error("cannot write Envoy's listener file %s: %s", self.lds_path, exc)
            return False
        self.revocation_drains += 1
        log.info(
            "%d serial(s) newly revoked: draining %s's inbound mTLS connections (LDS %s)",
            added,
            self.workload.name,
            version,
        )
        return True

    async def _restart(self, envoy: Envoy, attempt: int) -> int:
        """Start a dead Envoy again; returns the next backoff attempt number (0 after a
        success). A failure is logged and waited out, never raised."""
        self.live = False
        self.not_live_reason = f"Envoy exited; restarting it (restart {self.restarts + 1})"
        self.restarts += 1
        log.error(
            "Envoy for %s exited; restarting it (restart %d). Log tail:\n%s",
            self.workload.name,
            self.restarts,
            envoy.log_tail(),
        )
        try:
            await envoy.stop()
            await self._launch()
            return 0
        except EnvoyFailed as exc:
            self.not_live_reason = _start_failure(exc)
            s = self.settings
            delay = backoff_delay(attempt, base=s.backoff_base, cap=s.backoff_cap, jitter=0.0)
            log.error(
                "Envoy for %s did not come back: %s; retrying in %.0fs",
                self.workload.name,
                exc,
                delay,
            )
            await self.clock.sleep(delay)
            return attempt + 1

    def _require_envoy(self) -> Envoy:
        if self.envoy is None:
            raise RuntimeError("the sidecar is not started")
        return self.envoy

    async def stop(self) -> None:
        self.live = False
        self.not_live_reason = "stopped"
        if self.envoy is not None:
            await self.envoy.stop()


def _start_failure(exc: EnvoyFailed) -> str:
    """A one-line reason from an Envoy that did not start: the first line of the error, and
    the log line saying which port it could not bind, when that is what happened."""
    lines = str(exc).splitlines()
    bind = next((line for line in lines if "cannot bind" in line), None)
    reason = f"Envoy does not start: {lines[0] if lines else exc}"
    if bind is not None:
        reason += "; " + bind[bind.index("cannot bind") :].rstrip() + " (the port is taken?)"
    return reason

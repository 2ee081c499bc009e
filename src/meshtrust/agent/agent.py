"""The agent process: one rotator, one cache, and the outputs that serve it.

Start order: the status port and the sockets (so Envoy and SPIFFE clients can connect and
wait), then the rotator, then the sidecar. Stop order is the reverse; sockets are removed.
Dependencies (the certificate source, the token, the clock, the sidecar with its Envoy
launcher and policy source) are constructor arguments, and
:func:`meshtrust.agent.build.build_agent` reads the files the configuration names, so tests
run the whole agent against a fake clock, a hostile CA or a fake Envoy.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from meshtrust.agent.cache import SecretCache, WorkloadSecret
from meshtrust.agent.config import AgentConfig
from meshtrust.agent.crl import CrlFollower, CrlSource, crl_number
from meshtrust.agent.files import CertificateFiles
from meshtrust.agent.handout import HandoutGate, Refusal
from meshtrust.agent.issuance import CertificateSource, TokenFile
from meshtrust.agent.metrics import AgentMetrics, CrlMetrics
from meshtrust.agent.rotation import SlotState
from meshtrust.agent.rotator import RotationPolicy, Rotator
from meshtrust.agent.sds import SdsServer
from meshtrust.agent.status import StatusServer, fetch_unix_http
from meshtrust.agent.trust import TrustFollower, TrustSource
from meshtrust.agent.workload_api import WorkloadApiServer
from meshtrust.clock import Clock
from meshtrust.errors import MeshTrustError
from meshtrust.metrics_text import TextRegistry
from meshtrust.pki import TrustBundle, cas_without_key_usage
from meshtrust.spiffe import SpiffeId

if TYPE_CHECKING:
    from cryptography import x509

    from meshtrust.agent.sidecar import EnvoySidecar

__all__ = ["Agent"]

log = logging.getLogger("meshtrust.agent")


class _Server(Protocol):
    async def start(self) -> None: ...

    async def stop(self, grace: float = 1.0) -> None: ...


class Agent:
    """Keeps one workload's identity fresh and serves it over SDS, the Workload API, files.

    Built by :func:`meshtrust.agent.build.build_agent`, which reads the files the
    configuration names; the constructor takes what they held and the collaborators (the
    certificate source, the token source, the clock, the sidecar) and reads nothing.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        identity: SpiffeId,
        anchors: TrustBundle,
        source: CertificateSource,
        token: TokenFile,
        clock: Clock,
        sidecar: EnvoySidecar | None = None,
        rng: random.Random | None = None,
        crl_source: CrlSource | None = None,
        trust_source: TrustSource | None = None,
        cache: SecretCache | None = None,
        on_roots: Callable[[tuple[x509.Certificate, ...]], None] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.identity = identity
        self.anchors = anchors
        self.token = token
        self.source = source
        self.cache = cache or SecretCache()
        self.registry = TextRegistry()
        self.metrics = AgentMetrics(self.registry, self._expiry_seconds, self._validity)
        self.rotator = Rotator(
            identity=self.identity,
            source=self.source,
            token=self.token,
            anchors=self.anchors,
            cache=self.cache,
            clock=self.clock,
            metrics=self.metrics,
            policy=RotationPolicy(
                cert_ttl=config.cert_ttl,
                ratio=config.rotation_ratio,
                jitter=config.rotation_jitter,
            ),
            key_type=config.key_type,
            rng=rng,
        )
        #: The CA's CRL, followed when there is a source (the real CA's stream).
        self.crl = (
            CrlFollower(crl_source, self.cache, anchors, clock, self.rotator.renew_now, rng)
            if crl_source is not None or trust_source is not None
            else None
        )
        #: The CA's trust stream (bundle + CRL; :mod:`meshtrust.agent.trust`).
        self.trust = None
        if trust_source is not None:
            assert self.crl is not None
            self.trust = TrustFollower(
                trust_source,
                self.cache,
                self.crl,
                clock,
                self.rotator.renew_now,
                self.handed_on,
                anchors.roots,
                rng,
                on_roots,
            )
        self._files_written = 0
        self._files_changed = asyncio.Condition()
        if self.crl is not None:
            self.registry.register(CrlMetrics(self.crl, lambda: self.cache.crl, clock.now))
        #: What may be handed out (no expired certificate), at the agent's clock.
        self.gate = HandoutGate(clock, lambda: self.rotator.last_error)
        self.sidecar = sidecar
        self._servers: list[_Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._status: StatusServer | None = None
        self._noted_without_key_usage: set[x509.Certificate] = set()
        self.started = False

    async def handed_on(self, generation: int) -> None:
        """Return once every output has ``generation``: SDS and the Workload API push from
        the cache as it changes; the files are waited for when there are any."""
        if self.config.output_dir is None:
            return
        async with self._files_changed:
            await self._files_changed.wait_for(lambda: self._files_written >= generation)

    def _expiry_seconds(self) -> float | None:
        secret = self.cache.current
        if secret is None:
            return None
        return (secret.not_after - self.clock.now()).total_seconds()

    def _validity(self) -> tuple[dt.datetime, dt.datetime] | None:
        secret = self.cache.current
        return None if secret is None else (secret.received_at, secret.not_after)

    async def _envoy_stats(self) -> bytes | None:
        """The sidecar Envoy's ``/stats/prometheus`` (for the status port's merged stats)."""
        assert self.sidecar is not None
        socket_path = str(self.sidecar.admin_socket)
        try:
            code, body = await fetch_unix_http(socket_path, "/stats/prometheus", 5.0)
        except (OSError, ValueError):  # TimeoutError is an OSError
            return None
        return body if code == 200 else None

    def ready(self) -> bool:
        """Ready: a certificate is held, it has not expired, and the outputs are up."""
        secret = self.cache.current
        return (
            self.started
            and secret is not None
            and not secret.expired(self.clock.now())
            and self.rotator.state != SlotState.EXPIRED
            and (self.sidecar is None or self.sidecar.live)
        )

    def status_snapshot(self) -> dict[str, object]:
        """What ``meshtrust status`` shows for this workload (no secrets)."""
        now = self.clock.now()
        secret = self.cache.current
        out: dict[str, object] = {
            "spiffe_id": str(self.identity),
            "state": self.rotator.state.value,
            "ready": self.ready(),
            "issued": self.metrics.rotations_ok,
            "rotations": max(0, self.metrics.rotations_ok - 1),
            "failed_attempts": self.metrics.rotations_failed,
            "last_error": self.rotator.last_error,
        }
        if secret is not None:
            decision = self.gate(secret)
            out.update(
                serial=secret.serial_hex,
                not_before=secret.leaf.not_valid_before_utc.isoformat(),
                not_after=secret.not_after.isoformat(),
                expires_in_seconds=(secret.not_after - now).total_seconds(),
                expired=isinstance(decision, Refusal),
            )
            if isinstance(decision, Refusal):
                out["expired_reason"] = decision.message
        crl = self.cache.crl
        if crl is not None and self.crl is not None:
            out["crl"] = {
                "number": format(crl_number(crl), "x"),
                "revoked": len(crl),
                "next_update": crl.next_update_utc.isoformat() if crl.next_update_utc else None,
                "stale": self.crl.stale(now),
                "refused": self.crl.refused,
                "own_certificate_revoked": secret is not None and secret.revoked,
            }
        if self.trust is not None:
            bundle = self.cache.bundle
            out["trust_bundle"] = {
                "version": bundle[0] if bundle is not None else None,
                "roots": len(bundle[1]) if bundle is not None else None,
                "serving": self.trust.serving,
                "refused": self.trust.refused,
                "last_error": self.trust.last_error,
            }
        if self.rotator.deadline is not None:
            out["next_rotation"] = self.rotator.deadline.isoformat()
            out["next_rotation_in_seconds"] = (self.rotator.deadline - now).total_seconds()
        if self.sidecar is not None:
            sc = self.sidecar
            out["envoy"] = {
                "live": sc.live,
                "not_live_reason": sc.not_live_reason,
                "pid": sc.envoy.pid if sc.envoy is not None else None,
                "admin": sc.admin_url,
                "restarts": sc.restarts,
                "inbound_port": sc.settings.config.inbound_port,
                "mtls_mode": sc.policy.mode.value if sc.policy is not None else None,
                "policy_version": sc.policy_version,
                "policy_error": sc.last_policy_error,
            }
        return out

    async def start(self) -> None:
        """Open the outputs and start rotating. Raises MeshTrustError on bad setup."""
        cfg = self.config
        try:
            if cfg.status_listen:
                from meshtrust.config import parse_host_port

                host, port = parse_host_port(cfg.status_listen, what="--status-listen")
                self._status = StatusServer(
                    host,
                    port,
                    self.registry,
                    self.ready,
                    self.status_snapshot,
                    envoy_stats=self._envoy_stats if self.sidecar is not None else None,
                )
                await self._status.start()
            if cfg.sds_socket is not None:
                self._servers.append(SdsServer(self.cache, cfg.sds_socket, clock=self.clock))
            if cfg.workload_socket is not None:
                self._servers.append(
                    WorkloadApiServer(self.cache, cfg.workload_socket, gate=self.gate)
                )
            for server in self._servers:
                await server.start()
            if cfg.output_dir is not None:
                files = CertificateFiles(cfg.output_dir)
                files.prepare()
                self._tasks.append(asyncio.create_task(self._write_files(files)))
        except BaseException:
            await self.stop()
            raise
        self._note_cas_without_key_usage(
            self.anchors.roots, f"trusted root ({cfg.ca_root or cfg.join})"
        )
        self._tasks.append(asyncio.create_task(self._note_issuing_cas()))
        self._tasks.append(asyncio.create_task(self.rotator.run()))
        if self.trust is not None:
            self._tasks.append(asyncio.create_task(self.trust.run()))
        elif self.crl is not None:
            self._tasks.append(asyncio.create_task(self.crl.run()))
        if self.crl is not None:
            self._tasks.append(asyncio.create_task(self.crl.watch_staleness()))
        if self.sidecar is not None:
            try:
                await self.sidecar.start()
            except BaseException:
                await self.stop()
                raise
            self._tasks.append(asyncio.create_task(self.sidecar.run()))
            # A CRL revoking something new drains the inbound mTLS connections, once Envoy
            # acknowledged it over SDS (docs/revocation.md).
            sds = next((s for s in self._servers if isinstance(s, SdsServer)), None)
            self._tasks.append(
                asyncio.create_task(self.sidecar.follow_revocations(self.cache, sds))
            )
        self.started = True
        log.info("agent for %s started (CA %s)", self.identity, ", ".join(cfg.ca_addresses))

    def _note_cas_without_key_usage(self, certs: Iterable[x509.Certificate], role: str) -> None:
        """Warn once per CA certificate without KeyUsage (``openssl req -x509`` makes them).

        Such a CA is accepted, as by Istio, Envoy and OpenSSL (see
        :func:`meshtrust.pki.ca_extension_policy`), but deserves a word; the issuing CA comes
        back with every certificate, and one word is enough.
        """
        for cert in cas_without_key_usage(list(certs)):
            if cert in self._noted_without_key_usage:
                continue
            self._noted_without_key_usage.add(cert)
            log.warning(
                "%s %s has no KeyUsage extension; accepted, as Istio, Envoy and OpenSSL "
                "accept it, but a CA certificate should say keyCertSign, cRLSign",
                role,
                cert.subject.rfc4514_string(),
            )

    async def _note_issuing_cas(self) -> None:
        generation = 0
        while True:
            secret = await self.cache.wait_newer(generation)
            generation = secret.generation
            self._note_cas_without_key_usage(secret.chain[1:], "issuing CA")

    async def _write_files(self, files: CertificateFiles) -> None:
        """Write every new generation; mark it ``EXPIRED`` if it expires before the next."""
        generation = 0
        while True:
            secret = await self.cache.wait_newer(generation)
            generation = secret.generation
            try:
                await asyncio.to_thread(files.write, secret)
            except OSError as exc:  # a full disk must not stop SDS or the Workload API
                log.error("cannot write certificate files to %s: %s", files.directory, exc)
                continue
            async with self._files_changed:
                self._files_written = generation
                self._files_changed.notify_all()
            if not await self._expires_before_newer(secret):
                continue
            refusal = self.gate(secret)
            if not isinstance(refusal, Refusal):
                continue
            try:
                await asyncio.to_thread(files.mark_expired, refusal.marker_text().encode())
            except OSError as exc:
                log.error("cannot mark %s EXPIRED: %s", files.directory, exc)
            else:
                log.warning("marked %s/EXPIRED: %s", files.directory, refusal.message)

    async def _expires_before_newer(self, secret: WorkloadSecret) -> bool:
        """Wait until ``secret`` expires (True) or the cache has a newer one (False)."""
        newer = asyncio.ensure_future(self.cache.wait_newer(secret.generation))
        sleep: asyncio.Future[None] | None = None
        try:
            while not secret.expired(self.clock.now()):
                # The time left is read when the sleep task starts, not now: on a fake clock
                # advanced in between, a duration read here would end past the expiry.
                sleep = asyncio.ensure_future(self._sleep_until(secret.not_after))
                await asyncio.wait((newer, sleep), return_when=asyncio.FIRST_COMPLETED)
                sleep.cancel()
                if newer.done():
                    return False
            return not newer.done()
        finally:
            newer.cancel()
            if sleep is not None:
                sleep.cancel()

    async def _sleep_until(self, when: dt.datetime) -> None:
        await self.clock.sleep(max(0.0, (when - self.clock.now()).total_seconds()))

    async def stop(self) -> None:
        """Stop rotating, close the sockets (removing them) and the status port."""
        self.started = False
        # Cancelled inside grpclib, a follower may get grpclib's error instead of the
        # CancelledError; the flags make its retry loop end rather than reconnect.
        self.rotator.stopping = True
        if self.trust is not None:
            self.trust.stopping = True
        if self.crl is not None:
            self.crl.stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, MeshTrustError):
                await task
        self._tasks.clear()
        if self.sidecar is not None:
            with contextlib.suppress(Exception):
                await self.sidecar.stop()
        for server in reversed(self._servers):
            with contextlib.suppress(Exception):
                await server.stop()
        self._servers.clear()
        if self._status is not None:
            with contextlib.suppress(Exception):
                await self._status.stop()
            self._status = None

    async def run_until(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()
            log.info("agent for %s stopped", self.identity)

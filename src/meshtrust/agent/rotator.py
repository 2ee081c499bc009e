"""The loop that keeps the workload's certificate fresh.

It asks :mod:`meshtrust.agent.rotation` *when* (pure), and does the rest: generate a key,
build a CSR, call the CA with the token (re-read every time) and, once it has one, the
current certificate as client credential; verify the answer; publish it to the cache that
SDS, the Workload API and the files serve from. Errors are logged and counted and never end
the loop (SPIRE: "rotate() errors are logged ... and shouldn't cause the run task to bail").
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from dataclasses import dataclass

from meshtrust.agent.cache import SecretCache, WorkloadSecret
from meshtrust.agent.issuance import CertificateSource, TokenFile, verify_issued
from meshtrust.agent.metrics import AgentMetrics
from meshtrust.agent.rotation import (
    SlotEvent,
    SlotState,
    backoff_delay,
    check_rotation,
    next_state,
    rotation_deadline,
)
from meshtrust.clock import Clock
from meshtrust.durations import format_duration
from meshtrust.errors import InvalidCertificate, MeshTrustError, SvidVerificationError
from meshtrust.pki import KeyType, TrustBundle, build_csr, generate_key
from meshtrust.spiffe import SpiffeId

__all__ = ["RotationPolicy", "Rotator"]

log = logging.getLogger("meshtrust.agent")


@dataclass(frozen=True, slots=True)
class RotationPolicy:
    cert_ttl: dt.timedelta = dt.timedelta(hours=24)
    ratio: float = 0.5
    jitter: float = 0.01
    backoff_base: float = 0.5
    backoff_cap: float = 60.0

    def __post_init__(self) -> None:
        check_rotation(self.ratio, self.jitter)


class Rotator:
    """Owns the workload's key and certificate slot; run it as a task."""

    def __init__(
        self,
        identity: SpiffeId,
        source: CertificateSource,
        token: TokenFile,
        anchors: TrustBundle,
        cache: SecretCache,
        clock: Clock,
        metrics: AgentMetrics,
        policy: RotationPolicy = RotationPolicy(),
        key_type: KeyType = KeyType.EC_P256,
        rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
        self._source = source
        self._token = token
        self._anchors = anchors
        self._cache = cache
        self._clock = clock
        self._metrics = metrics
        self._policy = policy
        self._key_type = key_type
        self._rng = rng or random.Random()
        self.state = SlotState.NONE
        self.deadline: dt.datetime | None = None
        self.last_error: str | None = None
        self._expired_reported = False
        self._renew_requested = False
        #: Set by :meth:`Agent.stop` before it cancels the task.
        self.stopping = False
        self._sleeping_in: asyncio.Task[None] | None = None  # the run task, while it sleeps

    def renew_now(self) -> None:
        """Rotate at once instead of at the deadline (the certificate was revoked)."""
        self._renew_requested = True
        if self._sleeping_in is not None:
            self._sleeping_in.cancel("renew now")

    async def _sleep_until_deadline(self, seconds: float) -> None:
        """Sleep like the clock does (no extra task: the fake clock's tests count sleepers
        and steps), but let :meth:`renew_now` cut it short by cancelling this task."""
        if self._renew_requested:
            self._renew_requested = False
            self.deadline = self._clock.now()
            return
        task = asyncio.current_task()
        self._sleeping_in = task
        try:
            await self._clock.sleep(seconds)
        except asyncio.CancelledError:
            assert task is not None
            # Ours only if nobody else (stop()) cancelled too: then uncancel() leaves 0.
            if not self._renew_requested or task.uncancel() > 0:
                raise
            self._renew_requested = False
            self.deadline = self._clock.now()
        finally:
            self._sleeping_in = None

    def _move(self, event: SlotEvent) -> None:
        new = next_state(self.state, event)
        if new != self.state:
            log.debug("certificate slot %s -> %s (%s)", self.state, new, event)
        self.state = new

    async def run(self) -> None:
        """Forever: issue, sleep until the deadline, rotate; back off on failure."""
        self._move(SlotEvent.START)
        attempt = 0
        while True:
            current = self._cache.current
            now = self._clock.now()
            if current is not None and current.expired(now) and self.state != SlotState.EXPIRED:
                self._move(SlotEvent.EXPIRED)
                self._report_expired(current)
            if self.state == SlotState.VALID:
                assert self.deadline is not None
                if now < self.deadline:
                    await self._sleep_until_deadline((self.deadline - now).total_seconds())
                    continue
                self._move(SlotEvent.DEADLINE)
            try:
                secret = await self._issue_once(current)
            except MeshTrustError as exc:
                if self.stopping:  # grpclib may turn the cancellation into its own error
                    return
                self.last_error = str(exc)
                self._metrics.rotation(ok=False)
                self._move(SlotEvent.FAILED)
                delay = backoff_delay(
                    attempt,
                    self._policy.backoff_base,
                    self._policy.backoff_cap,
                    rand=self._rng.uniform(-1, 1),
                )
                attempt += 1
                if current is not None and not current.expired(self._clock.now()):
                    # Wake up at expiry at the latest, to report it the moment it happens.
                    left = (current.not_after - self._clock.now()).total_seconds()
                    delay = min(delay, max(left, 0.0))
                    log.warning(
                        "certificate renewal failed (attempt %d), still serving serial "
                        "%s valid for %s; retrying in %.1fs: %s",
                        attempt,
                        current.serial_hex,
                        format_duration(current.not_after - now),
                        delay,
                        exc,
                    )
                else:
                    log.warning(
                        "getting a certificate failed (attempt %d); retrying in %.1fs: %s",
                        attempt,
                        delay,
                        exc,
                    )
                await self._clock.sleep(delay)
                continue
            attempt = 0
            self.last_error = None
            self._expired_reported = False
            self._metrics.rotation(ok=True)
            self._move(SlotEvent.ISSUED)
            published = await self._cache.publish(secret)
            self.deadline = rotation_deadline(
                published.not_after,
                published.received_at,
                self._policy.ratio,
                self._policy.jitter,
                rand=self._rng.uniform(-1, 1),
            )
            log.info(
                "certificate for %s serial %s valid until %s; next rotation at %s",
                self.identity,
                published.serial_hex,
                f"{published.not_after:%Y-%m-%d %H:%M:%SZ}",
                f"{self.deadline:%Y-%m-%d %H:%M:%SZ}",
            )

    def _report_expired(self, current: WorkloadSecret) -> None:
        if not self._expired_reported:
            self._expired_reported = True
            log.error(
                "CERTIFICATE EXPIRED: %s serial %s expired at %s and could not be renewed "
                "(%s); peers will refuse it. Still retrying.",
                self.identity,
                current.serial_hex,
                f"{current.not_after:%Y-%m-%d %H:%M:%SZ}",
                self.last_error or "no answer from the CA",
            )

    async def _issue_once(self, current: WorkloadSecret | None) -> WorkloadSecret:
        key = generate_key(self._key_type)
        csr = build_csr(key, self.identity)
        token = self._token_or_none(current)
        now = self._clock.now()
        client_cert = None
        # A revoked certificate authenticates nothing: the token must (the CA says why).
        if current is not None and not current.expired(now) and not current.revoked:
            client_cert = (current.chain_pem(), current.key_pem())
        started = self._clock.monotonic()
        try:
            response = await self._source.sign(
                csr,
                ttl_seconds=int(self._policy.cert_ttl.total_seconds()),
                token=token,
                client_cert=client_cert,
            )
        except MeshTrustError:
            self._metrics.request_done(self._clock.monotonic() - started, ok=False)
            raise
        self._metrics.request_done(self._clock.monotonic() - started, ok=True)
        received = self._clock.now()
        try:
            issued = verify_issued(response, key, self.identity, self._trusted(), received)
        except (SvidVerificationError, InvalidCertificate) as exc:
            self._metrics.refused_response()
            log.error("refusing the CA's answer, not serving it: %s", exc)
            raise
        return WorkloadSecret(
            spiffe_id=self.identity,
            key=key,
            chain=issued.chain,
            roots=issued.roots,
            received_at=received,
        )

    def _trusted(self) -> TrustBundle:
        """The roots an answer must chain to: the mesh bundle once the CA sent one (it may
        hold a new root to sign under), else the roots the agent started with."""
        bundle = self._cache.bundle
        if bundle is None:
            return self._anchors
        return TrustBundle(self._anchors.trust_domain, bundle[1])

    def _token_or_none(self, current: WorkloadSecret | None) -> str | None:
        try:
            return self._token.read()
        except MeshTrustError as exc:
            if current is None or current.expired(self._clock.now()):
                raise
            # The current certificate can still renew itself; say so once per attempt.
            log.info("no usable token (%s); renewing with the current certificate", exc)
            return None

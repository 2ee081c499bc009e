"""The Envoy sidecar, owned by the agent: generated config, launch, supervision, policy.

Theory of operation. At start the agent compiles the workload's inbound policy (Istio YAML
-> mTLS mode + RBAC), writes the inbound listener to an LDS file, writes the bootstrap
(SDS cluster on the agent's socket, the local app cluster, the outbound listeners and their
mTLS clusters) and starts Envoy as its child. Then, every ``poll`` seconds:

* if Envoy has died it is started again (with backoff), from the same files;
* if a policy file changed, the policies are loaded and compiled again; if that works, the
  new listener is written atomically and Envoy picks it up by itself (no restart; open
  connections on unchanged filter chains are untouched). If it fails, the error — naming
  the file, the object and the field — is logged and the previous policy stays in force.

Readiness is Envoy's own (``/ready`` says LIVE), checked on the same beat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meshtrust.agent.rotation import backoff_delay
from meshtrust.clock import Clock
from meshtrust.envoy.process import EnvoyProcess
from meshtrust.envoy.sidecar import (
    SidecarConfig,
    inbound_listeners,
    sidecar_bootstrap,
    sidecar_envoy_args,
    write_lds_file,
)
from meshtrust.errors import EnvoyFailed, InvalidInput
from meshtrust.policy import InboundPolicy, PolicySet, WorkloadRef, load_policy_files
from meshtrust.spiffe import SpiffeId

__all__ = ["EnvoySidecar", "SidecarSettings"]

log = logging.getLogger("meshtrust.agent")


@dataclass(frozen=True)
class SidecarSettings:
    config: SidecarConfig
    policy_files: tuple[Path, ...]
    workdir: Path
    root_namespace: str = "istio-system"
    poll: float = 1.0


def _mtimes(paths: Sequence[Path]) -> tuple[tuple[str, float, int], ...]:
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((str(p), st.st_mtime, st.st_size))
        except OSError:
            out.append((str(p), -1.0, -1))
    return tuple(out)


class EnvoySidecar:
    def __init__(
        self,
        settings: SidecarSettings,
        identity: SpiffeId,
        sds_socket: Path,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.sds_socket = sds_socket
        self.clock = clock
        cfg = settings.config
        self.workload: WorkloadRef = cfg.workload(identity)
        self.lds_path = settings.workdir / "lds" / "listeners.json"
        self.envoy: EnvoyProcess | None = None
        self.policy: InboundPolicy | None = None
        self.policy_version = 0
        self.restarts = 0
        self.live = False
        self.last_policy_error: str | None = None
        self._seen = _mtimes(settings.policy_files)
        # Compiled now, so a bad policy stops the agent before anything runs.
        self._initial_policy = self.compile_policy()

    # -- policy

    def compile_policy(self) -> InboundPolicy:
        """Load every policy file and compile this workload's inbound policy (raises
        PolicyError / ConfigError; nothing is applied then)."""
        policies: PolicySet = load_policy_files(list(self.settings.policy_files))
        return policies.inbound_for(
            self.workload,
            root_namespace=self.settings.root_namespace,
            trust_domain=self.identity.trust_domain.name,
        )

    def _apply(self, policy: InboundPolicy) -> None:
        self.policy_version += 1
        listeners = inbound_listeners(self.settings.config, policy)
        try:
            self.lds_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_lds_file(self.lds_path, listeners, str(self.policy_version))
        except OSError as exc:
            raise EnvoyFailed(f"cannot write Envoy's listener file {self.lds_path}: {exc}") from exc
        self.policy = policy
        log.info(
            "inbound policy v%d for %s: mTLS %s, %d RBAC filter(s)",
            self.policy_version,
            self.workload.name,
            policy.mode,
            len(policy.rbac_filters),
        )

    # -- lifecycle

    async def start(self) -> None:
        """Write the policy and the config, start Envoy; see :meth:`_launch`."""
        self._apply(self._initial_policy)
        cfg = self.settings.config
        bootstrap = sidecar_bootstrap(
            cfg,
            sds_socket=self.sds_socket,
            lds_path=self.lds_path,
            node_id=f"sidecar~127.0.0.1~{cfg.name}.{cfg.namespace}~{cfg.namespace}.svc",
            admin_port=cfg.admin_port,
        )
        self.envoy = EnvoyProcess(
            bootstrap,
            self.settings.workdir,
            name=f"envoy-{cfg.name}",
            extra_args=sidecar_envoy_args(),
        )
        await self._launch()

    async def _launch(self) -> None:
        """Start Envoy and wait until its admin answers (the config was accepted).

        Not until it is LIVE: that needs the first certificate, which may wait for the CA;
        liveness is watched by :meth:`run`.
        """
        envoy = self.envoy
        assert envoy is not None
        await asyncio.to_thread(envoy.start)
        await asyncio.to_thread(envoy.wait_admin, 30)
        log.info(
            "Envoy for %s started (pid %s, admin %s)", self.workload.name, envoy.pid, self.admin_url
        )

    @property
    def admin_url(self) -> str | None:
        if self.envoy is None:
            return None
        with contextlib.suppress(Exception):
            host, port = self.envoy.admin_address
            return f"http://{host}:{port}"
        return None

    async def run(self) -> None:
        """Supervise Envoy and watch the policy files until cancelled."""
        attempt = 0
        while True:
            await self.clock.sleep(self.settings.poll)
            assert self.envoy is not None
            if not self.envoy.running:
                self.live = False
                self.restarts += 1
                log.error(
                    "Envoy for %s exited; restarting it (restart %d). Log tail:\n%s",
                    self.workload.name,
                    self.restarts,
                    self.envoy.log_tail(),
                )
                await asyncio.to_thread(self.envoy.stop)
                try:
                    await self._launch()
                    attempt = 0
                except EnvoyFailed as exc:
                    delay = backoff_delay(attempt, base=1.0, cap=30.0)
                    attempt += 1
                    log.error(
                        "Envoy for %s did not come back: %s; retrying in %.0fs",
                        self.workload.name,
                        exc,
                        delay,
                    )
                    await self.clock.sleep(delay)
                continue
            was_live = self.live
            self.live = await asyncio.to_thread(self._probe_live)
            if self.live and not was_live:
                log.info("Envoy for %s is live", self.workload.name)
            seen = _mtimes(self.settings.policy_files)
            if seen != self._seen:
                self._seen = seen
                self.reload_policy()

    def reload_policy(self) -> bool:
        """Re-read the policy files; apply them if valid. Returns whether they were applied."""
        try:
            policy = self.compile_policy()
        except InvalidInput as exc:
            self.last_policy_error = str(exc)
            log.error("policy not applied, the previous one stays in force: %s", exc)
            return False
        try:
            self._apply(policy)
        except EnvoyFailed as exc:
            self.last_policy_error = str(exc)
            log.error("policy not applied, the previous one stays in force: %s", exc)
            return False
        self.last_policy_error = None
        return True

    def _probe_live(self) -> bool:
        assert self.envoy is not None
        try:
            return self.envoy.admin_get("/ready").strip() == "LIVE"
        except Exception:
            return False

    async def stop(self) -> None:
        self.live = False
        if self.envoy is not None:
            await asyncio.to_thread(self.envoy.stop)

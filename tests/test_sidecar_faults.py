"""Issue #9 points 2 and 4 with the real Envoy: an Envoy never outlives its agent, a restarted
agent stops a leftover Envoy of its workload before starting one (and never signals a pid
that is not that Envoy), two Envoys never share a workload's ports, and a sidecar whose
inbound port is taken by another process is not ready, with a reason a person can act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from meshtrust.agent.cache import SecretCache, WorkloadSecret
from meshtrust.agent.sds import SdsServer
from meshtrust.agent.sidecar import EnvoySidecar, SidecarSettings
from meshtrust.clock import SystemClock
from meshtrust.envoy import EnvoyChild, EnvoyProcess, ProcessLauncher, leftover_envoy
from meshtrust.envoy.sidecar import SidecarConfig, Upstream
from meshtrust.errors import EnvoyFailed
from meshtrust.policy import MtlsMode, PeerAuthentication, PolicySet
from meshtrust.spiffe import SpiffeId
from tests.badcerts import make_ca, svid_leaf
from tests.envoy_helpers import WAIT, sidecar_bootstrap
from tests.fake_envoy import FakePolicies
from tests.processes import free_port
from tests.waiting import async_until, until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
WEB = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
API = SpiffeId.parse("spiffe://example.org/ns/default/sa/api")
STRICT = PolicySet(
    peer_authentications=(PeerAuthentication("default", "default", mode=MtlsMode.STRICT),)
)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short: sockets live here and Unix socket paths are limited to 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="faults-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


# --- point 2: Envoy dies with its agent --------------------------------------------------------

# A stand-in agent: starts Envoy the way the agent does (EnvoyChild, from asyncio), prints
# Envoy's pid, then waits to be killed.
_AGENT = """
import asyncio, sys
from pathlib import Path
from meshtrust.envoy import EnvoyChild, EnvoyProcess
from tests.envoy_helpers import sidecar_bootstrap

async def main() -> None:
    work, port = Path(sys.argv[1]), int(sys.argv[2])
    child = EnvoyChild(EnvoyProcess(sidecar_bootstrap(work / "sds.sock", port), work))
    await child.start()
    print(child.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_envoy_dies_when_its_agent_is_killed(workdir: Path) -> None:
    out = workdir / "agent.out"
    with out.open("wb") as sink:
        agent = subprocess.Popen(
            [sys.executable, "-c", _AGENT, str(workdir), str(free_port())],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    envoy_pid = None
    try:
        until(
            lambda: out.read_text().strip().isdigit() or agent.poll() is not None,
            WAIT,
            "the stand-in agent reports its Envoy",
        )
        assert agent.poll() is None, out.read_text()
        envoy_pid = int(out.read_text())
        assert not gone(envoy_pid)
        agent.kill()  # SIGKILL: the agent cannot clean up; the kernel must
        agent.wait()
        until(lambda: gone(envoy_pid), WAIT, "the Envoy of a SIGKILLed agent exits")
    finally:
        agent.kill()
        agent.wait()
        if envoy_pid is not None and not gone(envoy_pid):
            os.kill(envoy_pid, signal.SIGKILL)


@pytest.mark.asyncio
async def test_a_restarted_agent_stops_the_leftover_envoy_before_starting_its_own(
    workdir: Path,
) -> None:
    bootstrap = sidecar_bootstrap(workdir / "sds.sock", free_port())
    orphan = EnvoyProcess(bootstrap, workdir, name="envoy-web")
    orphan.start()  # the Envoy a killed agent left behind (same files, same workdir)
    try:
        await asyncio.to_thread(orphan.wait_admin, WAIT)
        assert orphan.pid is not None
        assert leftover_envoy(orphan.pid_path, orphan.config_path) == orphan.pid
        successor = EnvoyChild(EnvoyProcess(bootstrap, workdir, name="envoy-web"))
        await successor.start()
        try:
            assert not orphan.running  # stopped before the new one was started
            assert successor.running and successor.pid != orphan.pid
            assert (workdir / "envoy-web.pid").read_text().strip() == str(successor.pid)
            assert successor.admin_url is not None
        finally:
            await successor.stop()
    finally:
        orphan.stop()


def test_a_pid_in_the_pidfile_that_is_not_that_envoy_is_never_signalled(workdir: Path) -> None:
    config = workdir / "envoy-web.json"
    config.write_text("{}")
    # A recycled pid: our own process, but not Envoy running this config.
    other = subprocess.Popen(["sleep", "60"])
    # Even one that names a config called the same in another directory.
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    lookalike = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "-c", str(elsewhere / config.name)]
    )
    try:
        process = EnvoyProcess(
            sidecar_bootstrap(workdir / "sds.sock", 1), workdir, name="envoy-web"
        )
        for pid in (other.pid, lookalike.pid, 1, 999_999_999):
            process.pid_path.write_text(f"{pid}\n")
            assert leftover_envoy(process.pid_path, config) is None
            assert process.stop_leftover() is None
        process.pid_path.write_text("garbage")
        assert process.stop_leftover() is None
        assert other.poll() is None and lookalike.poll() is None  # both still running
    finally:
        other.kill()
        lookalike.kill()
        other.wait()
        lookalike.wait()


# --- point 2: two Envoys never share a workload's ports -------------------------------------


@pytest_asyncio.fixture
async def sds(workdir: Path) -> AsyncIterator[Path]:
    """An SDS server with a valid certificate for web, shared by the sidecars of a test."""
    now = SystemClock().now()  # real time: Envoy checks validity against its own clock
    ca = make_ca("example.org", now=now)
    leaf = svid_leaf(ca.signer, WEB, now=now)
    cache = SecretCache()
    await cache.publish(WorkloadSecret(WEB, leaf.key, tuple(leaf.chain), (ca.root,), now))
    server = SdsServer(cache, workdir / "sds.sock")
    await server.start()
    try:
        yield server.socket_path
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def running(config: SidecarConfig, workdir: Path, sds: Path) -> AsyncIterator[EnvoySidecar]:
    """The agent's sidecar supervisor with the real Envoy launcher, on the real clock."""
    sidecar = EnvoySidecar(
        SidecarSettings(config=config, workdir=workdir, poll=0.1),
        WEB,
        sds,
        launcher=ProcessLauncher(),
        policies=FakePolicies(STRICT),
        clock=SystemClock(),
    )
    try:
        await sidecar.start()
        task = asyncio.create_task(sidecar.run())
        try:
            yield sidecar
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await sidecar.stop()


def web(inbound_port: int, *upstream_ports: int) -> SidecarConfig:
    upstreams = tuple(
        Upstream(f"api{i}", port, "127.0.0.1:1", API) for i, port in enumerate(upstream_ports)
    )
    return SidecarConfig(
        name="web", app_port=free_port(), inbound_port=inbound_port, upstreams=upstreams
    )


@pytest.mark.asyncio
async def test_a_second_envoy_on_a_workloads_outbound_port_fails_to_bind(
    workdir: Path, sds: Path
) -> None:
    config = web(free_port(), free_port())
    local_port = config.upstreams[0].local_port
    cannot_bind = f"cannot bind '127.0.0.1:{local_port}'"
    async with running(config, workdir / "first", sds) as first:
        await async_until(lambda: first.live, 30, "the first sidecar is live")
        try:
            async with running(config, workdir / "second", sds) as second:
                # Envoy may answer on its admin socket a moment before it gives up on the
                # listener it cannot bind; it exits then, and the supervisor's restart
                # fails the same way and says why.
                await async_until(
                    lambda: cannot_bind in (second.not_live_reason or ""), 30, "the reason"
                )
                assert not second.live
        except EnvoyFailed as failure:
            assert cannot_bind in str(failure)
        assert first.live


@pytest.mark.asyncio
async def test_a_second_envoy_on_a_workloads_inbound_port_is_not_ready(
    workdir: Path, sds: Path
) -> None:
    config = web(free_port())
    async with running(config, workdir / "first", sds) as first:
        await async_until(lambda: first.live, 30, "the first sidecar is live")
        async with running(config, workdir / "second", sds) as second:
            await async_until(
                lambda: "inbound listener" in (second.not_live_reason or ""), 30, "not active"
            )
            assert not second.live
        assert first.live


@pytest.mark.asyncio
async def test_a_sidecar_whose_inbound_port_is_taken_is_not_ready_and_says_why(
    workdir: Path, sds: Path
) -> None:
    """Issue #9 point 4: Envoy logs "cannot bind" and still says LIVE; the sidecar must not."""
    holder = socket.socket()  # another process's socket, in effect
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        async with running(web(port), workdir / "web", sds) as sidecar:
            await async_until(
                lambda: (
                    sidecar.not_live_reason is not None and "inbound" in sidecar.not_live_reason
                ),
                30,
                "the sidecar says its inbound listener is not active",
            )
            assert not sidecar.live
            assert sidecar.not_live_reason == (
                f"inbound listener 127.0.0.1:{port} is not active: the port is taken? "
                "(see the Envoy log)"
            )
            assert sidecar.envoy is not None
            assert f"cannot bind '127.0.0.1:{port}'" in sidecar.envoy.log_tail()
            # And Envoy itself says LIVE: the reason readiness cannot be Envoy's /ready alone.
            assert await sidecar.envoy.ready()
            # Once the port is free again, the sidecar binds it and is ready by itself.
            holder.close()
            await async_until(lambda: sidecar.live, 30, "live once the port is free")
            assert sidecar.not_live_reason is None
    finally:
        holder.close()

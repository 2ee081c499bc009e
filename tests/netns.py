"""Several hosts on one machine: network namespaces joined by veth pairs into a bridge.

A :func:`network` of N hosts is N + 1 network namespaces made for one test: one per host,
each with its own loopback and one interface ``eth0`` holding its address from
198.18.0.0/15 (RFC 2544's benchmarking range, never routed), and one namespace holding
only the bridge the hosts' veth peers are enslaved to. Nothing is added to the machine's
own namespace: no interface, no route, no address, so traffic stays between the test's
hosts (and each host's own loopback). Every network is its own layer-2 segment, so two
tests running at once may both use 198.18.0.1 without meeting.

Everything is removed afterwards, even when the test fails: every process still running in
the namespaces is killed, then the namespaces are deleted (which deletes their veths and
the bridge). Namespaces left by a run that was itself killed (``mt<pid>...`` with a dead
pid) are removed by the next run.

Network namespaces need root. CI runs as root; a run that is not root *fails* here with a
hint, because a skipped multi-host test would hide exactly what it exists to check.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["Host", "Network", "network", "require_root"]

SUBNET = ipaddress.ip_network("198.18.0.0/24")
_PREFIX = "mt"
_counter = itertools.count()


def require_root(what: str = "network namespaces") -> None:
    """Fail (not skip) unless running as root, naming what needs it."""
    if os.geteuid() != 0:
        pytest.fail(
            f"{what} need root (CI runs as root): run these tests as root, "
            "e.g. `sudo scripts/test -m netns`",
            pytrace=False,
        )


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Host:
    """One host: a network namespace with ``lo`` and ``eth0`` (:attr:`address`)."""

    name: str
    netns: str
    address: str
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as it runs on this host (``ip netns exec``)."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(
        self, argv: Sequence[str], *, timeout: float = 60.0, **kwargs: object
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` on this host to completion (output captured unless redirected)."""
        kwargs.setdefault("capture_output", True)
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            self.command(argv), timeout=timeout, check=False, **kwargs
        )

    def popen(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``argv`` on this host; the network kills it at the end if it still runs."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            self.command(argv), start_new_session=True, **kwargs
        )
        self._procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Every process running in this host's namespace now."""
        return _pids_in(self.netns)


@dataclass
class Network:
    """The hosts of one test, by name, and the namespace of their bridge."""

    hosts: dict[str, Host]
    bridge_netns: str

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def namespaces(self) -> list[str]:
        return [h.netns for h in self.hosts.values()] + [self.bridge_netns]


def _existing() -> set[str]:
    return {line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale() -> None:
    """Delete namespaces of earlier runs whose process is gone (named ``mt<pid>n<k>...``)."""
    for name in _existing():
        if not name.startswith(_PREFIX):
            continue
        pid_part = name[len(_PREFIX) :].split("n", 1)[0]
        if pid_part.isdigit() and int(pid_part) != os.getpid() and not _alive(int(pid_part)):
            _kill_all_in(name)
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", name)


def _pids_in(netns: str) -> list[int]:
    out = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split()]


def _kill_all_in(netns: str) -> None:
    for pid in _pids_in(netns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _teardown(net: Network) -> None:
    for host in net.hosts.values():
        for proc in host._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
    for netns in net.namespaces():
        # Whatever is still inside (a daemon a test's process left behind) goes too.
        deadline = time.monotonic() + 10
        while _pids_in(netns) and time.monotonic() < deadline:
            _kill_all_in(netns)
            time.sleep(0.05)
        with contextlib.suppress(RuntimeError):
            _ip("netns", "del", netns)


@contextlib.contextmanager
def network(names: Sequence[str]) -> Iterator[Network]:
    """Hosts ``names`` (addresses 198.18.0.1, .2, ... in that order) on one bridge.

    Yields the :class:`Network`; removes every namespace, veth and process afterwards.
    """
    require_root()
    if not names or len(set(names)) != len(names):
        raise ValueError(f"host names must be distinct and at least one: {names!r}")
    _remove_stale()
    tag = f"{_PREFIX}{os.getpid()}n{next(_counter)}"
    bridge_ns = f"{tag}-br"
    addresses = list(itertools.islice(SUBNET.hosts(), len(names)))
    net = Network(
        hosts={
            name: Host(name=name, netns=f"{tag}-{i}", address=str(addresses[i]))
            for i, name in enumerate(names)
        },
        bridge_netns=bridge_ns,
    )
    try:
        _ip("netns", "add", bridge_ns)
        _ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge_ns, "link", "set", "br0", "up")
        for i, host in enumerate(net.hosts.values()):
            _ip("netns", "add", host.netns)
            _ip("-n", host.netns, "link", "set", "lo", "up")
            # The pair is made inside the bridge's namespace with its far end placed straight
            # into the host's: no interface ever appears in the machine's own namespace.
            port = f"p{i}"
            _ip("-n", bridge_ns, "link", "add", port, "type", "veth",
                "peer", "name", "eth0", "netns", host.netns)  # fmt: skip
            _ip("-n", bridge_ns, "link", "set", port, "master", "br0")
            _ip("-n", bridge_ns, "link", "set", port, "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/{SUBNET.prefixlen}",
                "dev", "eth0")  # fmt: skip
            _ip("-n", host.netns, "link", "set", "eth0", "up")
        yield net
    finally:
        _teardown(net)


def netns_exists(name: str) -> bool:
    """Whether a network namespace of that name exists now."""
    return name in _existing() or Path("/run/netns", name).exists()

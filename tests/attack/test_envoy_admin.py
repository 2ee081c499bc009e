"""Issue #9 point 1: another local user cannot reach a sidecar Envoy's admin API (which can
turn on trace logging of request headers, stop Envoy, fail its health checks, dump its
config) nor read its log.

The real Envoy runs in a world-traversable directory with umask 000, so only the modes
meshtrust sets stand in the other user's way.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshtrust.envoy import EnvoyAdmin, EnvoyProcess
from tests.attack.other_user import OtherUser
from tests.envoy_helpers import WAIT, sidecar_bootstrap
from tests.processes import free_port

pytestmark = pytest.mark.slow

_CONNECT = """
import errno, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect({path!r})
    s.sendall(b"POST /logging?level=trace HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 0\\r\\n\\r\\n")
    print("CONNECTED", s.recv(100))
except OSError as exc:
    print(errno.errorcode[exc.errno])
"""


def listening_tcp_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (from its fds and /proc/net/tcp{,6})."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture
def envoy(world_traversable_dir: Path) -> Iterator[tuple[EnvoyProcess, int]]:
    port = free_port()
    bootstrap = sidecar_bootstrap(world_traversable_dir / "sds.sock", port)
    process = EnvoyProcess(bootstrap, world_traversable_dir, name="envoy-web", log_level="info")
    old = os.umask(0)  # the worst umask: every mode below is meshtrust's own doing
    try:
        process.start()
    finally:
        os.umask(old)
    try:
        process.wait_admin(WAIT)
        assert stat.S_IMODE(world_traversable_dir.stat().st_mode) == 0o700  # Envoy's own
        # Open it up again, as an operator's --envoy-workdir might be: only the modes of
        # the socket and files themselves are under test.
        world_traversable_dir.chmod(0o755)
        yield process, port
    finally:
        process.stop()


def test_other_user_cannot_open_the_admin_socket(
    envoy: tuple[EnvoyProcess, int], other_user: OtherUser
) -> None:
    process, listener_port = envoy
    socket_path = process.admin.socket_path
    assert stat.S_ISSOCK(socket_path.stat().st_mode)
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    assert process.admin_address == f"unix://{socket_path}"
    # The agent's user (the owner) uses it...
    assert EnvoyAdmin.at(process.admin_address).text("/server_info") is not None
    # ...another user is refused by the kernel before Envoy sees a byte.
    result = other_user.python(_CONNECT.format(path=str(socket_path)))
    assert result.stdout.decode().strip() == "EACCES", result
    # And there is no TCP admin port to fall back on: the only TCP port Envoy listens on
    # is the listener it was configured with (none while that one waits for its secrets).
    assert listening_tcp_ports(process.pid or 0) <= {listener_port}


def test_other_user_cannot_read_the_envoy_log_or_config(
    envoy: tuple[EnvoyProcess, int], other_user: OtherUser
) -> None:
    process, _ = envoy
    for path in (process.log_path, process.config_path, process.pid_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert process.log_path.stat().st_size > 0  # log level info: Envoy has written to it
    denied = other_user.run(["cat", str(process.log_path)])
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr
    denied = other_user.run(["cat", str(process.config_path)])
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr

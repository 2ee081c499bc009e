"""The multi-host test network itself: hosts reach each other, nothing else, and leave no
trace, even when the test using them fails."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.netns import netns_exists, network

pytestmark = [pytest.mark.slow, pytest.mark.netns]

SERVE_ONCE = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], int(sys.argv[2]))); s.listen()
print("listening", flush=True)
c, peer = s.accept(); c.sendall(("hello " + peer[0]).encode()); c.close()
"""

CONNECT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print(c.recv(100).decode())
"""


def test_two_hosts_talk_over_the_bridge_from_their_own_addresses() -> None:
    with network(["h1", "h2"]) as net:
        h1, h2 = net["h1"], net["h2"]
        assert (h1.address, h2.address) == ("198.18.0.1", "198.18.0.2")
        server = h1.popen(
            [sys.executable, "-c", SERVE_ONCE, h1.address, "15012"], stdout=subprocess.PIPE
        )
        assert server.stdout is not None
        assert server.stdout.readline() == b"listening\n"
        done = h2.run([sys.executable, "-c", CONNECT, h1.address, "15012"], timeout=20)
        assert done.returncode == 0, done.stderr
        assert done.stdout.decode().strip() == "hello 198.18.0.2"
        assert server.wait(timeout=10) == 0


def test_a_host_has_no_route_out_and_its_loopback_is_its_own() -> None:
    with network(["h1"]) as net:
        routes = net["h1"].run(["ip", "route", "show"]).stdout.decode()
        assert "default" not in routes
        assert routes.strip() == "198.18.0.0/24 dev eth0 proto kernel scope link src 198.18.0.1"
        # A server on the machine's own loopback is not reachable from the host's loopback.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            done = net["h1"].run([sys.executable, "-c", CONNECT, "127.0.0.1", str(port)])
            assert done.returncode != 0
            assert b"Connection refused" in done.stderr


def test_everything_is_removed_even_when_the_test_fails() -> None:
    names: list[str] = []
    with pytest.raises(RuntimeError, match="the test failed"):
        with network(["h1", "h2"]) as net:
            names = net.namespaces()
            net["h1"].popen(["sleep", "600"])
            net["h2"].popen(["sh", "-c", "sleep 600 & sleep 600"])  # a child it left behind
            assert all(netns_exists(n) for n in names)
            raise RuntimeError("the test failed")
    assert names and not any(netns_exists(n) for n in names)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "br0" not in links and " p0@" not in links

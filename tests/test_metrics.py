"""The metric families the agent and the CA expose (pure), the merged ``/stats/prometheus``
answer (pure, then from the status server on loopback), and the exposition checked by a
real ``promtool check metrics``."""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import subprocess
import tempfile
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from meshtrust.agent.metrics import AgentMetrics, CrlMetrics
from meshtrust.agent.status import (
    MERGED_STATS,
    StatusServer,
    fetch_unix_http,
    parse_http_response,
    route,
)
from meshtrust.ca import CaMetrics
from meshtrust.metrics_text import CONTENT_TYPE, TextRegistry
from tests.test_prometheus_rules import prometheus_binary

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def _values(text: str) -> dict[str, float]:
    """``{series: value}`` of an exposition (``name{labels}`` as written)."""
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def _types(text: str) -> dict[str, str]:
    return {
        line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE ")
    }


def _agent(held: bool = True) -> tuple[TextRegistry, AgentMetrics]:
    registry = TextRegistry()
    received, not_after = NOW, NOW + dt.timedelta(seconds=60)
    metrics = AgentMetrics(
        registry,
        lambda: 45.0 if held else None,
        lambda: (received, not_after) if held else None,
    )
    return registry, metrics


def test_agent_exposes_the_articles_names_beside_istios() -> None:
    registry, metrics = _agent()
    for ok in (True, True, False):
        metrics.rotation(ok)
    metrics.request_done(0.25, ok=True)
    text = registry.exposition().decode()
    types, values = _types(text), _values(text)
    # The article's names, as its alert rules use them.
    assert types["istio_certificate_expiration_timestamp_seconds"] == "gauge"
    assert types["istio_agent_certificate_rotation_success_total"] == "counter"
    assert types["istio_agent_certificate_rotation_failure_total"] == "counter"
    expiry = 'istio_certificate_expiration_timestamp_seconds{resource_name="default"}'
    assert values[expiry] == (NOW + dt.timedelta(seconds=60)).timestamp()
    assert values["istio_agent_certificate_rotation_success_total"] == 2.0
    assert values["istio_agent_certificate_rotation_failure_total"] == 1.0
    assert values['meshtrust_agent_cert_lifetime_seconds{resource_name="default"}'] == 60.0
    # Istio's own names stay, each with its # TYPE line.
    assert types["istio_agent_cert_expiry_seconds"] == "gauge"
    assert values['istio_agent_cert_expiry_seconds{resource_name="default"}'] == 45.0
    assert types["istio_agent_num_outgoing_requests"] == "untyped"
    assert values['istio_agent_num_outgoing_requests{request_type="csr"}'] == 1.0
    assert set(types) >= {
        "istio_agent_num_failed_outgoing_requests",
        "istio_agent_outgoing_latency",
        "meshtrust_agent_rotations_total",
    }


def test_agent_without_a_certificate_has_no_expiry_series() -> None:
    registry, _ = _agent(held=False)
    text = registry.exposition().decode()
    assert "istio_certificate_expiration_timestamp_seconds" not in text
    assert "istio_agent_cert_expiry_seconds" not in text
    assert "istio_agent_certificate_rotation_failure_total 0.0" in text


@dataclass
class Follower:
    accepted: int = 0
    refused: int = 0
    past: bool = False

    def stale(self, now: dt.datetime) -> bool:
        return self.past


def _crl(revoked: int, next_update: dt.datetime) -> x509.CertificateRevocationList:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.ORGANIZATION_NAME, "cluster.local")])
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(name)
        .last_update(NOW)
        .next_update(next_update)
    )
    for serial in range(1, revoked + 1):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW).build()
        )
    return builder.sign(key, hashes.SHA256())


def test_crl_metrics_follow_what_the_agent_holds() -> None:
    follower = Follower(accepted=3, refused=1)
    held: list[x509.CertificateRevocationList | None] = [None]
    registry = TextRegistry()
    registry.register(CrlMetrics(follower, lambda: held[0], lambda: NOW))
    values = _values(registry.exposition().decode())
    assert values["meshtrust_agent_crl_accepted_total"] == 3.0
    assert values["meshtrust_agent_crl_refused_total"] == 1.0
    assert values["meshtrust_agent_crl_stale"] == 0.0
    assert "meshtrust_agent_crl_next_update_timestamp_seconds" not in values  # none held yet

    next_update = NOW + dt.timedelta(minutes=10)
    held[0] = _crl(2, next_update)
    follower.past = True
    text = registry.exposition().decode()
    values = _values(text)
    assert values["meshtrust_agent_crl_stale"] == 1.0
    assert values["meshtrust_agent_crl_next_update_timestamp_seconds"] == next_update.timestamp()
    assert values["meshtrust_agent_crl_revoked_certificates"] == 2.0
    assert _types(text)["meshtrust_agent_crl_refused_total"] == "counter"


@dataclass
class StillClock:
    """A clock for code that only reads the time (FakeClock advances from a loop)."""

    at: dt.datetime = NOW

    def now(self) -> dt.datetime:
        return self.at

    def monotonic(self) -> float:
        return 0.0

    async def sleep(self, seconds: float) -> None:
        raise AssertionError("not expected to sleep")


def test_ca_exposes_istiods_expiry_seconds_at_its_clock() -> None:
    clock = StillClock()
    registry = TextRegistry()
    metrics = CaMetrics(registry, clock)
    metrics.set_expiries(NOW + dt.timedelta(days=3650), NOW + dt.timedelta(days=365))
    text = registry.exposition().decode()
    types, values = _types(text), _values(text)
    assert types["citadel_server_root_cert_expiry_seconds"] == "gauge"
    assert types["citadel_server_cert_chain_expiry_seconds"] == "gauge"
    assert values["citadel_server_root_cert_expiry_seconds"] == 3650 * 86400.0
    assert values["citadel_server_cert_chain_expiry_seconds"] == 365 * 86400.0
    clock.at += dt.timedelta(days=1)
    values = _values(registry.exposition().decode())
    assert values["citadel_server_cert_chain_expiry_seconds"] == 364 * 86400.0
    assert (
        values["citadel_server_cert_chain_expiry_timestamp"]
        == (NOW + dt.timedelta(days=365)).timestamp()
    )


ENVOY = b"# TYPE envoy_server_live gauge\nenvoy_server_live{} 1\n"


def test_merged_stats_are_the_agents_then_envoys() -> None:
    registry, _ = _agent()
    own = registry.exposition()
    code, ctype, body = route(MERGED_STATS, registry, lambda: True, None, ENVOY, sidecar=True)
    assert (code, ctype) == (200, CONTENT_TYPE)
    assert body.startswith(own)
    assert body.endswith(ENVOY)
    assert b"meshtrust_agent_envoy_stats_up 1.0\n" in body
    # Envoy not answering: the agent's own metrics still, and a gauge saying so.
    body = route(MERGED_STATS, registry, lambda: True, None, None, sidecar=True)[2]
    assert body.startswith(own)
    assert body.endswith(b"meshtrust_agent_envoy_stats_up 0.0\n")
    # No sidecar: the agent's metrics alone.
    assert route(MERGED_STATS, registry, lambda: True, None)[2] == own


def _fetch(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.asyncio
async def test_status_server_fetches_envoys_stats_for_each_merged_scrape() -> None:
    registry, _ = _agent()
    answers: list[bytes | None] = [ENVOY, None]
    calls = 0

    async def envoy_stats() -> bytes | None:
        nonlocal calls
        calls += 1
        return answers[calls - 1]

    srv = StatusServer("127.0.0.1", 0, registry, lambda: True, envoy_stats=envoy_stats)
    await srv.start()
    try:
        code, body = await asyncio.to_thread(_fetch, srv.port, MERGED_STATS)
        assert code == 200 and body.endswith(ENVOY) and body.startswith(registry.exposition())
        code, body = await asyncio.to_thread(_fetch, srv.port, "/metrics")
        assert (code, body) == (200, registry.exposition())  # /metrics never asks Envoy
        assert calls == 1
        code, body = await asyncio.to_thread(_fetch, srv.port, MERGED_STATS + "?x=1")
        assert code == 200 and body.endswith(b"meshtrust_agent_envoy_stats_up 0.0\n")
    finally:
        await srv.stop()


CHUNKED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"19\r\n# TYPE envoy_server_live \r\n6;ext=1\r\ngauge\n\r\n0\r\n\r\n"
)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (CHUNKED, (200, b"# TYPE envoy_server_live gauge\n")),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef", (200, b"abc")),
        (b"HTTP/1.1 503 Service Unavailable\r\n\r\nnot ready", (503, b"not ready")),
    ],
)
def test_parse_http_response(response: bytes, expected: tuple[int, bytes]) -> None:
    assert parse_http_response(response) == expected


@pytest.mark.parametrize(
    "response",
    [
        b"",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1a\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
    ],
)
def test_parse_http_response_refuses_what_is_not_a_whole_answer(response: bytes) -> None:
    with pytest.raises(ValueError):
        parse_http_response(response)


@pytest.mark.asyncio
async def test_fetch_unix_http_reads_a_chunked_answer_from_a_unix_socket() -> None:
    requests: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        for i in range(0, len(CHUNKED), 7):  # in pieces, as a socket may deliver it
            writer.write(CHUNKED[i : i + 7])
            await writer.drain()
        writer.close()

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/admin.sock"
        server = await asyncio.start_unix_server(serve, path)
        try:
            answer = await fetch_unix_http(path, "/stats/prometheus", 5.0)
        finally:
            server.close()
            await server.wait_closed()
        assert answer == (200, b"# TYPE envoy_server_live gauge\n")
        assert requests[0].startswith(b"GET /stats/prometheus HTTP/1.1\r\n")
        with pytest.raises(OSError):  # nobody there
            await fetch_unix_http(path, "/stats/prometheus", 5.0)


def test_promtool_parses_the_agent_and_ca_expositions() -> None:
    """A real Prometheus parser reads what the status ports serve (``promtool check metrics``
    lints names too; a parse error is what must not happen)."""
    registry, metrics = _agent()
    metrics.rotation(True)
    registry.register(CrlMetrics(Follower(), lambda: _crl(1, NOW), lambda: NOW))
    CaMetrics(registry, StillClock()).set_expiries(NOW, NOW)
    body = route(MERGED_STATS, registry, lambda: True, None, ENVOY, sidecar=True)[2]
    done = subprocess.run(
        [prometheus_binary("promtool"), "check", "metrics"],
        input=body,
        capture_output=True,
        timeout=30,
    )
    # Lint findings (Istio's counters without _total) are fine; a parse error is not.
    assert done.returncode in (0, 3), done.stderr  # 3: lint findings only
    assert b"error while linting" not in done.stderr, done.stderr

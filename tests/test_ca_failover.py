"""Agents fail over between CA replicas: the pure policy (which failures hop, in which order),
the real client against real CAs on loopback (several addresses, a name with several
addresses, refusals that must not hop), and the settings that configure it."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from grpclib import GRPCError, Status
from grpclib.server import Server, Stream

from meshtrust.agent.build import build_agent
from meshtrust.agent.config import AgentConfig, load_agent_settings
from meshtrust.ca import (
    CaEvent,
    CaMetrics,
    CaServeConfig,
    GroupCommitLedger,
    SqlLedger,
    init_ca_dir,
    prepare_ca,
)
from meshtrust.ca.assembly import build_authority
from meshtrust.ca.server import CaGrpcService, bind_listener, serve_grpc
from meshtrust.caapi import CaClient, Endpoint, FailoverPolicy, FailureKind
from meshtrust.caapi.istio import ca_grpc, ca_pb2
from meshtrust.clock import SystemClock
from meshtrust.errors import (
    AuthenticationError,
    CAUnavailable,
    ConfigError,
    InvalidCSR,
    MeshTrustError,
    PermissionDenied,
)
from meshtrust.metrics_text import TextRegistry
from meshtrust.pki import KeyType, build_csr, generate_key
from meshtrust.spiffe import SpiffeId, TrustDomain
from tests.conftest import TD, workload_token
from tests.processes import free_port, run_cli
from tests.waiting import async_until

WEB = SpiffeId.for_workload(TD, "default", "web")
NAME = "ca.mesh.test"  # in the replicas' serving certificates; resolved by a test resolver


# --------------------------------------------------------------------------- the pure policy

FAILOVER_TABLE = [
    # Nothing answered: another replica may.
    (FailureKind.CONNECTION, True),
    (FailureKind.TLS, True),
    (FailureKind.TIMEOUT, True),
    (FailureKind.RESOLVE, True),
    # The replica says it cannot serve now (istio-agent retries these codes).
    ("UNAVAILABLE", True),
    ("DEADLINE_EXCEEDED", True),
    ("RESOURCE_EXHAUSTED", True),
    ("INTERNAL", True),
    ("ABORTED", True),
    ("CANCELLED", True),
    # Answers about the request: every replica would give the same one.
    ("UNAUTHENTICATED", False),
    ("PERMISSION_DENIED", False),
    ("INVALID_ARGUMENT", False),
    ("FAILED_PRECONDITION", False),
    ("NOT_FOUND", False),
    ("UNIMPLEMENTED", False),
    ("UNKNOWN", False),
]


@pytest.mark.parametrize(("kind", "hops"), FAILOVER_TABLE)
def test_which_failures_fail_over(kind: str, hops: bool) -> None:
    assert FailoverPolicy.fails_over(kind) is hops


A = Endpoint("10.0.0.1:15012", "10.0.0.1", 15012)
B = Endpoint("10.0.0.2:15012", "10.0.0.2", 15012)
C1 = Endpoint(f"{NAME}:15012", "10.0.0.3", 15012)
C2 = Endpoint(f"{NAME}:15012", "10.0.0.4", 15012)
B_AGAIN = Endpoint("ca-b.mesh.test:15012", "10.0.0.2", 15012)  # another name, same place


@pytest.mark.parametrize(
    ("candidates", "sticky", "max_tries", "expected"),
    [
        ([A, B, C1, C2], None, 8, [A, B, C1, C2]),  # configured order, then resolver order
        ([A, B, C1, C2], C1, 8, [C1, A, B, C2]),  # the one that answered last goes first
        ([A, B, C1], C2, 8, [A, B, C1]),  # the last one is no longer in the record
        ([A, B, B_AGAIN, C1], None, 8, [A, B, C1]),  # one place is tried once per attempt
        ([A, B, C1, C2], C2, 2, [C2, A]),  # bounded
        ([], A, 8, []),
    ],
)
def test_order_of_endpoints_in_one_attempt(
    candidates: list[Endpoint], sticky: Endpoint | None, max_tries: int, expected: list[Endpoint]
) -> None:
    assert FailoverPolicy(max_tries).order(candidates, sticky) == expected


def test_an_endpoint_names_the_address_and_where_it_resolved() -> None:
    assert str(A) == "10.0.0.1:15012"
    assert str(C1) == f"{NAME}:15012 (10.0.0.3)"
    assert C1.name == NAME
    assert Endpoint("[::1]:15012", "::1", 15012).name == "::1"
    assert str(Endpoint("[::1]:15012", "::1", 15012)) == "[::1]:15012"
    with pytest.raises(ValueError):
        FailoverPolicy(0)


# --------------------------------------------------------------------------- real replicas


@dataclass
class Replica:
    """A real CA (TLS, grpclib, its own SQLite ledger) on ``host:port``."""

    host: str
    port: int
    ledger: SqlLedger
    metrics: CaMetrics

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def csrs(self) -> int:
        return self.metrics.count(CaEvent.CSR)


@contextlib.asynccontextmanager
async def replica(
    ca_dir: Path, host: str = "127.0.0.1", port: int = 0, **config: object
) -> AsyncIterator[Replica]:
    """Like tests.conftest.serve_ca, on any loopback address (Linux routes all of
    127.0.0.0/8 to loopback), with its serving certificate also valid for :data:`NAME`."""
    ledger_file = ca_dir.parent / f"ledger-{host}-{port}-{free_port()}.db"
    settings: dict[str, object] = {
        "ca_dir": ca_dir,
        "listen": f"{host}:0",
        "metrics_listen": None,
        "ledger": f"sqlite:///{ledger_file}",
        "server_names": (NAME,),
        "max_ttl": dt.timedelta(days=1),
        **config,
    }
    clock = SystemClock()
    prepared = prepare_ca(CaServeConfig(**settings), clock)  # type: ignore[arg-type]
    sql = SqlLedger(prepared.ledger_url)
    ledger = GroupCommitLedger(sql)
    metrics = CaMetrics(TextRegistry())
    service = CaGrpcService(build_authority(prepared, clock, ledger, metrics))
    sock = bind_listener(host, port, what="test")
    server = await serve_grpc(service, sock, prepared.ssl_context())
    try:
        yield Replica(host, sock.getsockname()[1], sql, metrics)
    finally:
        server.close()
        await server.wait_closed()
        await ledger.aclose()
        sql.close()


class _Answers(ca_grpc.IstioCertificateServiceBase):
    def __init__(self, status: Status) -> None:
        self.status = status
        self.calls = 0

    async def CreateCertificate(
        self, stream: Stream[ca_pb2.IstioCertificateRequest, ca_pb2.IstioCertificateResponse]
    ) -> None:
        self.calls += 1
        await stream.recv_message()
        raise GRPCError(self.status, f"this replica says {self.status.name}")


@contextlib.asynccontextmanager
async def answering(
    ca_dir: Path, status: Status, host: str = "127.0.0.1"
) -> AsyncIterator[tuple[str, _Answers]]:
    """A TLS endpoint with the CA's serving certificate that answers every call ``status``."""
    prepared = prepare_ca(
        CaServeConfig(ca_dir=ca_dir, metrics_listen=None, server_names=(NAME,)), SystemClock()
    )
    service = _Answers(status)
    server = Server([service])
    sock = bind_listener(host, 0, what="test")
    await server.start(sock=sock, ssl=prepared.ssl_context())
    try:
        yield f"{host}:{sock.getsockname()[1]}", service
    finally:
        server.close()
        await server.wait_closed()


def _dead_address(host: str = "127.0.0.1") -> str:
    """An address where nothing listens (connection refused)."""
    return f"{host}:{free_port()}"


def _root(ca_dir: Path) -> bytes:
    return (ca_dir / "root-cert.pem").read_bytes()


async def _sign(client: CaClient, ca_dir: Path, **kwargs: object) -> list[str]:
    return await client.sign(build_csr(generate_key(), WEB), token=workload_token(ca_dir), **kwargs)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_a_dead_address_fails_over_to_the_next_and_the_client_sticks_there(
    ca_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = _dead_address()
    async with replica(ca_dir) as live:
        client = CaClient([dead, live.address], _root(ca_dir))
        token = workload_token(ca_dir)
        with caplog.at_level(logging.WARNING, logger="meshtrust.caapi"):
            await client.sign(build_csr(generate_key(), WEB), token=token)
        assert client.failovers == 1
        assert len(live.ledger.serials()) == 1
        lines = [r.getMessage() for r in caplog.records if r.name == "meshtrust.caapi"]
        assert lines == [f"CA {dead} unavailable (Connection refused); trying {live.address}"]
        assert token not in caplog.text
        # Sticky: the next attempt goes straight to the replica that answered.
        await _sign(client, ca_dir)
        await _sign(client, ca_dir)
        assert client.failovers == 1
        assert len(live.ledger.serials()) == 3


@pytest.mark.asyncio
async def test_when_the_sticky_replica_dies_the_client_moves_on_and_does_not_fall_back(
    ca_dir: Path,
) -> None:
    port_a = free_port()
    async with replica(ca_dir, port=port_a) as a, replica(ca_dir) as b:
        client = CaClient([a.address, b.address], _root(ca_dir))
        await _sign(client, ca_dir)
        assert (a.csrs(), b.csrs(), client.failovers) == (1, 0, 0)
    async with replica(ca_dir) as b2:
        client = CaClient([f"127.0.0.1:{port_a}", b2.address], _root(ca_dir))
        async with replica(ca_dir, port=port_a) as a2:
            await _sign(client, ca_dir)
            assert (a2.csrs(), b2.csrs()) == (1, 0)
        await _sign(client, ca_dir)  # A is gone: B answers, and becomes the sticky one
        assert (b2.csrs(), client.failovers) == (1, 1)
        async with replica(ca_dir, port=port_a) as a3:
            await _sign(client, ca_dir)  # A is back; the client stays on B (pick_first)
            assert (a3.csrs(), b2.csrs(), client.failovers) == (0, 2, 1)


def _refusal(ca_dir: Path, case: str) -> tuple[dict[str, object], type[MeshTrustError]]:
    if case == "UNAUTHENTICATED":
        return {"token": "not-a-token"}, AuthenticationError
    if case == "PERMISSION_DENIED":  # a token for api, a CSR for web
        return {"token": workload_token(ca_dir, "api")}, PermissionDenied
    return {"token": workload_token(ca_dir), "ttl_seconds": 10 * 86400}, InvalidCSR  # over max TTL


@pytest.mark.asyncio
@pytest.mark.parametrize("case", ["UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT"])
async def test_an_answer_from_one_replica_is_not_retried_on_another(
    ca_dir: Path, case: str
) -> None:
    kwargs, error = _refusal(ca_dir, case)
    async with replica(ca_dir) as a, replica(ca_dir) as b:
        client = CaClient([a.address, b.address], _root(ca_dir))
        with pytest.raises(error):
            await client.sign(build_csr(generate_key(), WEB), **kwargs)  # type: ignore[arg-type]
        assert a.csrs() == 1
        assert b.csrs() == 0  # B never heard of it
        assert client.failovers == 0


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("status", "hops"),
    [
        (Status.UNAVAILABLE, True),
        (Status.INTERNAL, True),
        (Status.RESOURCE_EXHAUSTED, True),
        (Status.PERMISSION_DENIED, False),
        (Status.UNIMPLEMENTED, False),
    ],
)
async def test_a_status_answer_hops_only_if_the_policy_says_so(
    ca_dir: Path, status: Status, hops: bool
) -> None:
    async with answering(ca_dir, status) as (first, fake), replica(ca_dir) as live:
        client = CaClient([first, live.address], _root(ca_dir))
        if hops:
            await _sign(client, ca_dir)
            assert (fake.calls, live.csrs(), client.failovers) == (1, 1, 1)
        else:
            with pytest.raises(MeshTrustError, match=f"this replica says {status.name}"):
                await _sign(client, ca_dir)
            assert (fake.calls, live.csrs(), client.failovers) == (1, 0, 0)


@pytest.mark.asyncio
async def test_when_no_replica_answers_one_error_gives_every_reason(ca_dir: Path) -> None:
    dead1, dead2 = _dead_address(), _dead_address()

    async def resolver(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    client = CaClient(
        [dead1, f"gone.mesh.test:{free_port()}", dead2], _root(ca_dir), resolver=resolver
    )
    with pytest.raises(CAUnavailable) as caught:
        await _sign(client, ca_dir)
    message = str(caught.value)
    assert message.startswith("no CA answered (3 tried): ")
    assert f"CA at {dead1} unavailable (UNAVAILABLE): Connection refused" in message
    assert "cannot resolve gone.mesh.test: Name or service not known" in message
    assert f"CA at {dead2} unavailable (UNAVAILABLE): Connection refused" in message


@dataclass
class FakeDns:
    """A resolver for tests: ``records[name]`` is the list of addresses, changeable."""

    records: dict[str, list[str]]
    asked: list[str] = field(default_factory=list)

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.asked.append(host)
        if host not in self.records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.records[host]


@pytest.mark.asyncio
async def test_a_name_with_several_addresses_is_every_one_a_candidate_verified_by_name(
    ca_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """127.0.0.2 is dead, 127.0.0.3 serves; every candidate is verified against the name."""
    port = free_port()
    dns = FakeDns({NAME: ["127.0.0.2", "127.0.0.3"]})
    async with replica(ca_dir, "127.0.0.3", port) as three:
        client = CaClient(f"{NAME}:{port}", _root(ca_dir), resolver=dns)
        with caplog.at_level(logging.WARNING, logger="meshtrust.caapi"):
            await _sign(client, ca_dir)
        assert (three.csrs(), client.failovers) == (1, 1)
        assert (
            f"CA {NAME}:{port} (127.0.0.2) unavailable (Connection refused); "
            f"trying {NAME}:{port} (127.0.0.3)"
        ) in caplog.text
        # The same replica under a name its certificate does not hold is refused, though
        # its certificate names the IP (an IP SAN): TLS checks the name, not the address.
        other = FakeDns({"other.mesh.test": ["127.0.0.3"]})
        with pytest.raises(CAUnavailable, match="other.mesh.test"):
            await _sign(CaClient(f"other.mesh.test:{port}", _root(ca_dir), resolver=other), ca_dir)

        # The record changes: resolved again at the next attempt, the new address is used.
        async with replica(ca_dir, "127.0.0.4", port) as four:
            dns.records[NAME] = ["127.0.0.4"]
            await _sign(client, ca_dir)
            assert (three.csrs(), four.csrs()) == (1, 1)
    assert dns.asked == [NAME, NAME]


@pytest.mark.asyncio
async def test_a_name_that_does_not_resolve_fails_over_to_the_next_address(
    ca_dir: Path,
) -> None:
    async with replica(ca_dir) as live:
        dns = FakeDns({})
        client = CaClient(
            [f"gone.mesh.test:{live.port}", live.address], _root(ca_dir), resolver=dns
        )
        await _sign(client, ca_dir)
        assert live.csrs() == 1
    empty = CaClient(f"{NAME}:15012", _root(ca_dir), resolver=FakeDns({NAME: []}))
    with pytest.raises(CAUnavailable, match=f"cannot resolve {NAME}: {NAME} has no address"):
        await _sign(empty, ca_dir)


@pytest.mark.asyncio
async def test_localhost_resolved_for_real_is_verified_as_localhost(ca_dir: Path) -> None:
    """The system resolver may give ::1 before 127.0.0.1 (the replica listens on the latter
    only): either way the client gets there, checking the name 'localhost'."""
    async with replica(ca_dir) as live:
        client = CaClient(f"localhost:{live.port}", _root(ca_dir))
        await _sign(client, ca_dir)
        assert live.csrs() == 1


@pytest.mark.asyncio
async def test_the_agent_counts_failovers_and_no_failed_renewal(
    ca_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text(workload_token(ca_dir))
    async with replica(ca_dir) as live:
        config = AgentConfig(
            ca_root=ca_dir / "root-cert.pem",
            ca_address=[_dead_address(), live.address],
            token_file=tmp_path / "token",
            output_dir=tmp_path / "certs",
            status_listen=None,
        )
        agent = build_agent(config)
        await agent.start()
        try:
            await async_until(agent.ready)
        finally:
            await agent.stop()
    text = agent.registry.exposition().decode()
    assert "meshtrust_agent_ca_failovers_total 1" in text
    assert 'meshtrust_agent_rotations_total{result="failure"} 0' in text
    assert 'istio_agent_num_failed_outgoing_requests{request_type="csr"} 0' in text


# --------------------------------------------------------------------------- settings


def test_one_address_is_kept_as_written_and_several_as_a_tuple(tmp_path: Path) -> None:
    base = {"ca_root": tmp_path / "root.pem", "output_dir": tmp_path / "out"}
    one = AgentConfig(**base, ca_address="ca:15012")  # type: ignore[arg-type]
    assert one.ca_address == "ca:15012" and one.ca_addresses == ("ca:15012",)
    two = AgentConfig(**base, ca_address=["a:1", "b:2"])  # type: ignore[arg-type]
    assert two.ca_address == ("a:1", "b:2") and two.ca_addresses == ("a:1", "b:2")
    with pytest.raises(ConfigError, match=r"ca-address\[1\]: 'nowhere' is not HOST:PORT"):
        AgentConfig(**base, ca_address=("a:1", "nowhere"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at least one CA address"):
        AgentConfig(**base, ca_address=())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("yaml", "expected"),
    [
        ("ca-address: ca.mesh.test:15012\n", "ca.mesh.test:15012"),
        ("ca-address: [a:1, 'b:2']\n", ("a:1", "b:2")),
        ("ca-address:\n  - a:1\n  - b:2\n", ("a:1", "b:2")),
    ],
)
def test_config_file_takes_one_address_or_a_list(
    tmp_path: Path, yaml: str, expected: object
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml)
    assert load_agent_settings(path) == {"ca_address": expected}


@pytest.mark.parametrize(
    ("yaml", "where"),
    [
        ("ca-address:\n  - a:1\n  - nowhere\n", r"agent.yaml:3: ca-address\[1\]: "),
        ("ca-address: []\n", "agent.yaml:1: ca-address: expected at least one HOST:PORT"),
        ("\nca-address: {a: 1}\n", "agent.yaml:2: ca-address: "),
        ("ca-address: a:0\n", "agent.yaml:1: ca-address: 'a:0' is not HOST:PORT"),
    ],
)
def test_config_file_errors_name_file_line_and_entry(tmp_path: Path, yaml: str, where: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml)
    with pytest.raises(ConfigError, match=where):
        load_agent_settings(path)


@contextlib.contextmanager
def _black_hole() -> Iterator[str]:
    """A port that accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.asyncio
async def test_a_replica_that_never_answers_fails_over_after_the_timeout(ca_dir: Path) -> None:
    with _black_hole() as silent:
        async with replica(ca_dir) as live:
            client = CaClient([silent, live.address], _root(ca_dir), timeout=0.5)
            await _sign(client, ca_dir)
            assert (live.csrs(), client.failovers) == (1, 1)


@pytest.mark.asyncio
async def test_a_replica_of_another_mesh_is_skipped_before_the_token_is_sent(
    ca_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca"
    init_ca_dir(other, TrustDomain.parse("other.org"), SystemClock().now(), KeyType.EC_P256)
    async with replica(other) as stranger, replica(ca_dir) as live:
        client = CaClient([stranger.address, live.address], _root(ca_dir))
        await _sign(client, ca_dir)
        assert (stranger.csrs(), live.csrs(), client.failovers) == (0, 1, 1)


def test_agent_cli_checks_every_repeated_ca_address(tmp_path: Path) -> None:
    got = run_cli(
        "agent",
        *("--ca-address", "127.0.0.1:15012", "--ca-address", "nowhere"),
        *("--ca-root", str(tmp_path / "root.pem"), "--output-dir", str(tmp_path / "out")),
    )
    assert got.returncode == 2
    assert "ca-address[1]: 'nowhere' is not HOST:PORT" in got.stderr
    assert "Traceback" not in got.stderr

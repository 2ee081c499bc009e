"""A CA, one workload's agent and its real Envoy, for revocation end to end (the test and
``benchmarks/revocation.py``): the CA in this event loop (TLS, grpclib, SQLite ledger,
revocations followed from the ledger, CRL stream), the agent built as ``meshtrust agent``
builds it (real CA client, real CRL stream), Envoy's inbound mTLS listener fed by the
agent's SDS, and clients with certificates from the CA doing real TLS handshakes.

With ``sidecar=True`` the Envoy is the agent's own sidecar (``meshtrust agent --sidecar``:
LDS file, drains on revocation, the Envoy options of a real sidecar) in front of a small
HTTP/1.1 app; otherwise a minimal static mTLS listener (tests/envoy_helpers.py)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import http.server
import select
import socket
import ssl
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from meshtrust.agent import AgentConfig
from meshtrust.agent.agent import Agent
from meshtrust.agent.build import build_agent
from meshtrust.ca import init_ca_dir
from meshtrust.ca.assembly import (
    Revocations,
    build_authority,
    prepare_ca,
    start_revocations,
    start_signing,
)
from meshtrust.ca.config import CaServeConfig
from meshtrust.ca.ledger import GroupCommitLedger, SqlLedger
from meshtrust.ca.metrics import CaMetrics
from meshtrust.ca.revocation import POLL_INTERVAL
from meshtrust.ca.server import CaGrpcService, GrpcServer, bind_listener
from meshtrust.caapi import CaClient
from meshtrust.clock import SystemClock
from meshtrust.envoy.process import EnvoyProcess
from meshtrust.metrics_text import TextRegistry
from meshtrust.pki import KeyType, build_csr, generate_key, private_key_pem
from meshtrust.spiffe import SpiffeId, TrustDomain
from tests.conftest import workload_token
from tests.envoy_helpers import sidecar_bootstrap
from tests.processes import free_port

TD = TrustDomain("example.org")


@dataclass(frozen=True)
class Client:
    spiffe_id: SpiffeId
    serial: int
    directory: Path  # chain.pem, key.pem

    def context(self, root_pem: bytes) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=root_pem.decode())
        ctx.check_hostname = False  # an SVID names a SPIFFE ID, not a host
        ctx.load_cert_chain(self.directory / "chain.pem", self.directory / "key.pem")
        return ctx


@dataclass
class Rig:
    workdir: Path
    ca_dir: Path
    address: str
    ledger: SqlLedger
    revocations: Revocations
    agent: Agent
    envoy: EnvoyProcess | None  # None with the agent's sidecar (agent.sidecar.envoy)
    port: int

    @property
    def root_pem(self) -> bytes:
        return (self.ca_dir / "root-cert.pem").read_bytes()

    def token(self, service_account: str) -> str:
        return workload_token(self.ca_dir, service_account)

    async def client(self, service_account: str) -> Client:
        """A certificate from the CA for ``service_account``, as its agent would get it."""
        key = generate_key()
        identity = SpiffeId.for_workload(TD, "default", service_account)
        chain = await CaClient(self.address, self.root_pem).sign(
            build_csr(key, identity), token=self.token(service_account)
        )
        directory = Path(tempfile.mkdtemp(dir=self.workdir))
        (directory / "chain.pem").write_bytes("".join(chain[:-1]).encode())
        (directory / "key.pem").write_bytes(private_key_pem(key))
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        return Client(identity, leaf.serial_number, directory)

    def accepted(self, client: Client, *, sni: str | None = None) -> bool:
        """A new mTLS connection presenting ``client``'s certificate (with SNI ``sni``, as a
        sidecar calling another trust domain sends it), and one request on it: True for
        200, False when Envoy refuses the handshake or closes the connection (blocking;
        call in a thread)."""
        conn = _Connection(
            "127.0.0.1", self.port, sni, context=client.context(self.root_pem), timeout=10
        )
        try:
            conn.request("GET", "/")
            return conn.getresponse().status == 200
        except (ssl.SSLError, OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def open(self, client: Client) -> http.client.HTTPSConnection:
        """A kept-alive connection with one request answered (to see whether it is cut)."""
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=client.context(self.root_pem), timeout=10
        )
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        return conn


class _Connection(http.client.HTTPSConnection):
    """HTTPS to ``address`` that sends SNI ``sni`` (none when None)."""

    def __init__(
        self, address: str, port: int, sni: str | None, *, context: ssl.SSLContext, timeout: float
    ) -> None:
        super().__init__(sni or address, port, context=context, timeout=timeout)
        self._address, self._sni = address, sni

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(  # type: ignore[attr-defined]
            sock, server_hostname=self._sni
        )


def closed_by_server(conn: http.client.HTTPConnection) -> bool:
    """Whether the server has closed ``conn``, an idle kept-alive connection (EOF is
    readable; nothing else may be, since no request is outstanding)."""
    sock = conn.sock
    if sock is None:
        return True
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1) == b""
    except ssl.SSLWantReadError:  # a TLS record without data (a session ticket)
        return False
    except OSError:
        return True


class _Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the sidecar's inbound cluster expects

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("content-length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _HelloServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # Envoy closing or resetting a pooled connection to the app is no error


@contextlib.contextmanager
def hello_app() -> Iterator[int]:
    """A plain HTTP/1.1 app on 127.0.0.1 answering 200 "hello"; yields its port."""
    server = _HelloServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@contextlib.asynccontextmanager
async def revocation_rig(
    workdir: Path, poll: float = POLL_INTERVAL, *, sidecar: bool = False, signing: bool = False
) -> AsyncIterator[Rig]:
    """``signing``: the CA follows the ledger's signing slots (one CRL per live slot)."""
    clock = SystemClock()
    ca_dir = workdir / "ca"
    init_ca_dir(ca_dir, TD, clock.now(), KeyType.EC_P256)
    prepared = prepare_ca(
        CaServeConfig(ca_dir=ca_dir, listen="127.0.0.1:0", metrics_listen=None), clock
    )
    sql = SqlLedger(prepared.ledger_url)
    ledger = GroupCommitLedger(sql)
    slots = start_signing(prepared, sql, clock) if signing else None
    revocations = start_revocations(
        prepared, sql, clock, interval=poll, signing=slots.watch if slots else None
    )
    metrics = CaMetrics(TextRegistry())
    service = CaGrpcService(
        build_authority(
            prepared, clock, ledger, metrics, revocations.watch, slots.watch if slots else None
        )
    )
    sock = bind_listener("127.0.0.1", 0, what="rig")
    address = f"127.0.0.1:{sock.getsockname()[1]}"
    server = GrpcServer([service, revocations.service])
    await server.start(sock=sock, ssl=prepared.ssl_context())
    token = workdir / "backend.token"
    agent: Agent | None = None
    envoy: EnvoyProcess | None = None
    app = contextlib.ExitStack()
    try:
        token.write_text(workload_token(ca_dir, "backend"))
        sds = workdir / "sds.sock"
        port = free_port()
        sidecar_file = None
        if sidecar:
            sidecar_file = workdir / "sidecar.yaml"
            app_port = app.enter_context(hello_app())
            sidecar_file.write_text(f"name: backend\napp_port: {app_port}\ninbound_port: {port}\n")
        agent = build_agent(
            AgentConfig(
                ca_root=ca_dir / "root-cert.pem",
                ca_address=address,
                token_file=token,
                trust_domain=TD,
                namespace="default",
                service_account="backend",
                sds_socket=sds,
                status_listen=None,
                sidecar=sidecar_file,
            )
        )
        await agent.start()
        async with asyncio.timeout(60):
            await agent.cache.wait_newer(0)
            while agent.cache.crl is None:  # the first CRL, before Envoy asks for ROOTCA
                await asyncio.sleep(0.02)
            while agent.sidecar is not None and not agent.sidecar.live:
                await asyncio.sleep(0.05)
        if agent.sidecar is None:
            envoy = EnvoyProcess(sidecar_bootstrap(sds, port), workdir)
            envoy.start()
            await asyncio.to_thread(envoy.wait_ready, 60)
        yield Rig(workdir, ca_dir, address, sql, revocations, agent, envoy, port)
    finally:
        if envoy is not None:
            envoy.stop()
        if agent is not None:
            await agent.stop()
        app.close()
        await server.shutdown()
        if slots is not None:
            await slots.aclose()
        await revocations.aclose()
        await ledger.aclose()
        sql.close()

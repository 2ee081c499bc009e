"""Shared fixtures: a fresh CA directory, and a real CA served in-process on loopback."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
import pytest_asyncio

from meshtrust.ca import (
    CaMetrics,
    CaServeConfig,
    GroupCommitLedger,
    SqlLedger,
    init_ca_dir,
    load_token_signing_key,
    mint_token,
    prepare_ca,
    token_issuer_for,
)
from meshtrust.ca.assembly import build_authority
from meshtrust.ca.server import CaGrpcService, bind_listener, serve_grpc
from meshtrust.caapi.istio import ca_pb2, ca_pb2_grpc
from meshtrust.clock import SystemClock
from meshtrust.metrics_text import TextRegistry
from meshtrust.pki import KeyType
from meshtrust.spiffe import TrustDomain

TD = TrustDomain.parse("example.org")


def workload_token(ca_dir: Path, service_account: str = "web", namespace: str = "default") -> str:
    """A one-hour token from the token issuer of the CA directory ``ca_dir`` (trust domain
    ``TD``) for ``namespace``/``service_account``, as `meshtrust token create` makes one."""
    key = load_token_signing_key(ca_dir)
    assert key is not None
    return mint_token(
        key,
        token_issuer_for(TD),
        namespace,
        service_account,
        SystemClock().now(),
        dt.timedelta(hours=1),
    )


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    init_ca_dir(directory, TD, SystemClock().now(), KeyType.EC_P256)
    return directory


@dataclass
class RunningCa:
    """A real CA (TLS, grpclib, ledger on disk) on 127.0.0.1:<random port>."""

    address: str
    ca_dir: Path
    root_pem: bytes
    ledger: SqlLedger
    metrics: CaMetrics
    service: CaGrpcService

    def token(
        self,
        namespace: str = "default",
        service_account: str = "web",
        *,
        now: dt.datetime | None = None,
        ttl: dt.timedelta = dt.timedelta(hours=1),
        audience: str = "istio-ca",
    ) -> str:
        key = load_token_signing_key(self.ca_dir)
        assert key is not None
        return mint_token(
            key,
            token_issuer_for(TD),
            namespace,
            service_account,
            now or SystemClock().now(),
            ttl,
            audience,
        )

    def channel(self, client_cert: tuple[bytes, bytes] | None = None) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.root_pem,
            private_key=client_cert[1] if client_cert else None,
            certificate_chain=client_cert[0] if client_cert else None,
        )
        return grpc.aio.secure_channel(
            self.address, creds, options=[("grpc.use_local_subchannel_pool", 1)]
        )

    async def call(
        self,
        csr: str,
        token: str | None,
        ttl: int = 0,
        client_cert: tuple[bytes, bytes] | None = None,
    ) -> list[str]:
        """One CreateCertificate; raises grpc.aio.AioRpcError on refusal."""
        async with self.channel(client_cert) as channel:
            stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
            md = [("authorization", f"Bearer {token}")] if token is not None else []
            resp = await stub.CreateCertificate(
                ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=ttl),
                metadata=md,
                timeout=10,
            )
            return list(resp.cert_chain)


@contextlib.asynccontextmanager
async def serve_ca(ca_dir: Path, port: int = 0, **config: object) -> AsyncIterator[RunningCa]:
    """The real CA (TLS, grpclib, ledger on disk) in this event loop, on 127.0.0.1:port."""
    settings: dict[str, object] = {
        "ca_dir": ca_dir,
        "listen": "127.0.0.1:0",
        "metrics_listen": None,
        "max_ttl": dt.timedelta(days=90),
        **config,
    }
    clock = SystemClock()
    prepared = prepare_ca(CaServeConfig(**settings), clock)  # type: ignore[arg-type]
    sql = SqlLedger(prepared.ledger_url)
    ledger = GroupCommitLedger(sql)
    metrics = CaMetrics(TextRegistry())
    service = CaGrpcService(build_authority(prepared, clock, ledger, metrics))
    sock = bind_listener("127.0.0.1", port, what="test")
    bound = sock.getsockname()[1]
    server = await serve_grpc(service, sock, prepared.ssl_context())
    try:
        yield RunningCa(
            address=f"127.0.0.1:{bound}",
            ca_dir=ca_dir,
            root_pem=(ca_dir / "root-cert.pem").read_bytes(),
            ledger=sql,
            metrics=metrics,
            service=service,
        )
    finally:
        await server.shutdown()
        await ledger.aclose()
        sql.close()


@pytest_asyncio.fixture
async def running_ca(ca_dir: Path) -> AsyncIterator[RunningCa]:
    async with serve_ca(ca_dir) as ca:
        yield ca

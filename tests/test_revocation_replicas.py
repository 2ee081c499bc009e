"""A revocation written to the shared ledger (by ``meshtrust ca revoke``) is honoured by
every ``ca serve`` process on it: two replicas, one with two workers, one SQLite ledger."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509

from meshtrust.caapi.istio import ca_pb2, ca_pb2_grpc
from meshtrust.pki import build_csr, format_serial, generate_key, private_key_pem
from meshtrust.spiffe import SpiffeId
from tests.conftest import TD, workload_token
from tests.processes import CaProcess, run_cli

pytestmark = pytest.mark.slow

WEB = SpiffeId.for_workload(TD, "default", "web")


@pytest.fixture
def replicas(ca_dir: Path) -> Iterator[list[CaProcess]]:
    cas = [CaProcess(ca_dir, "--workers", "2"), CaProcess(ca_dir, "--workers", "1")]
    try:
        for ca in cas:
            ca.wait_ready(timeout=60)
        yield cas
    finally:
        for ca in cas:
            ca.stop()


async def call(
    ca: CaProcess, token: str | None, client_cert: tuple[bytes, bytes] | None = None
) -> grpc.StatusCode | list[str]:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(ca.ca_dir / "root-cert.pem").read_bytes(),
        private_key=client_cert[1] if client_cert else None,
        certificate_chain=client_cert[0] if client_cert else None,
    )
    # A new connection each time: the supervisor's workers share the port, each call may
    # land on either.
    async with grpc.aio.secure_channel(
        ca.address, creds, options=[("grpc.use_local_subchannel_pool", 1)]
    ) as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
        md = [("authorization", f"Bearer {token}")] if token else []
        try:
            resp = await stub.CreateCertificate(
                ca_pb2.IstioCertificateRequest(csr=build_csr(generate_key(), WEB)),
                metadata=md,
                timeout=10,
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return list(resp.cert_chain)


async def all_refuse(
    cas: list[CaProcess],
    token: str | None,
    client_cert: tuple[bytes, bytes] | None,
    code: grpc.StatusCode,
) -> None:
    """Every replica (several calls each, to reach every worker) answers ``code``."""
    async with asyncio.timeout(30):
        while True:
            answers = [await call(ca, token, client_cert) for ca in cas for _ in range(6)]
            if all(a == code for a in answers):
                return
            await asyncio.sleep(0.2)


@pytest.mark.asyncio
async def test_every_replica_and_worker_honours_a_revocation_and_a_block(
    replicas: list[CaProcess], ca_dir: Path
) -> None:
    key = generate_key()
    token = workload_token(ca_dir, "web")
    creds = grpc.ssl_channel_credentials(root_certificates=(ca_dir / "root-cert.pem").read_bytes())
    async with grpc.aio.secure_channel(replicas[0].address, creds) as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
        resp = await stub.CreateCertificate(
            ca_pb2.IstioCertificateRequest(csr=build_csr(key, WEB)),
            metadata=[("authorization", f"Bearer {token}")],
            timeout=10,
        )
    chain = list(resp.cert_chain)
    client_cert = ("".join(chain[:-1]).encode(), private_key_pem(key))
    serial = format_serial(x509.load_pem_x509_certificate(chain[0].encode()).serial_number)
    assert isinstance(await call(replicas[1], None, client_cert), list)  # renews, before

    done = run_cli("ca", "revoke", "--ca-dir", str(ca_dir), "--serial", serial)
    assert done.returncode == 0, done.stderr
    await all_refuse(replicas, None, client_cert, grpc.StatusCode.UNAUTHENTICATED)
    assert isinstance(await call(replicas[1], token, client_cert), list)  # its token still works

    blocked = run_cli("ca", "revoke", "--ca-dir", str(ca_dir), "--spiffe-id", str(WEB))
    assert blocked.returncode == 0, blocked.stderr
    await all_refuse(replicas, token, None, grpc.StatusCode.PERMISSION_DENIED)

    lifted = run_cli("ca", "unblock", "--ca-dir", str(ca_dir), "--spiffe-id", str(WEB))
    assert lifted.returncode == 0, lifted.stderr
    async with asyncio.timeout(30):
        while True:
            answers = [await call(ca, token) for ca in replicas for _ in range(4)]
            if all(isinstance(a, list) for a in answers):
                break
            await asyncio.sleep(0.2)
    for ca in replicas:
        assert "Traceback" not in ca.log()

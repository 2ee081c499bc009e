"""A real CA (TLS, grpclib, SQLite ledger) following its signing slots: after an
activation it signs with the new intermediate and returns its chain, and a workload whose
certificate came from the old one still renews with it (the old slot stays trusted)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509

from meshtrust.ca.assembly import PreparedCa, Signing, build_authority, prepare_ca, start_signing
from meshtrust.ca.config import CaServeConfig
from meshtrust.ca.ledger import GroupCommitLedger, SqlLedger
from meshtrust.ca.metrics import CaMetrics
from meshtrust.ca.server import CaGrpcService, GrpcServer, bind_listener
from meshtrust.ca.signing import SlotLedger, switch_to_root
from meshtrust.clock import SystemClock
from meshtrust.metrics_text import TextRegistry
from meshtrust.pki import build_csr, generate_key, private_key_pem
from tests.test_revocation_ca import WEB, Ca

pytestmark = pytest.mark.asyncio


@contextlib.asynccontextmanager
async def serve(ca_dir: Path) -> AsyncIterator[tuple[Ca, Signing, PreparedCa]]:
    clock = SystemClock()
    prepared = prepare_ca(
        CaServeConfig(ca_dir=ca_dir, listen="127.0.0.1:0", metrics_listen=None), clock
    )
    sql = SqlLedger(prepared.ledger_url)
    ledger = GroupCommitLedger(sql)
    metrics = CaMetrics(TextRegistry())
    signing = start_signing(prepared, sql, clock, interval=3600)  # tests poll by hand
    service = CaGrpcService(build_authority(prepared, clock, ledger, metrics, None, signing.watch))
    sock = bind_listener("127.0.0.1", 0, what="test")
    server = GrpcServer([service])
    await server.start(sock=sock, ssl=prepared.ssl_context())
    try:
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        yield Ca(address, ca_dir, sql, metrics, None), signing, prepared  # type: ignore[arg-type]
    finally:
        await server.shutdown()
        await signing.aclose()
        await ledger.aclose()
        sql.close()


def _certs(chain: list[str]) -> list[x509.Certificate]:
    return [c for pem in chain for c in x509.load_pem_x509_certificates(pem.encode())]


async def test_after_an_activation_the_ca_signs_with_the_new_intermediate(ca_dir: Path) -> None:
    async with serve(ca_dir) as (ca, signing, prepared):
        key = generate_key()
        first = await ca.call(build_csr(key, WEB), ca.token())
        old_inter = _certs(first)[1]
        assert old_inter == x509.load_pem_x509_certificate((ca_dir / "ca-cert.pem").read_bytes())
        client_cert = ("".join(first[:-1]).encode(), private_key_pem(key))

        root = prepared.root_signer  # `ca init` mode: the CA holds the root key
        assert root is not None
        generation = await switch_to_root(
            SlotLedger(ca.ledger.engine),
            ca_dir,
            SystemClock().now(),
            trust_domain="example.org",
            root=root,
        )
        assert await signing.watch.poll_once()
        assert signing.watch.current().generation == generation == 2

        # Renewal with the certificate from the old intermediate, no token: accepted.
        renewed = await ca.call(build_csr(generate_key(), WEB), None, client_cert)
        leaf, inter, root_cert = _certs(renewed)
        assert inter != old_inter and inter == signing.watch.current().signer.cert
        leaf.verify_directly_issued_by(inter)
        inter.verify_directly_issued_by(root_cert)
        assert len(renewed) == 3  # leaf, the new intermediate, the root bundle

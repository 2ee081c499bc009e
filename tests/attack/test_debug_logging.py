"""Debug logging never writes a secret: with ``--log-level debug`` the CA (and its forked
workers) log a great deal, but not the bearer token a caller sent — the HTTP/2 header
decoder (hpack) logs every header it decodes at DEBUG, the ``authorization`` one included."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from meshtrust.caapi.istio import ca_pb2, ca_pb2_grpc
from meshtrust.pki import build_csr, generate_key
from meshtrust.spiffe import SpiffeId
from tests.conftest import TD, workload_token
from tests.processes import CaProcess

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("workers", ["1", "2"])
def test_debug_logs_of_the_ca_hold_no_bearer_token(ca_dir: Path, workers: str) -> None:
    token = workload_token(ca_dir)
    ca = CaProcess(ca_dir, "--workers", workers, options=("--log-level", "debug"))
    try:
        ca.wait_ready()
        root = (ca_dir / "root-cert.pem").read_bytes()
        creds = grpc.ssl_channel_credentials(root_certificates=root)
        with grpc.secure_channel(ca.address, creds) as channel:
            stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
            csr = build_csr(generate_key(), SpiffeId.for_workload(TD, "default", "web"))
            for bearer in (token, token[:-4] + "AAAA"):  # accepted, then a forged signature
                try:
                    stub.CreateCertificate(
                        ca_pb2.IstioCertificateRequest(csr=csr),
                        metadata=[("authorization", f"Bearer {bearer}")],
                        timeout=20,
                    )
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        ca.stop()
    log = ca.log()
    signature = token.rsplit(".", 1)[1]
    assert signature not in log and token.split(".")[1] not in log
    assert "AAAA" not in log

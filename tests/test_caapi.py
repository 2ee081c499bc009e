"""The CA's wire contract (meshtrust.caapi): the one client, on a real CA over TLS."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from meshtrust.ca import init_ca_dir
from meshtrust.caapi import CaClient, error_for_status, status_name_for
from meshtrust.clock import SystemClock
from meshtrust.errors import (
    AuthenticationError,
    CAUnavailable,
    ConfigError,
    InvalidCSR,
    MeshTrustError,
    PermissionDenied,
)
from meshtrust.pki import KeyType, build_csr, generate_key, load_certs_pem
from meshtrust.spiffe import SpiffeId, TrustDomain
from tests.conftest import TD, RunningCa
from tests.processes import run_cli

WEB = SpiffeId.for_workload(TD, "default", "web")


@pytest.mark.parametrize(
    "error",
    [
        AuthenticationError("x"),
        PermissionDenied("x"),
        InvalidCSR("x"),
        CAUnavailable("x"),
    ],
)
def test_status_mapping_round_trips(error: MeshTrustError) -> None:
    """What the server answers an error with, the client turns back into the same kind."""
    assert type(error_for_status(status_name_for(error), "x", "ca:1")) is type(error)


@pytest.mark.parametrize("address", ["nohost", "ca:", ":15012", "ca:http", "ca:70000"])
def test_client_refuses_an_address_that_is_not_host_port(address: str) -> None:
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        CaClient(address, b"")


@pytest.mark.asyncio
async def test_client_gets_a_certificate(running_ca: RunningCa) -> None:
    key = generate_key()
    client = CaClient(f"dns:///{running_ca.address}", running_ca.root_pem)
    chain = await client.sign(build_csr(key, WEB), token=running_ca.token(), ttl_seconds=600)
    assert load_certs_pem(chain[0].encode())[0].public_key() == key.public_key()
    assert chain[-1] == running_ca.root_pem.decode()


@pytest.mark.asyncio
async def test_wrong_root_is_one_clear_message(running_ca: RunningCa, tmp_path: Path) -> None:
    """A client trusting another mesh's root hears which CA and which root file, not
    "CERTIFICATE_VERIFY_FAILED ... : OK"."""
    other = tmp_path / "other-ca"
    init_ca_dir(other, TrustDomain("other.org"), SystemClock().now(), KeyType.EC_P256)
    root_file = other / "root-cert.pem"
    client = CaClient(running_ca.address, root_file.read_bytes(), root_source=str(root_file))
    with pytest.raises(CAUnavailable) as caught:
        await client.sign(build_csr(generate_key(), WEB), token=running_ca.token())
    message = str(caught.value)
    assert message.startswith(
        f"the CA at {running_ca.address} presented a certificate that does not chain to "
        f"the trusted root in {root_file}"
    )
    assert "CERTIFICATE_VERIFY_FAILED" not in message


@pytest.mark.asyncio
async def test_wrong_server_name_is_one_clear_message(running_ca: RunningCa) -> None:
    client = CaClient(running_ca.address, running_ca.root_pem, server_name="ca.elsewhere.example")
    with pytest.raises(CAUnavailable, match="not valid for 'ca.elsewhere.example'"):
        await client.sign(build_csr(generate_key(), WEB), token=running_ca.token())


@pytest.mark.asyncio
async def test_cert_request_against_the_wrong_ca_prints_one_line(
    running_ca: RunningCa, tmp_path: Path
) -> None:
    """`meshtrust cert request` with another mesh's root: one line naming the CA and the
    root file, no traceback, no gRPC library log."""
    other = tmp_path / "other-ca"
    init_ca_dir(other, TD, SystemClock().now(), KeyType.EC_P256)
    token_file = tmp_path / "web.token"
    token_file.write_text(running_ca.token())
    got = await asyncio.to_thread(
        run_cli,
        "cert",
        "request",
        "--ca-address",
        running_ca.address,
        "--ca-root",
        str(other / "root-cert.pem"),
        "--token-file",
        str(token_file),
        "--spiffe-id",
        str(WEB),
        "--out-dir",
        str(tmp_path / "web"),
    )
    assert got.returncode == 1
    lines = [line for line in (got.stdout + got.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert f"the CA at {running_ca.address} presented a certificate" in lines[0]
    assert str(other / "root-cert.pem") in lines[0]
    assert not (tmp_path / "web").exists()


def test_agent_and_cert_cli_load_neither_the_ca_nor_grpcio() -> None:
    """The agent's and `cert request`'s code paths import the CA's wire contract only: no CA
    server, no SQLAlchemy ledger, no grpcio C core, no prometheus_client."""
    code = (
        "import sys\n"
        "import meshtrust.agent, meshtrust.agent.agent, meshtrust.cli.cert, meshtrust.cli.agent\n"
        "from meshtrust.caapi import CaClient\n"
        "CaClient('127.0.0.1:15012', b'')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('sqlalchemy', 'grpc', 'prometheus_client') or m == 'meshtrust.ca' "
        "or m.startswith('meshtrust.ca.'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""

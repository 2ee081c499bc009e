"""Bad bytes on the agent's sockets: SDS (Envoy's) and the SPIFFE Workload API.

Anyone who can open a socket can send them. Each gets a gRPC status that says what was
wrong -- INVALID_ARGUMENT for a body that is not the method's message, UNIMPLEMENTED for a
compressed one -- never OK, never a traceback; and bytes that are not HTTP/2 at all end that
connection only, not the server.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from meshtrust.agent.cache import SecretCache
from meshtrust.agent.sds import SdsServer
from meshtrust.agent.workload_api import WorkloadApiServer
from tests.rawgrpc import RawConnection, grpc_frame, raw_call

INVALID_ARGUMENT, UNIMPLEMENTED = 3, 12
STREAM_SECRETS = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets"
FETCH_X509_SVID = "/SpiffeWorkloadAPI/FetchX509SVID"
SPIFFE_HEADER = ((b"workload.spiffe.io", b"true"),)


@dataclass
class AgentSockets:
    sds: str  # unix:PATH
    workload_api: str


@pytest_asyncio.fixture
async def sockets() -> AsyncIterator[AgentSockets]:
    """The agent's two gRPC servers on real Unix sockets, with no certificate yet."""
    directory = Path(tempfile.mkdtemp(prefix="atk-"))  # short: socket paths max 107 bytes
    sds = SdsServer(SecretCache(), directory / "sds.sock")
    workload_api = WorkloadApiServer(SecretCache(), directory / "wl.sock")
    await sds.start()
    await workload_api.start()
    try:
        yield AgentSockets(f"unix:{directory}/sds.sock", f"unix:{directory}/wl.sock")
    finally:
        await workload_api.stop(grace=0.5)
        await sds.stop(grace=0.5)
        shutil.rmtree(directory, ignore_errors=True)


# (id, body, status, message) for each endpoint; the Workload API's request has no fields,
# so only bytes that are not protobuf at all (or not a whole gRPC frame) are malformed there.
SDS_CASES = [
    ("corrupt", grpc_frame(b"\xff\xff\xff"), INVALID_ARGUMENT, "Wire format was corrupt"),
    ("bad-utf8", grpc_frame(b"\x0a\x02\xc3\x28"), INVALID_ARGUMENT, "bad UTF-8"),
    ("truncated", grpc_frame(b"\x0a\x05abcde")[:-2], INVALID_ARGUMENT, "truncated gRPC message"),
    ("compressed", b"\x01" + grpc_frame(b"")[1:], UNIMPLEMENTED, "compressed gRPC messages"),
]
WORKLOAD_API_CASES = [
    ("corrupt", grpc_frame(b"\xff\xff"), INVALID_ARGUMENT, "Wire format was corrupt"),
    ("truncated", grpc_frame(b"\x0a\x05abcde")[:-2], INVALID_ARGUMENT, "truncated gRPC message"),
    ("compressed", b"\x01" + grpc_frame(b"")[1:], UNIMPLEMENTED, "compressed gRPC messages"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "status", "message"), [c[1:] for c in SDS_CASES], ids=[c[0] for c in SDS_CASES]
)
async def test_sds_answers_a_bad_request_with_a_status(
    sockets: AgentSockets,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    status: int,
    message: str,
) -> None:
    """Before, each of these ended the stream with OK (and an AssertionError or
    NotImplementedError in the log)."""
    with caplog.at_level(logging.INFO):
        reply = await raw_call(sockets.sds, None, body, path=STREAM_SECRETS)
    assert reply.status == status, reply
    assert message in reply.message
    assert all(r.exc_info is None for r in caplog.records)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "status", "message"),
    [c[1:] for c in WORKLOAD_API_CASES],
    ids=[c[0] for c in WORKLOAD_API_CASES],
)
async def test_workload_api_answers_a_bad_request_with_a_status(
    sockets: AgentSockets,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    status: int,
    message: str,
) -> None:
    with caplog.at_level(logging.DEBUG):
        reply = await raw_call(
            sockets.workload_api, None, body, path=FETCH_X509_SVID, headers=SPIFFE_HEADER
        )
    assert reply.status == status, reply
    assert message in reply.message
    assert reply.message.startswith("malformed FetchX509SVID request") or status == UNIMPLEMENTED
    assert all(r.exc_info is None for r in caplog.records)


@pytest.mark.asyncio
async def test_workload_api_refuses_a_non_ascii_security_header(sockets: AgentSockets) -> None:
    reply = await raw_call(
        sockets.workload_api,
        None,
        grpc_frame(b""),
        path=FETCH_X509_SVID,
        headers=((b"workload.spiffe.io", b"tr\xc3\xa9ue"),),
    )
    assert reply.status == INVALID_ARGUMENT
    assert "security header missing" in reply.message


@pytest.mark.asyncio
@pytest.mark.parametrize("endpoint", ["sds", "workload_api"])
async def test_unknown_method_is_unimplemented(sockets: AgentSockets, endpoint: str) -> None:
    reply = await raw_call(
        getattr(sockets, endpoint), None, grpc_frame(b""), path="/x.Y/Z", headers=SPIFFE_HEADER
    )
    assert reply.status == UNIMPLEMENTED


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: Bytes that break HTTP/2: each must end its connection, not leave it open and silent.
NOT_HTTP2 = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not the preface
    b"\x00" * 4096,
    PREFACE + b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x",  # DATA on stream 0
    # A frame announcing 16 MiB, far past the maximum frame size, and more than a frame of it.
    PREFACE + b"\xff\xff\xff\x00\x00\x00\x00\x00\x00" + b"x" * 70000,
]


@pytest.mark.asyncio
@pytest.mark.parametrize("endpoint", ["sds", "workload_api"])
async def test_bytes_that_are_not_http2_end_that_connection_only(
    sockets: AgentSockets, caplog: pytest.LogCaptureFixture, endpoint: str
) -> None:
    address = getattr(sockets, endpoint)
    path = address.removeprefix("unix:")
    with caplog.at_level(logging.INFO):
        for garbage in NOT_HTTP2:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(garbage)
            await writer.drain()
            # The server ends the connection.
            await asyncio.wait_for(reader.read(), 10)
            writer.close()
    assert all(r.exc_info is None for r in caplog.records), caplog.text
    # ... and still serves the next client.
    connection = await RawConnection.open(address, None)
    try:
        reply = await connection.call(grpc_frame(b"\xff\xff\xff"), path="/x.Y/Z")
    finally:
        await connection.close()
    assert reply.status == UNIMPLEMENTED

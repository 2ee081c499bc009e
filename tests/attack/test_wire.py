"""Bad bytes on the CA's wire (raw HTTP/2 gRPC frames): a clear status, one log line, no
traceback, the TLS connection still usable for the next request, and a flood cannot fill
the log. Each case runs against the CA in this process and against a real ``ca serve``
with its default worker count."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshtrust.ca import load_token_signing_key, mint_token, token_issuer_for
from meshtrust.ca.refusals import RefusalThrottle
from meshtrust.caapi.istio import ca_pb2
from meshtrust.clock import SystemClock
from meshtrust.pki import build_csr, generate_key
from tests.conftest import TD, RunningCa
from tests.jwt_issuers import WEB
from tests.processes import CaProcess
from tests.rawgrpc import RawConnection, grpc_frame, raw_call

OK, INVALID_ARGUMENT, UNIMPLEMENTED, UNAUTHENTICATED = 0, 3, 12, 16


def _varint(n: int) -> bytes:
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


def _nested_metadata(depth: int) -> bytes:
    """IstioCertificateRequest.metadata (a google.protobuf.Struct) nested ``depth`` deep."""
    inner = b""
    for _ in range(depth):
        value = b"\x2a" + _varint(len(inner)) + inner  # Value.struct_value
        entry = b"\x0a\x01a\x12" + _varint(len(value)) + value  # map entry "a" -> value
        inner = b"\x0a" + _varint(len(entry)) + entry  # Struct.fields
    return b"\x22" + _varint(len(inner)) + inner


MALFORMED = [
    ("corrupt wire format", grpc_frame(b"\xff\xff\xff"), "Wire format was corrupt"),
    ("csr not UTF-8", grpc_frame(b"\x0a\x02\xc3\x28"), "bad UTF-8"),
    ("nesting past the decoder's depth", grpc_frame(_nested_metadata(150)), "MaxDepth"),
    ("truncated frame", grpc_frame(b"\x0a\x05abcde")[:-2], "truncated"),
]


COMPRESSED = b"\x01" + grpc_frame(b"")[1:]  # the compressed flag, no grpc-encoding
NON_ASCII_AUTHORIZATION = [
    b"Bearer \xc3\xa9t\xc3\xa9",
    b"Bearer \xff\xfe",
    b"\xe2\x82\xac Bearer x",
]

#: Every bad request, with the status it gets: (id, body, authorization, status, detail).
BAD_REQUESTS: list[tuple[str, bytes, bytes, int, str]] = [
    *[(name, body, b"Bearer x", INVALID_ARGUMENT, detail) for name, body, detail in MALFORMED],
    ("compressed frame", COMPRESSED, b"Bearer x", UNIMPLEMENTED, "compressed gRPC messages"),
    *[
        (f"authorization {value!r}", grpc_frame(b""), value, UNAUTHENTICATED, "")
        for value in NON_ASCII_AUTHORIZATION
    ],
]


def good_request(ca_dir: Path) -> tuple[bytes, bytes]:
    """A valid CreateCertificate body and authorization header for the CA in ``ca_dir``."""
    key = load_token_signing_key(ca_dir)
    assert key is not None
    token = mint_token(
        key, token_issuer_for(TD), "default", "web", SystemClock().now(), dt.timedelta(hours=1)
    )
    request = ca_pb2.IstioCertificateRequest(csr=build_csr(generate_key(), WEB))
    return grpc_frame(request.SerializeToString()), f"Bearer {token}".encode()


async def bad_then_good(
    address: str, ca_dir: Path, body: bytes, authorization: bytes, status: int, detail: str
) -> None:
    """On one TLS connection: the bad request gets ``status``, then a good one a certificate
    (HTTP/2 allows it: the bad request is one stream's business, not the connection's)."""
    root_pem = (ca_dir / "root-cert.pem").read_bytes()
    connection = await RawConnection.open(address, root_pem)
    try:
        reply = await connection.call(body, authorization=authorization)
        assert (reply.status, detail in reply.message) == (status, True), reply
        good_body, good_authorization = good_request(ca_dir)
        after = await connection.call(good_body, authorization=good_authorization)
        assert after.status == OK, after
        assert b"BEGIN CERTIFICATE" in after.body
        assert not connection.terminated
    finally:
        await connection.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "authorization", "status", "detail"),
    [b[1:] for b in BAD_REQUESTS],
    ids=[b[0] for b in BAD_REQUESTS],
)
async def test_after_a_bad_request_the_connection_serves_the_next_one(
    running_ca: RunningCa,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    authorization: bytes,
    status: int,
    detail: str,
) -> None:
    with caplog.at_level(logging.INFO):
        await bad_then_good(
            running_ca.address, running_ca.ca_dir, body, authorization, status, detail
        )
    refusals = [r for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refusals) == 1, caplog.text
    assert all(r.exc_info is None for r in caplog.records)
    assert len(running_ca.ledger.certificates()) == 1  # the good request's, nothing else


@pytest.mark.asyncio
async def test_compressed_request_is_unimplemented_with_one_log_line(
    running_ca: RunningCa, caplog: pytest.LogCaptureFixture
) -> None:
    """The gRPC spec's answer for a compression the server does not support."""
    with caplog.at_level(logging.INFO):
        reply = await raw_call(
            running_ca.address, running_ca.root_pem, COMPRESSED, authorization=b"Bearer x"
        )
    assert reply.status == UNIMPLEMENTED
    assert reply.message.startswith("compressed gRPC messages are not supported")
    assert [r.exc_info for r in caplog.records] == [None]
    assert "refused a compressed request from 127.0.0.1:" in caplog.records[0].getMessage()
    assert running_ca.ledger.certificates() == []


@pytest.fixture(scope="module")
def ca_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaProcess]:
    """A real ``meshtrust ca serve`` with its default worker count (one per CPU)."""
    from meshtrust.ca import init_ca_dir
    from meshtrust.pki import KeyType

    ca_dir = tmp_path_factory.mktemp("wire") / "ca"
    init_ca_dir(ca_dir, TD, SystemClock().now(), KeyType.EC_P256)
    ca = CaProcess(ca_dir)
    try:
        ca.wait_ready()
        yield ca
    finally:
        ca.stop()
    assert "Traceback" not in ca.log()
    assert "Fatal error" not in ca.log()


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "authorization", "status", "detail"),
    [b[1:] for b in BAD_REQUESTS],
    ids=[b[0] for b in BAD_REQUESTS],
)
async def test_ca_serve_answers_each_bad_request_and_keeps_the_connection(
    ca_process: CaProcess, body: bytes, authorization: bytes, status: int, detail: str
) -> None:
    before = ca_process.log().count("refused")
    await bad_then_good(ca_process.address, ca_process.ca_dir, body, authorization, status, detail)
    log = ca_process.log()
    assert log.count("refused") == before + 1, log
    assert "Traceback" not in log and "Fatal error" not in log


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "detail"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
async def test_malformed_request_is_invalid_argument_with_one_log_line(
    running_ca: RunningCa, caplog: pytest.LogCaptureFixture, body: bytes, detail: str
) -> None:
    with caplog.at_level(logging.INFO):
        reply = await raw_call(
            running_ca.address, running_ca.root_pem, body, authorization=b"Bearer x"
        )
    assert reply.status == INVALID_ARGUMENT
    assert reply.message.startswith("the request is not a valid IstioCertificateRequest")
    assert detail in reply.message
    assert [r.exc_info for r in caplog.records] == [None]  # one line, no traceback
    assert "refused a malformed request from 127.0.0.1:" in caplog.records[0].getMessage()
    assert running_ca.ledger.certificates() == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "authorization",
    [b"Bearer \xc3\xa9t\xc3\xa9", b"Bearer \xff\xfe", b"\xe2\x82\xac Bearer x"],
    ids=["utf-8", "not utf-8", "non-ascii scheme"],
)
async def test_non_ascii_bearer_token_is_unauthenticated(
    running_ca: RunningCa, caplog: pytest.LogCaptureFixture, authorization: bytes
) -> None:
    with caplog.at_level(logging.INFO):
        reply = await raw_call(
            running_ca.address, running_ca.root_pem, grpc_frame(b""), authorization=authorization
        )
    assert reply.status == UNAUTHENTICATED
    assert all(r.exc_info is None for r in caplog.records)
    assert "\xe9" not in caplog.text and "é" not in caplog.text  # the token is never echoed


@pytest.mark.asyncio
async def test_a_flood_of_bad_requests_does_not_fill_the_log(
    running_ca: RunningCa, caplog: pytest.LogCaptureFixture
) -> None:
    burst = RefusalThrottle().burst
    with caplog.at_level(logging.INFO):
        for _ in range(5 * burst):
            reply = await raw_call(
                running_ca.address, running_ca.root_pem, grpc_frame(b"\xff\xff"), authorization=b""
            )
            assert reply.status == INVALID_ARGUMENT
    # One window's worth of lines, two if the flood straddled a window boundary.
    assert burst <= len(caplog.records) <= 2 * burst
    assert all(r.exc_info is None for r in caplog.records)


def test_refusal_throttle_logs_a_burst_per_window_and_says_what_it_left_out() -> None:
    throttle = RefusalThrottle(burst=2, window=10.0)
    assert [throttle.admit(t) for t in (0.0, 1.0, 2.0, 3.0, 9.9)] == [
        (True, 0),
        (True, 0),
        (False, 0),
        (False, 0),
        (False, 0),
    ]
    # The first line of the next window reports the three left out, then counting restarts.
    assert throttle.admit(10.0) == (True, 3)
    assert throttle.admit(11.0) == (True, 0)
    assert throttle.admit(12.0) == (False, 0)
    assert throttle.admit(25.0) == (True, 1)


@pytest.mark.asyncio
async def test_bytes_that_are_not_http2_end_that_tls_connection_only(
    running_ca: RunningCa, caplog: pytest.LogCaptureFixture
) -> None:
    import ssl

    from tests.attack.test_wire_agent import NOT_HTTP2

    host, port = running_ca.address.rsplit(":", 1)
    context = ssl.create_default_context(cadata=running_ca.root_pem.decode())
    context.set_alpn_protocols(["h2"])
    with caplog.at_level(logging.INFO):
        for garbage in NOT_HTTP2:
            reader, writer = await asyncio.open_connection(
                host, int(port), ssl=context, server_hostname="localhost"
            )
            writer.write(garbage)
            await writer.drain()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await asyncio.wait_for(reader.read(), 10)  # ended by the CA
            writer.close()
    assert all(r.exc_info is None for r in caplog.records), caplog.text
    await bad_then_good(
        running_ca.address, running_ca.ca_dir, grpc_frame(b"\xff"), b"", INVALID_ARGUMENT, ""
    )

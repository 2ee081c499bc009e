"""Bad bytes on the CA's wire (raw HTTP/2 gRPC frames): a clear status, one log line, no
traceback, and a flood cannot fill the log."""

from __future__ import annotations

import logging

import pytest

from meshtrust.ca.refusals import RefusalThrottle
from tests.conftest import RunningCa
from tests.rawgrpc import grpc_frame, raw_call

INVALID_ARGUMENT, UNAUTHENTICATED = 3, 16


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
    ("compressed frame", b"\x01" + grpc_frame(b"")[1:], "compressed"),
]


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

"""The CA enforcing revocations it reads from the ledger, and its CRL: built, signed, pushed
on the CA port. A real CA (TLS, grpclib, SQLite ledger) in this event loop, real clients."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509
from google.protobuf import wrappers_pb2

from meshtrust.ca import CaEvent, load_token_signing_key, mint_token
from meshtrust.ca.assembly import Revocations, build_authority, prepare_ca, start_revocations
from meshtrust.ca.cadir import token_issuer_for
from meshtrust.ca.config import CaServeConfig
from meshtrust.ca.crl import CRL_VALIDITY, WATCH_CRL, build_crl, crl_number
from meshtrust.ca.ledger import GroupCommitLedger, SqlLedger
from meshtrust.ca.metrics import CaMetrics
from meshtrust.ca.revocation import Revocation, RevocationState
from meshtrust.ca.server import CaGrpcService, GrpcServer, bind_listener
from meshtrust.caapi.istio import ca_pb2, ca_pb2_grpc
from meshtrust.clock import SystemClock
from meshtrust.metrics_text import TextRegistry
from meshtrust.pki import build_csr, format_serial, generate_key, private_key_pem
from meshtrust.pki.profile import Signer
from meshtrust.spiffe import SpiffeId
from tests import badcerts
from tests.conftest import TD

WEB = SpiffeId.for_workload(TD, "default", "web")
NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


@dataclass
class Ca:
    address: str
    ca_dir: Path
    ledger: SqlLedger
    metrics: CaMetrics
    revocations: Revocations

    def token(self) -> str:
        key = load_token_signing_key(self.ca_dir)
        assert key is not None
        return mint_token(
            key, token_issuer_for(TD), "default", "web", SystemClock().now(), dt.timedelta(hours=1)
        )

    def channel(self, client_cert: tuple[bytes, bytes] | None = None) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(
            root_certificates=(self.ca_dir / "root-cert.pem").read_bytes(),
            private_key=client_cert[1] if client_cert else None,
            certificate_chain=client_cert[0] if client_cert else None,
        )
        return grpc.aio.secure_channel(
            self.address, creds, options=[("grpc.use_local_subchannel_pool", 1)]
        )

    async def call(
        self, csr: str, token: str | None, client_cert: tuple[bytes, bytes] | None = None
    ) -> list[str]:
        async with self.channel(client_cert) as channel:
            stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
            md = [("authorization", f"Bearer {token}")] if token is not None else []
            resp = await stub.CreateCertificate(
                ca_pb2.IstioCertificateRequest(csr=csr), metadata=md, timeout=10
            )
            return list(resp.cert_chain)


@contextlib.asynccontextmanager
async def serve(ca_dir: Path) -> AsyncIterator[Ca]:
    clock = SystemClock()
    prepared = prepare_ca(
        CaServeConfig(ca_dir=ca_dir, listen="127.0.0.1:0", metrics_listen=None), clock
    )
    sql = SqlLedger(prepared.ledger_url)
    ledger = GroupCommitLedger(sql)
    metrics = CaMetrics(TextRegistry())
    # A poll interval no test waits out: tests call poll_once() to pick up a change.
    revocations = start_revocations(prepared, sql, clock, interval=3600)
    service = CaGrpcService(build_authority(prepared, clock, ledger, metrics, revocations.watch))
    sock = bind_listener("127.0.0.1", 0, what="test")
    server = GrpcServer([service, revocations.service])
    await server.start(sock=sock, ssl=prepared.ssl_context())
    try:
        yield Ca(f"127.0.0.1:{sock.getsockname()[1]}", ca_dir, sql, metrics, revocations)
    finally:
        await server.shutdown()
        await revocations.aclose()
        await ledger.aclose()
        sql.close()


def _leaf(chain: list[str]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(chain[0].encode())


async def _issue(ca: Ca) -> tuple[list[str], tuple[bytes, bytes]]:
    key = generate_key()
    chain = await ca.call(build_csr(key, WEB), ca.token())
    return chain, ("".join(chain[:-1]).encode(), private_key_pem(key))


@pytest.mark.asyncio
async def test_a_revoked_certificate_cannot_renew_but_its_token_gets_a_new_one(
    ca_dir: Path,
) -> None:
    async with serve(ca_dir) as ca:
        chain, client_cert = await _issue(ca)
        serial = format_serial(_leaf(chain).serial_number)
        ca.ledger.revoke_serial(serial, x509.ReasonFlags.key_compromise, "ops", "", NOW)
        assert await ca.revocations.watch.poll_once()

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ca.call(build_csr(generate_key(), WEB), None, client_cert=client_cert)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert f"certificate {serial} was revoked at 2026-12-01 12:00:00Z" in (
            err.value.details() or ""
        )
        # What the agent sends: its (revoked) certificate and its token. The token wins.
        renewed = await ca.call(build_csr(generate_key(), WEB), ca.token(), client_cert)
        assert format_serial(_leaf(renewed).serial_number) != serial
        assert ca.metrics.count(CaEvent.ISSUED) == 2


@pytest.mark.asyncio
async def test_a_blocked_identity_gets_nothing_until_unblocked_and_it_is_counted(
    ca_dir: Path,
) -> None:
    async with serve(ca_dir) as ca:
        chain, client_cert = await _issue(ca)
        ca.ledger.revoke_identity(str(WEB), x509.ReasonFlags.key_compromise, "ops", "lost", NOW)
        await ca.revocations.watch.poll_once()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ca.call(build_csr(generate_key(), WEB), ca.token(), client_cert)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"issuance for {WEB} is blocked" in (err.value.details() or "")
        assert "meshtrust ca unblock" in (err.value.details() or "")
        assert ca.metrics.count(CaEvent.BLOCKED) == 1

        ca.ledger.unblock(str(WEB), "ops", "", NOW)
        await ca.revocations.watch.poll_once()
        again = await ca.call(build_csr(generate_key(), WEB), ca.token())
        assert _leaf(again).serial_number != _leaf(chain).serial_number


@pytest.mark.asyncio
async def test_the_crl_is_pushed_on_the_ca_port_signed_by_the_issuing_ca(
    ca_dir: Path,
) -> None:
    issuing = x509.load_pem_x509_certificate((ca_dir / "ca-cert.pem").read_bytes())
    async with serve(ca_dir) as ca:
        chain, _ = await _issue(ca)
        serial = _leaf(chain).serial_number
        async with ca.channel() as channel:  # no client certificate: the CRL is public
            watch = channel.unary_stream(
                WATCH_CRL,
                request_serializer=wrappers_pb2.StringValue.SerializeToString,
                response_deserializer=wrappers_pb2.BytesValue.FromString,
            )
            call = watch(wrappers_pb2.StringValue(value=""), timeout=30)
            stream = call.__aiter__()
            first = x509.load_der_x509_crl((await stream.__anext__()).value)
            assert first.is_signature_valid(issuing.public_key())  # type: ignore[arg-type]
            assert first.issuer == issuing.subject
            assert first.get_revoked_certificate_by_serial_number(serial) is None

            ca.ledger.revoke_serial(
                format_serial(serial), x509.ReasonFlags.key_compromise, "ops", "", NOW
            )
            await ca.revocations.watch.poll_once()
            second = x509.load_der_x509_crl((await stream.__anext__()).value)
            call.cancel()
        assert second.is_signature_valid(issuing.public_key())  # type: ignore[arg-type]
        entry = second.get_revoked_certificate_by_serial_number(serial)
        assert entry is not None
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        assert reason is x509.ReasonFlags.key_compromise
        number = x509.CRLNumber
        assert (
            second.extensions.get_extension_for_class(number).value.crl_number
            > first.extensions.get_extension_for_class(number).value.crl_number
        )
        assert second.next_update_utc is not None and second.last_update_utc is not None
        # As long as the longest certificate (ca serve's --max-ttl, 90 days by default).
        assert second.next_update_utc - second.last_update_utc == dt.timedelta(days=90)


def test_crl_numbers_grow_with_the_revision_whoever_signs_and_when() -> None:
    later = NOW + dt.timedelta(days=365)
    assert crl_number(2, NOW) > crl_number(1, later)  # a newer revision always wins
    assert crl_number(1, later) > crl_number(1, NOW)  # then a later signing


def test_build_crl_lists_each_revocation_and_leaves_out_an_unspecified_reason() -> None:
    ca = badcerts.make_ca("example.org")
    signer: Signer = ca.signer
    state = RevocationState(
        3,
        {
            "0a": Revocation("0a", str(WEB), x509.ReasonFlags.unspecified, NOW),
            "0b": Revocation("0b", str(WEB), x509.ReasonFlags.superseded, NOW),
        },
    )
    crl = build_crl(signer, state, NOW)
    assert crl.is_signature_valid(signer.cert.public_key())  # type: ignore[arg-type]
    plain = crl.get_revoked_certificate_by_serial_number(0x0A)
    assert plain is not None and len(plain.extensions) == 0
    assert crl.get_revoked_certificate_by_serial_number(0x0B) is not None
    assert crl.next_update_utc == NOW + CRL_VALIDITY


@pytest.mark.asyncio
async def test_the_crl_outlives_every_certificate_the_ca_may_sign(ca_dir: Path) -> None:
    """Envoy refuses every handshake against an expired CRL (tests/test_revocation_stale_crl.py):
    so a CRL's nextUpdate lies at least the CA's maximum certificate lifetime ahead, and no
    valid certificate ever meets an expired CRL however long the CA is away."""
    async with serve(ca_dir) as ca:
        crl = ca.revocations.publisher.crl
        assert crl.next_update_utc is not None
        lifetime = crl.next_update_utc - crl.last_update_utc
        assert lifetime >= dt.timedelta(days=90)  # ca serve's default --max-ttl

"""Revocation in the ledger and on the command line: recorded (who, when, why) before it
takes effect, bad input refused with nothing changed, seen by every reader of the ledger."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509

from meshtrust.ca import IssuedRecord, SqlLedger
from meshtrust.ca.revocation import REASONS, parse_reason, parse_serial
from meshtrust.cli import cli
from meshtrust.cli.ca import REASON_NAMES
from meshtrust.clock import SystemClock
from meshtrust.errors import InvalidInput

# The CLI judges "unexpired" by the real clock: the certificates are made around now.
NOW = SystemClock().now().replace(second=0, microsecond=0)
WEB = "spiffe://example.org/ns/shop/sa/web"
API = "spiffe://example.org/ns/shop/sa/api"


def record(
    serial: str, spiffe_id: str = WEB, *, hours: float = 24, at: dt.datetime = NOW
) -> IssuedRecord:
    return IssuedRecord(
        serial=serial,
        spiffe_id=spiffe_id,
        not_before=at - dt.timedelta(minutes=2),
        not_after=at + dt.timedelta(hours=hours),
        key_type="ec-p256",
        requester="system:serviceaccount:shop:web",
        authenticator="jwt",
        issued_at=at,
        cert_pem="-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n",
    )


S1 = "0" * 31 + "1"
S2 = "0" * 31 + "2"
S3 = "0" * 31 + "3"


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = SqlLedger(url)
    ledger.record_batch([record(S1), record(S2), record(S3, API), record("0" * 31 + "4", hours=-1)])
    ledger.close()
    return url


def test_the_reasons_offered_are_rfc_5280s_for_a_leaf() -> None:
    assert tuple(REASONS) == REASON_NAMES
    assert parse_reason("key-compromise") is x509.ReasonFlags.key_compromise
    assert parse_reason("KEYCOMPROMISE") is x509.ReasonFlags.key_compromise
    for bad in ("removeFromCRL", "cACompromise", "stolen", ""):
        with pytest.raises(InvalidInput, match="unknown revocation reason"):
            parse_reason(bad)


@pytest.mark.parametrize(
    ("text", "serial"),
    [("1", S1), ("0x01", S1), ("00:00:01", S1), ("AB" * 20, "ab" * 20), (S2.upper(), S2)],
)
def test_serials_are_read_in_the_forms_people_paste(text: str, serial: str) -> None:
    assert parse_serial(text) == serial


@pytest.mark.parametrize("text", ["", "0x", "xyz", "12 34", "a" * 41, "-1"])
def test_malformed_serials_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="not a hexadecimal serial"):
        parse_serial(text)


def test_revoking_a_serial_records_who_when_why_and_every_reader_sees_it(url: str) -> None:
    writer, reader = SqlLedger(url), SqlLedger(url)
    try:
        before = reader.revocation_revision()
        writer.revoke_serial(S1, x509.ReasonFlags.key_compromise, "ops@host", "leaked", NOW)
        state = reader.revocation_state(NOW)
        assert reader.revocation_revision() == state.revision > before
        rev = state.revocation(S1)
        assert rev is not None
        assert (rev.spiffe_id, rev.reason, rev.actor, rev.why, rev.revoked_at) == (
            WEB,
            x509.ReasonFlags.key_compromise,
            "ops@host",
            "leaked",
            NOW,
        )
        assert state.revocation(S2) is None and state.block(WEB) is None
        assert [(e.actor, e.action) for e in reader.audit_events()][-1] == ("ops@host", "revoke")
    finally:
        writer.close()
        reader.close()


def test_unknown_and_already_revoked_serials_are_errors_that_change_nothing(url: str) -> None:
    ledger = SqlLedger(url)
    try:
        with pytest.raises(InvalidInput, match="no certificate with serial"):
            ledger.revoke_serial(S1[:-1] + "9", x509.ReasonFlags.unspecified, "a", "", NOW)
        assert ledger.revocation_revision() == 0 and ledger.audit_events() == []
        ledger.revoke_serial(S1, x509.ReasonFlags.unspecified, "a", "", NOW)
        with pytest.raises(InvalidInput, match="revoked already"):
            ledger.revoke_serial(S1, x509.ReasonFlags.superseded, "b", "", NOW)
        assert ledger.revocations()[S1].reason is x509.ReasonFlags.unspecified
    finally:
        ledger.close()


def test_revoking_an_identity_revokes_its_live_certs_and_blocks_it_until_unblocked(
    url: str,
) -> None:
    ledger = SqlLedger(url)
    try:
        block, revoked = ledger.revoke_identity(
            WEB, x509.ReasonFlags.key_compromise, "ops", "node lost", NOW
        )
        assert sorted(r.serial for r in revoked) == [S1, S2]  # not the expired one, not api's
        state = ledger.revocation_state(NOW)
        assert set(state.revoked) == {S1, S2}
        assert state.block(WEB) == block
        with pytest.raises(InvalidInput, match="blocked already"):
            ledger.revoke_identity(WEB, x509.ReasonFlags.unspecified, "ops", "", NOW)
        # A replica that had not seen the block yet issued one more: revoked all the same.
        later = NOW + dt.timedelta(seconds=1)
        ledger.record_batch([record("0" * 31 + "5", at=later)])
        assert "0" * 31 + "5" in ledger.revocation_state(later).revoked
        ledger.unblock(WEB, "ops", "rebuilt", later)
        after = ledger.revocation_state(later)
        assert after.block(WEB) is None and set(after.revoked) == {S1, S2}
        assert after.revision > state.revision
        with pytest.raises(InvalidInput, match="is not blocked"):
            ledger.unblock(WEB, "ops", "", later)
        actions = [e.action for e in ledger.audit_events()]
        assert actions == ["block", "unblock"]
    finally:
        ledger.close()


def test_a_certificate_that_lands_after_the_block_was_read_moves_the_revision(url: str) -> None:
    """The race behind a CI failure: a replica signed for ``web`` before it had read the block
    (its issued_at even predates the block) and committed after ``revoke_identity`` looked.
    Without a revocation row nothing changes the revision, so no replica would re-read the
    state and no CRL would ever list it; ``revoke_late`` writes that row, once."""
    ledger, other = SqlLedger(url), SqlLedger(url)
    try:
        ledger.revoke_identity(WEB, x509.ReasonFlags.key_compromise, "ops", "node lost", NOW)
        seen = ledger.revocation_revision()
        signed_before = NOW - dt.timedelta(milliseconds=5)
        ledger.record_batch([record("0" * 31 + "6", at=signed_before), record("0" * 31 + "7", API)])
        assert ledger.revocation_revision() == seen  # the hole: nothing moved
        late = other.revoke_late(NOW)
        assert [(r.serial, r.spiffe_id, r.reason) for r in late] == [
            ("0" * 31 + "6", WEB, x509.ReasonFlags.privilege_withdrawn)
        ]
        assert ledger.revocation_revision() > seen
        assert "0" * 31 + "6" in ledger.revocation_state(NOW).revoked
        assert "0" * 31 + "7" not in ledger.revocation_state(NOW).revoked  # api is not blocked
        assert ledger.revoke_late(NOW) == [] and other.revoke_late(NOW) == []
        assert [e.action for e in ledger.audit_events()] == ["block", "revoke"]
    finally:
        ledger.close()
        other.close()


@pytest.mark.asyncio
async def test_the_watch_revokes_late_certificates_while_a_block_is_in_force(url: str) -> None:
    from meshtrust.ca.revocation import RevocationWatch
    from meshtrust.clock import FakeClock

    ledger = SqlLedger(url)
    try:
        watch = RevocationWatch(ledger, FakeClock(NOW))
        assert await watch.poll_once() is False and not watch.state.blocked
        ledger.record_batch([record("0" * 31 + "8")])
        assert await watch.poll_once() is False  # no block: nothing written, nothing to do
        assert ledger.revoke_late(NOW) == []
        ledger.revoke_identity(WEB, x509.ReasonFlags.key_compromise, "ops", "", NOW)
        assert await watch.poll_once() is True and watch.state.block(WEB) is not None
        ledger.record_batch([record("0" * 31 + "9")])
        assert await watch.poll_once() is True
        assert "0" * 31 + "9" in watch.state.revoked
        assert await watch.poll_once() is False
    finally:
        ledger.close()


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "250"})


def test_cli_revoke_then_certs_list_shows_it(url: str) -> None:
    done = invoke("ca", "revoke", "--ledger", url, "--serial", "0x1", "--reason", "keyCompromise")
    assert done.exit_code == 0, done.output
    assert f"revoked {S1} ({WEB}), reason keyCompromise" in done.output
    listed = invoke("ca", "certs", "list", "--ledger", url, "--json")
    rows = {r["serial"]: r for r in json.loads(listed.output)}
    assert rows[S1]["revoked"]["reason"] == "keyCompromise"
    assert rows[S1]["revoked"]["actor"]  # USER@HOST by default
    assert rows[S2]["revoked"] is None
    table = invoke("ca", "certs", "list", "--ledger", url)
    assert "keyCompromise" in table.output


def test_cli_revoke_identity_and_unblock(url: str) -> None:
    done = invoke("ca", "revoke", "--ledger", url, "--spiffe-id", WEB, "--actor", "me")
    assert done.exit_code == 0, done.output
    assert "revoked 2 unexpired certificate(s)" in done.output
    undone = invoke("ca", "unblock", "--ledger", url, "--spiffe-id", WEB)
    assert undone.exit_code == 0, undone.output
    assert f"unblocked {WEB}" in undone.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--serial", "99"], "no certificate with serial"),
        (["--serial", "zz"], "not a hexadecimal serial"),
        (["--serial", "1", "--reason", "stolen"], "unknown revocation reason"),
        (["--spiffe-id", "spiffe://Example.org/x"], "spiffe://Example.org/x"),
        (["--spiffe-id", "web"], "'web'"),
        ([], "exactly one of --serial and --spiffe-id"),
        (["--serial", "1", "--spiffe-id", WEB], "exactly one of"),
    ],
)
def test_cli_bad_input_is_a_clear_error_and_changes_nothing(
    url: str, args: list[str], message: str
) -> None:
    result = invoke("ca", "revoke", "--ledger", url, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    ledger = SqlLedger(url)
    try:
        assert ledger.revocation_revision() == 0 and ledger.audit_events() == []
    finally:
        ledger.close()

"""PostgreSQL stopped under a running mesh: the CA refuses renewals with UNAVAILABLE (its
reason names the ledger; see tests/test_ca_ledger_postgres.py), while a real ``meshtrust
agent`` keeps serving the certificate it holds — ready, the same valid certificate in its
files — and renews as soon as the ledger is back, before that certificate expires."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509

from meshtrust.pki import format_serial
from tests.postgres import postgres_server
from tests.processes import CaProcess, free_port
from tests.test_ca_failover import NAME
from tests.test_ca_failover_postgres import AgentProcess, _ledger_serials
from tests.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

TTL = dt.timedelta(seconds=40)  # renewal at about 20 s: the outage falls on it, well before expiry
FAILED = 'meshtrust_agent_rotations_total{result="failure"}'


def _served(agent: AgentProcess, work: Path) -> x509.Certificate:
    pem = (work / "certs" / "cert-chain.pem").read_bytes()
    return x509.load_pem_x509_certificates(pem)[0]


def test_postgresql_stopped_agents_keep_serving_and_renew_when_it_returns(
    ca_dir: Path, tmp_path: Path
) -> None:
    with postgres_server() as own:  # a server of its own: this test stops it
        url = own.create_database("ledger")
        port = free_port()
        ca = CaProcess(ca_dir, "--ledger", url, "--workers", "1", "--server-name", NAME, port=port)
        agent: AgentProcess | None = None
        work = tmp_path / "agent"
        try:
            ca.wait_ready(timeout=60)
            agent = AgentProcess(ca_dir, work, port, hosts=["127.0.0.1"], ttl=TTL)
            until(agent.ready, 60, "agent ready")
            until(lambda: len(agent.serials()) >= 1, 30, "first certificate")
            # The files follow the log line "serial ... valid until" a moment later.
            until(lambda: (work / "certs" / "cert-chain.pem").exists(), 30, "the files")
            held = _served(agent, work)
            failed_before = agent.metric(FAILED)

            own.stop("immediate")
            until(lambda: agent.metric(FAILED) > failed_before, 60, "a renewal refused")
            # Still serving: ready, the same certificate, not yet expired.
            assert agent.ready()
            now = dt.datetime.now(dt.UTC)
            still = _served(agent, work)
            assert still.serial_number == held.serial_number
            assert still.not_valid_after_utc > now
            status, body = agent.get("/debug/status")
            assert status == 200 and "ledger" in body, body

            own.start()
            # The files follow the log line "serial ... valid until" a moment later.
            until(
                lambda: _served(agent, work).serial_number != held.serial_number,
                60,
                "renewed once the ledger is back",
            )
            renewed = _served(agent, work)
            assert agent.ready()
            log = agent.log()
        finally:
            if agent is not None:
                agent.stop()
            ca.stop()
        assert "CERTIFICATE EXPIRED" not in log, log
        assert "Traceback" not in ca.log()
        _, in_ledger = _ledger_serials(url)
        both = {format_serial(held.serial_number), format_serial(renewed.serial_number)}
        assert both <= in_ledger

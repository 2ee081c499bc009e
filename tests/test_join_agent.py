"""``meshtrust agent --join FILE``: the trust bundle, CA address and first token come from the
join file; the agent's identity must be one the file grants; an expired file is refused at
start; and a real agent process renews with its certificate after the file expired."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from meshtrust.agent.build import build_agent
from meshtrust.agent.config import AgentConfig, load_agent_settings
from meshtrust.ca import SqlLedger, init_ca_dir
from meshtrust.ca.authn import LEEWAY
from meshtrust.ca.join import create_join_file
from meshtrust.ca.ledger import default_ledger_url
from meshtrust.clock import FakeClock, SystemClock
from meshtrust.errors import ConfigError
from meshtrust.joinfile import load_join_file
from meshtrust.pki import KeyType
from meshtrust.spiffe import SpiffeId
from tests.conftest import TD
from tests.processes import MESHTRUST, CaProcess, free_port

WEB = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
API = SpiffeId.parse("spiffe://example.org/ns/default/sa/api")


def make_join(
    ca_dir: Path,
    tmp_path: Path,
    identities: tuple[SpiffeId, ...] = (WEB, API),
    *,
    address: str = "198.18.0.1:15012",
    now: dt.datetime | None = None,
    ttl: dt.timedelta = dt.timedelta(hours=1),
) -> Path:
    out = tmp_path / "h2.join"
    create_join_file(ca_dir, identities, [address], ttl, now or SystemClock().now(), out, host="h2")
    return out


def config(join: Path, tmp_path: Path, **extra: object) -> AgentConfig:
    settings: dict[str, object] = {
        "join": join,
        "sds_socket": tmp_path / "sds.sock",
        "status_listen": None,
        **extra,
    }
    return AgentConfig(**settings)  # type: ignore[arg-type]


def test_agent_takes_roots_address_token_and_identity_from_the_join_file(
    ca_dir: Path, tmp_path: Path
) -> None:
    path = make_join(ca_dir, tmp_path, (WEB,))
    agent = build_agent(config(path, tmp_path), clock=FakeClock(SystemClock().now()))
    assert agent.identity == WEB  # the file's only identity
    assert agent.anchors.trust_domain == TD
    assert agent.token.read() == load_join_file(path).token
    assert agent.source.address == "198.18.0.1:15012"  # type: ignore[attr-defined]


def test_identity_must_be_one_the_join_file_grants(ca_dir: Path, tmp_path: Path) -> None:
    path = make_join(ca_dir, tmp_path)
    chosen = config(path, tmp_path, namespace="default", service_account="api")
    assert build_agent(chosen, clock=FakeClock(SystemClock().now())).identity == API
    with pytest.raises(ConfigError, match="grants 2 identities"):
        build_agent(config(path, tmp_path))
    other = config(path, tmp_path, namespace="default", service_account="db")
    with pytest.raises(ConfigError, match=r"sa/db, which the join file for host h2 does not"):
        build_agent(other)


def test_expired_join_file_without_a_certificate_is_refused(ca_dir: Path, tmp_path: Path) -> None:
    path = make_join(ca_dir, tmp_path)
    later = FakeClock(load_join_file(path).expires_at + dt.timedelta(seconds=1))
    with pytest.raises(ConfigError, match="for host h2 expired at .* no certificate yet"):
        build_agent(config(path, tmp_path), clock=later)


def test_join_replaces_ca_root_and_token_file(ca_dir: Path, tmp_path: Path) -> None:
    path = make_join(ca_dir, tmp_path)
    with pytest.raises(ConfigError, match="drop --ca-root"):
        config(path, tmp_path, ca_root=ca_dir / "root-cert.pem")
    with pytest.raises(ConfigError, match="drop --ca-root/--token-file"):
        config(path, tmp_path, token_file=tmp_path / "t")
    with pytest.raises(ConfigError, match="or --join"):
        AgentConfig(sds_socket=tmp_path / "s")


def test_join_in_agent_yaml(tmp_path: Path) -> None:
    (tmp_path / "agent.yaml").write_text("join: h2.join\nsds-socket: sds.sock\n")
    assert load_agent_settings(tmp_path / "agent.yaml")["join"] == tmp_path / "h2.join"


@pytest.mark.slow
def test_agent_process_joins_then_renews_with_its_certificate_after_expiry(
    tmp_path: Path,
) -> None:
    """The join file expires 15 s after it is made (the CA allows LEEWAY more); the agent's
    20 s certificates renew every ~10 s; renewals after that are by client certificate."""
    real = SystemClock().now().replace(microsecond=0)
    ca_dir = tmp_path / "ca"
    init_ca_dir(ca_dir, TD, real - dt.timedelta(hours=1), KeyType.EC_P256)
    ca = CaProcess(ca_dir)
    agent: subprocess.Popen[bytes] | None = None
    log = tmp_path / "agent.log"
    try:
        ca.wait_ready()
        made = real - dt.timedelta(minutes=30)
        path = make_join(
            ca_dir,
            tmp_path,
            (WEB, API),
            address=ca.address,
            now=made,
            ttl=dt.timedelta(minutes=30, seconds=15),
        )
        expires = load_join_file(path).expires_at
        with log.open("wb") as out:
            agent = subprocess.Popen(
                [
                    *MESHTRUST, "agent", "--join", str(path),
                    "--namespace", "default", "--service-account", "web",
                    "--output-dir", str(tmp_path / "certs"), "--cert-ttl", "20s",
                    "--status-listen", f"127.0.0.1:{free_port()}",
                ],
                stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        ledger = SqlLedger(default_ledger_url(ca_dir))
        try:
            after = expires + LEEWAY + dt.timedelta(seconds=1)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                assert agent.poll() is None, log.read_text()
                rows = ledger.certificates(spiffe_id=str(WEB))
                if any(r.issued_at > after for r in rows):
                    break
                time.sleep(0.5)
            else:
                raise AssertionError(f"no renewal after the join file expired:\n{log.read_text()}")
            rows = sorted(rows, key=lambda r: r.issued_at)
        finally:
            ledger.close()
        assert rows[0].authenticator == "join"
        assert rows[0].requester.startswith("host h2 (join ")
        late = [r for r in rows if r.issued_at > after]
        assert late and {r.authenticator for r in late} == {"client-cert"}
        assert (tmp_path / "certs" / "cert-chain.pem").exists()
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(20)
        ca.stop()
    assert "Traceback" not in log.read_text()

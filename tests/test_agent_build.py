"""``build_agent``: what the agent reads at start, and the clear refusals when it is wrong
(before any socket is opened or any Envoy launched)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from meshtrust.agent.build import PolicyFiles, build_agent
from meshtrust.agent.config import AgentConfig
from meshtrust.clock import FakeClock
from meshtrust.errors import ConfigError, PolicyError
from meshtrust.spiffe import SpiffeId
from tests import badcerts
from tests.fake_envoy import FakeEnvoy, FakeLauncher

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def _config(tmp_path: Path, **extra: object) -> AgentConfig:
    ca = badcerts.make_ca("example.org", now=T0)
    root = tmp_path / "root-cert.pem"
    if not root.exists():
        root.write_bytes(badcerts.cert_pem(ca.root))
    settings: dict[str, object] = {
        "ca_root": root,
        "namespace": "default",
        "service_account": "web",
        "sds_socket": tmp_path / "sds.sock",
        "status_listen": None,
        **extra,
    }
    return AgentConfig(**settings)  # type: ignore[arg-type]


def test_identity_and_trust_domain_come_from_the_files(tmp_path: Path) -> None:
    agent = build_agent(_config(tmp_path), clock=FakeClock(T0))
    assert agent.identity == SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
    assert agent.anchors.trust_domain.name == "example.org"
    assert agent.sidecar is None


def test_missing_ca_root_names_the_file(tmp_path: Path) -> None:
    config = _config(tmp_path, ca_root=tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match=r"--ca-root .*nope\.pem: No such file"):
        build_agent(config)


def test_ca_root_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="--ca-root"):
        build_agent(_config(tmp_path, ca_root=bad))


def test_sidecar_for_another_namespace_is_refused(tmp_path: Path) -> None:
    sidecar = tmp_path / "sidecar.yaml"
    sidecar.write_text("name: web\nnamespace: shop\napp_port: 8080\ninbound_port: 15006\n")
    launcher = FakeLauncher(FakeEnvoy(FakeClock(T0)))
    with pytest.raises(ConfigError, match="namespace 'shop'"):
        build_agent(_config(tmp_path, sidecar=sidecar), launcher=launcher)
    assert launcher.prepared == []


def test_bad_policy_file_is_refused_before_anything_starts(tmp_path: Path) -> None:
    sidecar = tmp_path / "sidecar.yaml"
    sidecar.write_text("name: web\napp_port: 8080\ninbound_port: 15006\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: p, namespace: default}\nspec: {mtls: {mode: SOMETIMES}}\n"
    )
    launcher = FakeLauncher(FakeEnvoy(FakeClock(T0)))
    with pytest.raises(PolicyError, match="policy.yaml"):
        build_agent(_config(tmp_path, sidecar=sidecar, policy_files=(policy,)), launcher=launcher)
    assert launcher.prepared == [] and not (tmp_path / "sds.sock").exists()


def test_policy_files_notice_edits_and_missing_files(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("")
    files = PolicyFiles([policy])
    assert not files.changed()
    files.load()
    policy.write_text("# edited\n")
    assert files.changed()
    files.load()
    assert not files.changed()
    policy.unlink()
    assert files.changed()
    with pytest.raises(PolicyError):
        files.load()

"""deploy/kubernetes against a real kube-apiserver: every manifest is accepted by
``kubectl apply --dry-run=server`` (schema, defaults and admission, nothing stored), with the
generators' inputs made the way docs/kubernetes.md says (``meshtrust ca init``,
``meshtrust injector cert``)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.kube import REPO, KubeApiServer, kube_apiserver, kubectl_binary
from tests.processes import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.kube]
DEPLOY = REPO / "deploy" / "kubernetes"


@pytest.fixture(scope="module")
def kube() -> Iterator[KubeApiServer]:
    with kube_apiserver() as server:
        yield server


def _kubectl(kube: KubeApiServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(kubectl_binary()), "--kubeconfig", str(kube.kubeconfig), *args],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "HOME": str(kube.root)},  # kubectl's cache dir: the fixture's
    )  # fmt: skip


@pytest.fixture
def deploy_dir(tmp_path: Path) -> Path:
    """A copy of deploy/kubernetes with the generators' (secret) inputs made for a test CA."""
    out = tmp_path / "kubernetes"
    shutil.copytree(DEPLOY, out)
    done = run_cli("ca", "init", "--dir", str(tmp_path / "ca"), "--trust-domain", "cluster.local")
    assert done.returncode == 0, done.stderr
    (out / "cacerts").mkdir()
    for name in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"):
        shutil.copy(tmp_path / "ca" / name, out / "cacerts" / name)
    (out / "ledger.env").write_text("url=postgresql+psycopg://ca:pw@postgres:5432/ledger\n")
    service = "meshtrust-injector.meshtrust-system.svc"
    done = run_cli("injector", "cert", "--ca-dir", str(tmp_path / "ca"), "--dns", service,
                   "--out", str(out / "injector-tls"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def test_every_manifest_is_in_the_kustomization() -> None:
    listed = set(yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml", "ca-serve.yaml"}
    assert listed == on_disk


def test_the_ca_config_is_a_valid_ca_serve_config() -> None:
    from meshtrust.ca.config import load_config_file

    settings = load_config_file(DEPLOY / "ca-serve.yaml")
    assert settings["kube_tokenreview"] == "in-cluster"


def test_kubectl_apply_dry_run_server_accepts_every_manifest(
    kube: KubeApiServer, deploy_dir: Path
) -> None:
    rendered = _kubectl(kube, "kustomize", str(deploy_dir))
    assert rendered.returncode == 0, rendered.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    for expected in ("Deployment/meshtrust-ca", "Service/meshtrust-ca",
                     "PodDisruptionBudget/meshtrust-ca",
                     "ClusterRoleBinding/meshtrust-ca-tokenreview",
                     "Deployment/meshtrust-injector", "Service/meshtrust-injector",
                     "MutatingWebhookConfiguration/meshtrust-sidecar-injector"):  # fmt: skip
        assert expected in kinds, kinds
    webhook = next(d for d in docs if d["kind"] == "MutatingWebhookConfiguration")
    ca_crt = (deploy_dir / "injector-tls" / "ca.crt").read_bytes()
    for hook in webhook["webhooks"]:
        assert base64.b64decode(hook["clientConfig"]["caBundle"]) == ca_crt
    secret = next(
        d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("cacerts")
    )
    assert sorted(secret["data"]) == [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ]

    # Namespaced objects need their namespace to exist for a server-side dry run.
    kube.ensure_namespace("meshtrust-system")
    applied = _kubectl(kube, "apply", "--dry-run=server", "-k", str(deploy_dir))
    assert applied.returncode == 0, applied.stderr
    for expected in ("deployment.apps/meshtrust-ca", "mutatingwebhookconfiguration."
                     "admissionregistration.k8s.io/meshtrust-sidecar-injector"):  # fmt: skip
        assert expected in applied.stdout
    assert "(server dry run)" in applied.stdout
    # Nothing was stored.
    gone = _kubectl(kube, "get", "deployment", "-n", "meshtrust-system", "meshtrust-ca")
    assert gone.returncode != 0 and "NotFound" in gone.stderr

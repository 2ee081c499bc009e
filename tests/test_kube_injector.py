"""The injector registered with a real kube-apiserver: pods created through the API come back
with the sidecar (or untouched when they opt out), as the API server applied our patch."""

from __future__ import annotations

import base64
import functools
import os
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshtrust.injector import PROXY_CONTAINER
from tests.kube import KubeApiServer, KubeError, kube_apiserver
from tests.processes import MESHTRUST, free_port, run_cli
from tests.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.kube]


@pytest.fixture(scope="module")
def kube() -> Iterator[KubeApiServer]:
    with kube_apiserver() as server:
        yield server


@pytest.fixture(scope="module")
def injector(kube: KubeApiServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``meshtrust injector serve`` with a certificate from ``meshtrust injector cert``,
    registered as the cluster's mutating webhook; yields its log path."""
    from meshtrust.ca import init_ca_dir
    from meshtrust.clock import SystemClock
    from meshtrust.pki import KeyType
    from tests.conftest import TD

    root = tmp_path_factory.mktemp("injector")
    init_ca_dir(root / "ca", TD, SystemClock().now(), KeyType.EC_P256)
    done = run_cli("injector", "cert", "--ca-dir", str(root / "ca"), "--dns", "localhost",
                   "--out", str(root / "tls"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    port = free_port()
    log = (root / "injector.log").open("w")
    proc = subprocess.Popen(
        [*MESHTRUST, "injector", "serve", "--listen", f"127.0.0.1:{port}",
         "--tls-cert", str(root / "tls" / "tls.crt"), "--tls-key", str(root / "tls" / "tls.key"),
         "--kube", str(kube.kubeconfig), "--image", "example.org/meshtrust:test",
         "--ca-address", "meshtrust-ca.meshtrust-system.svc:15012",
         "--publish-root", str(root / "ca" / "root-cert.pem"), "--publish-interval", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    ca_bundle = (root / "tls" / "ca.crt").read_text()
    ctx = ssl.create_default_context(cadata=ca_bundle)

    def ready() -> bool:
        assert proc.poll() is None, (root / "injector.log").read_text()
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/ready", context=ctx) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    try:
        until(ready, timeout=30, what="the injector answers /ready")
        kube.create(
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
            {"apiVersion": "admissionregistration.k8s.io/v1",
             "kind": "MutatingWebhookConfiguration",
             "metadata": {"name": "meshtrust-sidecar-injector"},
             "webhooks": [{
                 "name": "sidecar-injector.meshtrust.io",
                 "clientConfig": {"url": f"https://127.0.0.1:{port}/inject",
                                  "caBundle": base64.b64encode(ca_bundle.encode()).decode()},
                 "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                            "resources": ["pods"]}],
                 "namespaceSelector": {"matchExpressions": [{
                     "key": "kubernetes.io/metadata.name", "operator": "NotIn",
                     "values": ["kube-system", "kube-public"]}]},
                 "sideEffects": "None", "admissionReviewVersions": ["v1"],
                 "failurePolicy": "Fail", "timeoutSeconds": 10}]},
        )  # fmt: skip
        yield str(root / "injector.log")
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def _pod(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"serviceAccountName": "web", "containers": [
                {"name": "app", "image": "example.org/app:1",
                 "ports": [{"containerPort": 8080}]}]}}  # fmt: skip


def _create_pod(kube: KubeApiServer, namespace: str, pod: dict[str, Any]) -> dict[str, Any]:
    kube.create(f"/api/v1/namespaces/{namespace}/pods", pod)
    return kube.request("GET", f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}")


def _containers(pod: dict[str, Any]) -> list[str]:
    return [c["name"] for c in pod["spec"]["containers"]]


def test_pods_come_back_injected_or_untouched_as_istio_decides(
    kube: KubeApiServer, injector: str
) -> None:
    kube.ensure_namespace("meshed", {"istio-injection": "enabled"})
    kube.ensure_namespace("plain")
    for ns in ("meshed", "plain"):
        kube.ensure_service_account(ns, "web")
    meshed = _create_pod(kube, "meshed", _pod("web-1"))
    assert _containers(meshed) == ["app", PROXY_CONTAINER]
    proxy = meshed["spec"]["containers"][1]
    assert proxy["image"] == "example.org/meshtrust:test"
    volumes = {v["name"]: v for v in meshed["spec"]["volumes"]}
    sources = volumes["istio-token"]["projected"]["sources"]
    assert sources[0]["serviceAccountToken"]["audience"] == "istio-ca"
    agent_config = meshed["metadata"]["annotations"]["meshtrust.io/agent-config"]
    assert "meshtrust-ca.meshtrust-system.svc:15012" in agent_config

    opted_out = _create_pod(kube, "meshed", _pod("web-2", {"sidecar.istio.io/inject": "false"}))
    assert _containers(opted_out) == ["app"]
    assert "meshtrust.io/status" not in (opted_out["metadata"].get("annotations") or {})
    assert _containers(_create_pod(kube, "plain", _pod("web-3"))) == ["app"]
    opted_in = _create_pod(kube, "plain", _pod("web-4", {"sidecar.istio.io/inject": "true"}))
    assert _containers(opted_in) == ["app", PROXY_CONTAINER]


def test_an_already_injected_pod_is_not_injected_twice(kube: KubeApiServer, injector: str) -> None:
    kube.ensure_namespace("meshed", {"istio-injection": "enabled"})
    kube.ensure_service_account("meshed", "web")
    first = _create_pod(kube, "meshed", _pod("again-1"))
    again: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "again-2", "annotations": first["metadata"]["annotations"]},
             "spec": {k: v for k, v in first["spec"].items()
                      if k in ("containers", "volumes", "serviceAccountName")}}  # fmt: skip
    # The ServiceAccount admission plugin adds its own token volume: keep ours only.
    again["spec"]["volumes"] = [v for v in again["spec"]["volumes"]
                                if not v["name"].startswith("kube-api-access")]  # fmt: skip
    for c in again["spec"]["containers"]:
        c["volumeMounts"] = [m for m in c.get("volumeMounts", [])
                             if not m["name"].startswith("kube-api-access")]  # fmt: skip
    second = _create_pod(kube, "meshed", again)
    assert _containers(second) == ["app", PROXY_CONTAINER]


def test_a_bad_annotation_is_refused_with_the_injectors_reason(
    kube: KubeApiServer, injector: str
) -> None:
    kube.ensure_namespace("meshed", {"istio-injection": "enabled"})
    kube.ensure_service_account("meshed", "web")
    bad = _pod("bad-port")
    bad["metadata"]["annotations"] = {"meshtrust.io/app-port": "http"}
    with pytest.raises(KubeError, match="meshtrust.io/app-port 'http' is not a port"):
        kube.create("/api/v1/namespaces/meshed/pods", bad)
    assert "Traceback" not in Path(injector).read_text()


def _root_configmap(kube: KubeApiServer, namespace: str) -> dict[str, Any] | None:
    try:
        path = f"/api/v1/namespaces/{namespace}/configmaps/meshtrust-ca-root-cert"
        return kube.request("GET", path)
    except KubeError as exc:
        if exc.status == 404:
            return None
        raise


def test_every_namespace_gets_the_ca_root_configmap_and_a_foreign_one_is_left_alone(
    kube: KubeApiServer, injector: str
) -> None:
    root = (Path(injector).parent / "ca" / "root-cert.pem").read_text()
    kube.ensure_namespace("root-shop")
    kube.ensure_namespace("root-theirs")
    theirs = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "meshtrust-ca-root-cert"},
        "data": {"root-cert.pem": "x"},
    }
    try:
        kube.create("/api/v1/namespaces/root-theirs/configmaps", theirs)
    except KubeError as exc:  # the publisher may have been quicker: take it back
        assert exc.status == 409
        kube.request("PUT", "/api/v1/namespaces/root-theirs/configmaps/meshtrust-ca-root-cert",
                     theirs)  # fmt: skip

    def published(namespace: str) -> bool:
        data = (_root_configmap(kube, namespace) or {}).get("data", {})
        return bool(data.get("root-cert.pem") == root)

    for namespace in ("default", "root-shop"):
        until(functools.partial(published, namespace), 30, f"the CA root in {namespace}")
    until(lambda: "left alone" in Path(injector).read_text(), 30, "the foreign one reported")
    assert (_root_configmap(kube, "root-theirs") or {})["data"] == {"root-cert.pem": "x"}

"""Sidecar injection: who gets a sidecar (by table), what the patch adds, idempotency, and
the AdmissionReview answers to good and bad input. Pure: the real API server calling the
webhook is in tests/test_kube.py."""

from __future__ import annotations

import base64
import copy
import http.client
import json
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import pytest

from meshtrust.injector import (
    PROXY_CONTAINER,
    InjectorSettings,
    InvalidReview,
    decide,
    inject,
    review_response,
)
from meshtrust.injector.server import InjectorServer, NamespaceLabelCache
from meshtrust.kube import KubeUnavailable
from tests.kube import make_tls_pair, pem_bytes

SETTINGS = InjectorSettings(image="example.org/meshtrust:1", ca_address="ca.mt.svc:15012")


def pod(labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
        **spec: Any) -> dict[str, Any]:  # fmt: skip
    meta: dict[str, Any] = {"name": "web-1", "namespace": "shop"}
    if labels is not None:
        meta["labels"] = labels
    if annotations is not None:
        meta["annotations"] = annotations
    containers = [{"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"serviceAccountName": "web", "containers": containers, **spec}}  # fmt: skip


ON, OFF = {"sidecar.istio.io/inject": "true"}, {"sidecar.istio.io/inject": "false"}
ENABLED, DISABLED = {"istio-injection": "enabled"}, {"istio-injection": "disabled"}


@pytest.mark.parametrize(
    ("the_pod", "namespace", "ns_labels", "expected"),
    [
        (pod(), "shop", {}, False),
        (pod(), "shop", ENABLED, True),
        (pod(labels=ON), "shop", {}, True),
        (pod(annotations=ON), "shop", {}, True),
        (pod(labels=OFF), "shop", ENABLED, False),
        (pod(annotations=OFF), "shop", ENABLED, False),
        (pod(labels=OFF, annotations=ON), "shop", {}, False),  # the label wins
        (pod(labels={"sidecar.istio.io/inject": "yes"}), "shop", {}, True),
        (pod(labels=ON), "shop", DISABLED, False),
        (pod(labels=ON), "kube-system", {}, False),
        (pod(labels=ON, hostNetwork=True), "shop", {}, False),
        (pod(labels={"sidecar.istio.io/inject": "maybe"}), "shop", ENABLED, True),
    ],
)
def test_who_gets_a_sidecar(
    the_pod: dict[str, Any], namespace: str, ns_labels: dict[str, str], expected: bool
) -> None:
    assert decide(the_pod, namespace, ns_labels).inject is expected


def test_an_unknown_inject_value_is_ignored_with_a_warning() -> None:
    decision = decide(pod(labels={"sidecar.istio.io/inject": "maybe"}), "shop", {})
    assert not decision.inject
    assert "'maybe' is not true or false" in decision.warnings[0]


def apply_patch(doc: dict[str, Any], patch: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSONPatch ``add`` operations the injector emits (RFC 6902), applied."""
    out = copy.deepcopy(doc)
    for op in patch:
        assert op["op"] == "add"
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"][1:].split("/")
        ]
        node: Any = out
        for part in parents:
            node = node[part]
        if last == "-":
            node.append(op["value"])
        else:
            assert last not in node, f"add over an existing {op['path']}"
            node[last] = op["value"]
    return out


def test_the_patch_adds_the_agent_its_token_root_and_config() -> None:
    patch, warnings = inject(pod(labels=ON), "shop", SETTINGS)
    assert warnings == ()
    injected = apply_patch(pod(labels=ON), patch)
    containers = injected["spec"]["containers"]
    assert [c["name"] for c in containers] == ["app", PROXY_CONTAINER]
    proxy = containers[1]
    assert proxy["image"] == "example.org/meshtrust:1"
    assert proxy["args"] == ["agent", "--config", "/etc/meshtrust/pod/agent.yaml"]
    volumes = {v["name"]: v for v in injected["spec"]["volumes"]}
    token = volumes["istio-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token == {"audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}
    assert volumes["meshtrust-ca-root"]["configMap"]["name"] == "meshtrust-ca-root-cert"
    annotations = injected["metadata"]["annotations"]
    agent = annotations["meshtrust.io/agent-config"]
    assert 'ca-address: "ca.mt.svc:15012"' in agent
    assert 'token-file: "/var/run/secrets/tokens/istio-token"' in agent
    assert 'sidecar: "/etc/meshtrust/pod/sidecar.yaml"' in agent
    assert "app_port: 8080" in annotations["meshtrust.io/sidecar-config"]
    assert annotations["meshtrust.io/status"] == "injected"
    # Idempotent: the injected pod gets nothing more.
    assert inject(injected, "shop", SETTINGS) == ([], ())


def test_agent_and_sidecar_config_files_load_with_our_loaders(tmp_path: Any) -> None:
    from meshtrust.agent.config import load_agent_settings
    from meshtrust.envoy.sidecar import load_sidecar_config

    injected = apply_patch(pod(labels=ON), inject(pod(labels=ON), "shop", SETTINGS)[0])
    annotations = injected["metadata"]["annotations"]
    (tmp_path / "agent.yaml").write_text(annotations["meshtrust.io/agent-config"])
    (tmp_path / "sidecar.yaml").write_text(annotations["meshtrust.io/sidecar-config"])
    agent = load_agent_settings(tmp_path / "agent.yaml")
    assert str(agent["token_file"]) == "/var/run/secrets/tokens/istio-token"
    sidecar = load_sidecar_config(tmp_path / "sidecar.yaml")
    assert (sidecar.name, sidecar.namespace, sidecar.app_port) == ("web", "shop", 8080)
    # Other pods reach the sidecar on the pod's IP (its `mtls` port), not only from inside it.
    assert (sidecar.inbound_address, sidecar.inbound_port) == ("0.0.0.0", 15006)


def test_pods_without_volumes_annotations_or_port_still_patch_cleanly() -> None:
    bare = pod(labels=ON)
    bare["spec"]["containers"][0].pop("ports")
    patch, warnings = inject(bare, "shop", SETTINGS)
    injected = apply_patch(bare, patch)
    assert "no app port" in warnings[0]
    assert "meshtrust.io/sidecar-config" not in injected["metadata"]["annotations"]
    with_port = pod(labels=ON, volumes=[{"name": "data", "emptyDir": {}}],
                    annotations={"meshtrust.io/app-port": "9090"})  # fmt: skip
    injected = apply_patch(with_port, inject(with_port, "shop", SETTINGS)[0])
    assert [v["name"] for v in injected["spec"]["volumes"]][:2] == ["data", "istio-token"]
    assert "app_port: 9090" in injected["metadata"]["annotations"]["meshtrust.io/sidecar-config"]


def review(obj: object, **request: Any) -> bytes:
    req = {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
           "operation": "CREATE", "namespace": "shop", "object": obj, **request}  # fmt: skip
    return json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                       "request": req}).encode()  # fmt: skip


def no_labels(namespace: str) -> dict[str, str]:
    return {}


def test_review_answers_with_a_base64_jsonpatch() -> None:
    answer = review_response(review(pod(labels=ON)), no_labels, SETTINGS)["response"]
    assert (answer["uid"], answer["allowed"], answer["patchType"]) == ("u-1", True, "JSONPatch")
    patch = json.loads(base64.b64decode(answer["patch"]))
    assert apply_patch(pod(labels=ON), patch)["spec"]["containers"][1]["name"] == PROXY_CONTAINER
    untouched = review_response(review(pod(labels=OFF)), no_labels, SETTINGS)["response"]
    assert untouched == {"uid": "u-1", "allowed": True}


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (review(pod(labels=ON, annotations={"meshtrust.io/app-port": "http"})), 400,
         "meshtrust.io/app-port 'http' is not a port"),
        (review("not a pod"), 400, "no pod object"),
        (review(pod(labels=ON), namespace=None) .replace(b'"shop"', b'""'), 400, "no namespace"),
        (review({"metadata": {"labels": ON}, "spec": {"containers": "x"}}), 400,
         "no spec.containers list"),
        (json.dumps({"apiVersion": "v1", "kind": "X", "request": {"uid": "u-1"}}).encode(), 400,
         "expected an admission.k8s.io/v1 AdmissionReview"),
    ],
)  # fmt: skip
def test_bad_reviews_are_refused_with_the_reason(body: bytes, code: int, message: str) -> None:
    answer = review_response(body, no_labels, SETTINGS)["response"]
    assert answer["allowed"] is False and answer["uid"] == "u-1"
    assert answer["status"]["code"] == code
    assert message in answer["status"]["message"]


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"request": {}}', b"\xff"])
def test_a_body_with_no_review_to_answer_is_invalid(body: bytes) -> None:
    with pytest.raises(InvalidReview):
        review_response(body, no_labels, SETTINGS)


def test_other_kinds_and_operations_pass_untouched() -> None:
    deployment = {"group": "apps", "version": "v1", "kind": "Deployment"}
    for body in (review(pod(labels=ON), operation="UPDATE"), review({}, kind=deployment)):
        answer = review_response(body, no_labels, SETTINGS)["response"]
        assert answer == {"uid": "u-1", "allowed": True}


def test_namespace_labels_unavailable_refuses_so_the_pod_is_retried() -> None:
    def down(namespace: str) -> dict[str, str]:
        raise KubeUnavailable("GET /api/v1/namespaces/shop: cannot reach the API server")

    answer = review_response(review(pod(labels=ON)), down, SETTINGS)["response"]
    assert answer["allowed"] is False and answer["status"]["code"] == 500
    assert "cannot reach the API server" in answer["status"]["message"]


def test_namespace_labels_are_cached_briefly() -> None:
    calls: list[str] = []
    now = [0.0]

    def fetch(namespace: str) -> dict[str, Any]:
        calls.append(namespace)
        return {"metadata": {"labels": ENABLED}}

    labels = NamespaceLabelCache(fetch, ttl=5, monotonic=lambda: now[0])
    assert labels("shop") == ENABLED and labels("shop") == ENABLED
    now[0] = 5.0
    labels("shop")
    assert calls == ["shop", "shop"]


@pytest.fixture
def served(tmp_path: Any) -> Iterator[tuple[InjectorServer, ssl.SSLContext]]:
    ca, key, leaf = make_tls_pair(["localhost"], ["127.0.0.1"])
    (tmp_path / "c.pem").write_bytes(pem_bytes(leaf))
    (tmp_path / "k.pem").write_bytes(pem_bytes(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    server = InjectorServer("127.0.0.1", 0, ctx, lambda ns: ENABLED, SETTINGS)
    server.start()
    try:
        yield server, ssl.create_default_context(cadata=pem_bytes(ca).decode())
    finally:
        server.stop()


def _post(port: int, ctx: ssl.SSLContext, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request("POST", "/inject", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_the_https_server_answers_reviews_even_with_a_stalled_client_connected(
    served: tuple[InjectorServer, ssl.SSLContext],
) -> None:
    server, ctx = served
    with socket.create_connection(("127.0.0.1", server.port)):  # connects, never says hello
        status, body = _post(server.port, ctx, review(pod()))
    assert status == 200
    assert json.loads(body)["response"]["patchType"] == "JSONPatch"
    status, body = _post(server.port, ctx, b"{not json")
    assert (status, body) == (400, b"the request body is not JSON\n")


def _served_serial(port: int, ctx: ssl.SSLContext) -> int:
    from cryptography import x509

    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_a_renewed_serving_certificate_is_used_without_a_restart_and_a_bad_one_is_not(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """As a Secret volume update does: the files change under the running webhook."""
    from meshtrust.injector.server import ReloadingTlsContext

    ca, key, leaf = make_tls_pair(["localhost"], ["127.0.0.1"])
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_file.write_bytes(pem_bytes(leaf))
    key_file.write_bytes(pem_bytes(key))
    now = [0.0]
    tls = ReloadingTlsContext(cert_file, key_file, interval=1.0, monotonic=lambda: now[0])
    server = InjectorServer("127.0.0.1", 0, tls, lambda ns: ENABLED, SETTINGS)
    server.start()
    client = ssl.create_default_context(cadata=pem_bytes(ca).decode())
    try:
        assert _served_serial(server.port, client) == leaf.serial_number
        ca2, key2, leaf2 = make_tls_pair(["localhost"], ["127.0.0.1"])
        client.load_verify_locations(cadata=pem_bytes(ca2).decode())
        (tmp_path / "new.crt").write_bytes(pem_bytes(leaf2))
        (tmp_path / "new.key").write_bytes(pem_bytes(key2))
        (tmp_path / "new.crt").replace(cert_file)
        (tmp_path / "new.key").replace(key_file)
        assert _served_serial(server.port, client) == leaf.serial_number  # not looked yet
        now[0] = 1.5
        assert _served_serial(server.port, client) == leaf2.serial_number
        assert tls.reloads == 1

        cert_file.write_bytes(b"-----BEGIN CERTIFICATE-----\nbroken\n")  # half-written
        now[0] = 3.0
        assert _served_serial(server.port, client) == leaf2.serial_number
        assert tls.failures == 1
        assert "keeping the last good one" in caplog.text
        assert "PRIVATE KEY" not in caplog.text
        status, _ = _post(server.port, client, review(pod()))
        assert status == 200
    finally:
        server.stop()


def test_the_injector_refuses_to_start_on_a_key_that_does_not_match(tmp_path: Any) -> None:
    from meshtrust.errors import ConfigError
    from meshtrust.injector.server import ReloadingTlsContext

    _, _, leaf = make_tls_pair(["localhost"], ["127.0.0.1"])
    _, other_key, _ = make_tls_pair(["localhost"], ["127.0.0.1"])
    (tmp_path / "tls.crt").write_bytes(pem_bytes(leaf))
    (tmp_path / "tls.key").write_bytes(pem_bytes(other_key))
    with pytest.raises(ConfigError, match="not a usable certificate and key"):
        ReloadingTlsContext(tmp_path / "tls.crt", tmp_path / "tls.key")
    with pytest.raises(ConfigError, match="cannot read"):
        ReloadingTlsContext(tmp_path / "missing.crt", tmp_path / "tls.key")

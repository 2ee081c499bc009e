"""meshtrust against a real kube-apiserver + etcd (tests/kube.py): TokenReview and the
cluster JWKS as the CA's authenticators, with tokens from the TokenRequest API."""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from meshtrust.ca.kube_authn import TOKENREVIEW_CACHE_TTL, TokenReviewAuthenticator
from meshtrust.caapi.istio import ca_pb2, ca_pb2_grpc
from meshtrust.errors import AuthenticationError
from meshtrust.injector import InjectorSettings, inject
from meshtrust.kube import KubeApiError, KubeClient, KubeConfig, KubeUnavailable, load_kubeconfig
from meshtrust.pki import build_csr, generate_key
from meshtrust.spiffe import SpiffeId
from tests.conftest import TD
from tests.kube import KubeApiServer, kube_apiserver
from tests.processes import MESHTRUST, CaProcess, free_port
from tests.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.kube]


@pytest.fixture(scope="module")
def kube() -> Iterator[KubeApiServer]:
    with kube_apiserver() as server:
        yield server


def test_client_reads_the_kubeconfig_and_talks_to_the_api_server(kube: KubeApiServer) -> None:
    client = KubeClient(load_kubeconfig(kube.kubeconfig))
    sa = client.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")
    assert sa["metadata"]["name"] == "default"
    with pytest.raises(KubeApiError, match="HTTP 404") as info:
        client.request("GET", "/api/v1/namespaces/default/serviceaccounts/nobody")
    assert info.value.status == 404
    assert kube.admin_token not in str(info.value)


def _pod(name: str, namespace: str = "shop", sa: str = "web") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "serviceAccountName": sa,
            "automountServiceAccountToken": False,
            "containers": [{"name": "app", "image": "example.org/app:1"}],
        },
    }


@pytest.fixture(scope="module")
def shop(kube: KubeApiServer) -> KubeApiServer:
    kube.ensure_namespace("shop")
    kube.ensure_service_account("shop", "web")
    return kube


def _tampered(token: str) -> str:
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["sub"] = "system:serviceaccount:shop:admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{forged}.{sig}"


@pytest.mark.asyncio
async def test_tokenreview_authenticates_service_account_tokens_and_refuses_the_rest(
    shop: KubeApiServer,
) -> None:
    auth = TokenReviewAuthenticator(TD, KubeClient(load_kubeconfig(shop.kubeconfig)))
    now = dt.datetime.now(dt.UTC)
    token = shop.token_for("shop", "web", ["istio-ca"])
    caller = await auth.authenticate(token, now)
    assert str(caller.identity) == "spiffe://example.org/ns/shop/sa/web"
    assert caller.subject == "system:serviceaccount:shop:web"
    wrong_audience = shop.token_for("shop", "web", ["vault"])
    with pytest.raises(AuthenticationError, match="TokenReview refused the token"):
        await auth.authenticate(wrong_audience, now)
    with pytest.raises(AuthenticationError, match="TokenReview refused the token"):
        await auth.authenticate(_tampered(token), now)


@pytest.mark.asyncio
async def test_a_deleted_pods_bound_token_is_refused_once_the_cache_entry_ends(
    shop: KubeApiServer,
) -> None:
    auth = TokenReviewAuthenticator(TD, KubeClient(load_kubeconfig(shop.kubeconfig)))
    pod = shop.create("/api/v1/namespaces/shop/pods", _pod("bound"))
    token = shop.token_for("shop", "web", ["istio-ca"], pod=pod)
    now = dt.datetime.now(dt.UTC)
    caller = await auth.authenticate(token, now)
    assert str(caller.identity) == "spiffe://example.org/ns/shop/sa/web"
    shop.request("DELETE", "/api/v1/namespaces/shop/pods/bound?gracePeriodSeconds=0")
    # The API server caches its own TokenReview answers (10 s) and learns of the deletion
    # through its pod informer: wait until it says no to a direct review.
    until(lambda: not shop.review(token, ["istio-ca"]).get("authenticated"), timeout=60)
    # Within the cache entry the earlier answer stands (that is the cache's price) ...
    await auth.authenticate(token, now + TOKENREVIEW_CACHE_TTL - dt.timedelta(seconds=1))
    # ... after it, the API server is asked again and says the pod is gone.
    with pytest.raises(AuthenticationError, match="TokenReview refused the token: .*invalidated"):
        await auth.authenticate(token, now + TOKENREVIEW_CACHE_TTL)


@pytest.mark.asyncio
async def test_tokenreview_with_the_api_server_unreachable_is_unavailable(
    shop: KubeApiServer,
) -> None:
    gone = KubeConfig("127.0.0.1", free_port(), shop.ca_pem, token="x")
    auth = TokenReviewAuthenticator(TD, KubeClient(gone, timeout=2))
    with pytest.raises(KubeUnavailable, match="cannot reach the API server"):
        await auth.authenticate(
            shop.token_for("shop", "web", ["istio-ca"]), dt.datetime.now(dt.UTC)
        )


def _create_certificate(ca: CaProcess, token: str) -> tuple[grpc.StatusCode, str, str | None]:
    """(status, details, SPIFFE ID of the issued leaf) for one CreateCertificate call."""
    root = (ca.ca_dir / "root-cert.pem").read_bytes()
    csr = build_csr(generate_key(), SpiffeId.for_workload(TD, "shop", "web"))
    with grpc.secure_channel(ca.address, grpc.ssl_channel_credentials(root)) as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            resp = stub.CreateCertificate(
                ca_pb2.IstioCertificateRequest(csr=csr),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=20,
            )
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or "", None
    leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return grpc.StatusCode.OK, "", str(san.get_values_for_type(x509.UniformResourceIdentifier)[0])


@pytest.mark.parametrize("flag", ["--kube-tokenreview", "--kube-jwks"])
def test_a_real_ca_issues_exactly_the_token_identity_and_refuses_bad_tokens(
    shop: KubeApiServer, ca_dir: Path, flag: str
) -> None:
    ca = CaProcess(ca_dir, flag, str(shop.kubeconfig), "--workers", "2")
    try:
        ca.wait_ready()
        token = shop.token_for("shop", "web", ["istio-ca"])
        assert _create_certificate(ca, token) == (
            grpc.StatusCode.OK, "", "spiffe://example.org/ns/shop/sa/web"
        )  # fmt: skip
        for bad in (_tampered(token), shop.token_for("shop", "web", ["vault"])):
            code, details, _ = _create_certificate(ca, bad)
            assert code == grpc.StatusCode.UNAUTHENTICATED, details
            assert bad not in details and bad not in ca.log()
        assert "audience" in _create_certificate(ca, shop.token_for("shop", "web", ["x"]))[1]
        assert shop.admin_token not in ca.log()
    finally:
        ca.stop()


def test_the_ca_answers_unavailable_while_the_api_server_is_unreachable(
    shop: KubeApiServer, ca_dir: Path
) -> None:
    kubeconfig = ca_dir.parent / "gone.kubeconfig"
    kubeconfig.write_text(
        shop.kubeconfig.read_text().replace(f"127.0.0.1:{shop.port}", f"127.0.0.1:{free_port()}")
    )
    ca = CaProcess(ca_dir, "--kube-tokenreview", str(kubeconfig))
    try:
        ca.wait_ready()
        code, details, _ = _create_certificate(ca, shop.token_for("shop", "web", ["istio-ca"]))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "TokenReview" in details or "cannot reach the API server" in details
        assert shop.admin_token not in details and shop.admin_token not in ca.log()
    finally:
        ca.stop()


def test_a_ca_that_cannot_fetch_the_cluster_jwks_stops_at_start_saying_why(
    shop: KubeApiServer, ca_dir: Path
) -> None:
    kubeconfig = ca_dir.parent / "gone.kubeconfig"
    kubeconfig.write_text(
        shop.kubeconfig.read_text().replace(f"127.0.0.1:{shop.port}", f"127.0.0.1:{free_port()}")
    )
    ca = CaProcess(ca_dir, "--kube-jwks", str(kubeconfig))
    assert ca.wait() != 0
    assert "openid-configuration: cannot reach the API server" in ca.log()
    assert "Traceback" not in ca.log()


def test_the_injected_agent_config_gets_a_certificate_with_a_projected_style_token(
    shop: KubeApiServer, ca_dir: Path, tmp_path: Path
) -> None:
    """The agent settings the injector writes into a pod, run by the real agent (paths moved
    under tmp_path), with a TokenRequest token where the kubelet would project it."""
    settings = InjectorSettings(image="x", ca_address="placeholder:15012")
    pod = _pod("agent-test")
    patch, _ = inject(pod, "shop", settings)
    agent_yaml = next(op["value"] for op in patch if op["path"] == "/metadata/annotations")[
        "meshtrust.io/agent-config"
    ]
    ca = CaProcess(ca_dir, "--kube-tokenreview", str(shop.kubeconfig))
    status_port = free_port()
    for old, new in (("/var/run/secrets", str(tmp_path / "secrets")),
                     ("placeholder:15012", ca.address),
                     ("0.0.0.0:15021", f"127.0.0.1:{status_port}")):  # fmt: skip
        agent_yaml = agent_yaml.replace(old, new)
    (tmp_path / "agent.yaml").write_text(agent_yaml)
    tokens = tmp_path / "secrets" / "tokens"
    tokens.mkdir(parents=True)
    (tokens / "istio-token").write_text(shop.token_for("shop", "web", ["istio-ca"]))
    root_dir = tmp_path / "secrets" / "meshtrust" / "ca"
    root_dir.mkdir(parents=True)
    (root_dir / "root-cert.pem").write_bytes((ca_dir / "root-cert.pem").read_bytes())
    (tmp_path / "secrets" / "workload-spiffe-uds").mkdir()
    certs = tmp_path / "secrets" / "meshtrust" / "certs"
    log = (tmp_path / "agent.log").open("w")
    agent = subprocess.Popen([*MESHTRUST, "agent", "--config", str(tmp_path / "agent.yaml")],
                             stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        ca.wait_ready()
        until(lambda: (certs / "cert-chain.pem").exists() or agent.poll() is not None,
              timeout=60, what="the agent writes its certificate")  # fmt: skip
        assert agent.poll() is None, (tmp_path / "agent.log").read_text()
        leaf = x509.load_pem_x509_certificates((certs / "cert-chain.pem").read_bytes())[0]
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        assert uris == ["spiffe://example.org/ns/shop/sa/web"]
        assert "via kube-tokenreview" in ca.log()
    finally:
        agent.terminate()
        agent.wait(20)
        log.close()
        ca.stop()

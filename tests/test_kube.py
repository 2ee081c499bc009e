"""meshtrust against a real kube-apiserver + etcd (tests/kube.py): TokenReview and the
cluster JWKS as the CA's authenticators, with tokens from the TokenRequest API."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meshtrust.kube import KubeApiError, KubeClient, load_kubeconfig
from tests.kube import KubeApiServer, kube_apiserver

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

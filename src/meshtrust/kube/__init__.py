"""Talking to Kubernetes: where the API server is (:mod:`.config`) and a small JSON client
(:mod:`.client`). Used by the CA (TokenReview, the cluster's JWKS) and the injector."""

from meshtrust.kube.client import KubeApiError, KubeClient, KubeUnavailable
from meshtrust.kube.config import (
    IN_CLUSTER_DIR,
    KubeConfig,
    in_cluster_config,
    load_kube_source,
    load_kubeconfig,
    parse_server_url,
)

__all__ = [
    "IN_CLUSTER_DIR",
    "KubeApiError",
    "KubeClient",
    "KubeConfig",
    "KubeUnavailable",
    "in_cluster_config",
    "load_kube_source",
    "load_kubeconfig",
    "parse_server_url",
]

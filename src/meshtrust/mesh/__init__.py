"""The local mesh: ``meshtrust up mesh.yaml`` and the operator's tools around it."""

from meshtrust.mesh.config import MeshConfig, ServiceSpec, UpstreamSpec, load_mesh_config
from meshtrust.mesh.runner import MeshStartFailed, start_mesh, stop_mesh
from meshtrust.mesh.state import MeshState, ServiceState, find_state, read_state

__all__ = [
    "MeshConfig",
    "MeshStartFailed",
    "MeshState",
    "ServiceSpec",
    "ServiceState",
    "UpstreamSpec",
    "find_state",
    "load_mesh_config",
    "read_state",
    "start_mesh",
    "stop_mesh",
]

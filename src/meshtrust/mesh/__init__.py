"""The local mesh: ``meshtrust up mesh.yaml`` and the operator's tools around it.

``up`` is a plan (:mod:`meshtrust.mesh.plan`, pure) carried out by a launcher
(:mod:`meshtrust.mesh.launch`); ``status``, ``check``, ``proxy-config`` and ``certs monitor``
observe the running mesh and judge what they saw; ``analyze`` and ``describe``
(:mod:`meshtrust.mesh.analyze`, :mod:`meshtrust.mesh.describe`) judge the files alone, asking
:mod:`meshtrust.mesh.access` who may call whom.
"""

from meshtrust.mesh.config import MeshConfig, ServiceSpec, UpstreamSpec, load_mesh_config
from meshtrust.mesh.launch import MeshStartFailed, launch, start_mesh, stop_mesh
from meshtrust.mesh.plan import MeshPlan, ProcessPlan, ServicePlan, plan_mesh
from meshtrust.mesh.state import MeshState, ServiceState, find_state, read_state

__all__ = [
    "MeshConfig",
    "MeshPlan",
    "MeshStartFailed",
    "MeshState",
    "ProcessPlan",
    "ServicePlan",
    "ServiceSpec",
    "ServiceState",
    "UpstreamSpec",
    "find_state",
    "launch",
    "load_mesh_config",
    "plan_mesh",
    "read_state",
    "start_mesh",
    "stop_mesh",
]

"""The workload agent (the istio-agent role): key, rotation, SDS, Workload API, files."""

from meshtrust.agent.agent import Agent
from meshtrust.agent.build import PolicyFiles, build_agent
from meshtrust.agent.cache import SecretCache, WorkloadSecret
from meshtrust.agent.config import AgentConfig, resolve_identity
from meshtrust.agent.files import CertificateFiles
from meshtrust.agent.issuance import (
    CertificateSource,
    TokenFile,
    verify_issued,
)
from meshtrust.agent.rotation import SlotState, backoff_delay, rotation_deadline
from meshtrust.agent.rotator import RotationPolicy, Rotator
from meshtrust.agent.sds import SdsServer
from meshtrust.agent.workload_api import WorkloadApiServer

__all__ = [
    "Agent",
    "AgentConfig",
    "CertificateFiles",
    "CertificateSource",
    "PolicyFiles",
    "RotationPolicy",
    "Rotator",
    "SdsServer",
    "SecretCache",
    "SlotState",
    "TokenFile",
    "WorkloadApiServer",
    "WorkloadSecret",
    "backoff_delay",
    "build_agent",
    "resolve_identity",
    "rotation_deadline",
    "verify_issued",
]

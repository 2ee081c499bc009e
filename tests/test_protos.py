"""The committed generated protobuf code is what scripts/gen-protos.py makes from proto/, and
the SDS subset the agent declares agrees with Envoy's own protos (xds-protos)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
GENERATED = (".py", ".pyi", ".pb")


def test_generated_code_is_what_gen_protos_makes(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-protos.py"), "--out", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    made = {
        p.relative_to(tmp_path): p.read_bytes()
        for p in tmp_path.rglob("*")
        if p.is_file() and p.suffix in GENERATED and p.name != "__init__.py"
    }
    assert made, "gen-protos wrote nothing"
    for relative, content in made.items():
        committed = ROOT / "src" / relative
        assert committed.exists(), f"{relative} is generated but not committed"
        assert committed.read_bytes() == content, f"{relative} differs from gen-protos' output"
    # And nothing stale: every committed generated file under the proto packages is made.
    for package in ("meshtrust/_proto", "meshtrust/caapi/istio"):
        for committed in (ROOT / "src" / package).rglob("*"):
            if (
                committed.is_file()
                and committed.suffix in GENERATED
                and committed.stem != "__init__"
            ):
                assert committed.relative_to(ROOT / "src") in made, f"{committed} is stale"


SDS_MESSAGES = [
    ("google.rpc.Status", "google.rpc.status_pb2", "Status"),
    ("envoy.config.core.v3.DataSource", "envoy.config.core.v3.base_pb2", "DataSource"),
    (
        "envoy.extensions.transport_sockets.tls.v3.TlsCertificate",
        "envoy.extensions.transport_sockets.tls.v3.common_pb2",
        "TlsCertificate",
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext",
        "envoy.extensions.transport_sockets.tls.v3.common_pb2",
        "CertificateValidationContext",
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.Secret",
        "envoy.extensions.transport_sockets.tls.v3.secret_pb2",
        "Secret",
    ),
    (
        "envoy.service.discovery.v3.DiscoveryRequest",
        "envoy.service.discovery.v3.discovery_pb2",
        "DiscoveryRequest",
    ),
    (
        "envoy.service.discovery.v3.DiscoveryResponse",
        "envoy.service.discovery.v3.discovery_pb2",
        "DiscoveryResponse",
    ),
]


def _ours() -> dict[str, descriptor_pb2.DescriptorProto]:
    out = {}
    for name in ("rpc", "core", "tls", "discovery"):
        data = (ROOT / "src" / "meshtrust" / "_proto" / "sds" / f"{name}.pb").read_bytes()
        file = descriptor_pb2.FileDescriptorProto.FromString(data)
        for message in file.message_type:
            out[f"{file.package}.{message.name}"] = message
    return out


@pytest.mark.parametrize(
    ("full_name", "module", "name"), SDS_MESSAGES, ids=[m[2] for m in SDS_MESSAGES]
)
def test_sds_subset_matches_envoys_protos(full_name: str, module: str, name: str) -> None:
    """Every field we declare has Envoy's number, type, label and message type."""
    import importlib

    theirs = getattr(importlib.import_module(module), name).DESCRIPTOR
    ours = _ours()[full_name]
    assert ours.field, f"{full_name} declares no fields"
    for field in ours.field:
        real = theirs.fields_by_name[field.name]
        repeated = field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
        assert (field.number, field.type, repeated) == (real.number, real.type, real.is_repeated)
        if field.type == descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE:
            assert field.type_name == "." + real.message_type.full_name
        if field.HasField("oneof_index"):
            assert ours.oneof_decl[field.oneof_index].name == real.containing_oneof.name

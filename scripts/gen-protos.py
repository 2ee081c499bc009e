"""Regenerate the committed protobuf/gRPC code under src/meshtrust/_proto from proto/.

Run from the repository root: .venv/bin/python scripts/gen-protos.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent


# Package-less protos (the SPIFFE Workload API) register global names that py-spiffe
# registers too; they are never imported as modules. We ship their serialized descriptor
# (<name>.pb, loaded into a private pool at run time) and type stubs (<name>_pb2.pyi).
DESCRIPTOR_ONLY = {"meshtrust/_proto/spiffe/workload.proto"}


def _strip_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _strip_json_names(message.nested_type)


def main() -> int:
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    protoc = [sys.executable, "-m", "grpc_tools.protoc", "-Iproto"]
    services = [p for p in protos if p not in DESCRIPTOR_ONLY]
    if services:
        subprocess.run(
            [
                *protoc,
                "--python_out=src",
                "--mypy_out=src",
                "--grpc_python_out=src",
                "--grpclib_python_out=src",
                *services,
            ],
            cwd=ROOT,
            env=env,
            check=True,
        )
    for proto in sorted(DESCRIPTOR_ONLY & set(protos)):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "set.pb"
            subprocess.run(
                [*protoc, "--mypy_out=src", f"--descriptor_set_out={out}", proto],
                cwd=ROOT,
                env=env,
                check=True,
            )
            descriptors = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
        (file,) = descriptors.file
        _strip_json_names(file.message_type)  # as protoc embeds descriptors in *_pb2.py
        target = ROOT / "src" / proto.removesuffix(".proto")
        target.with_suffix(".pb").write_bytes(file.SerializeToString())
    for proto in protos:
        pkg = (ROOT / "src" / proto).parent
        while pkg != ROOT / "src" / "meshtrust":
            (pkg / "__init__.py").touch()
            pkg = pkg.parent
    print(f"generated code for {len(protos)} proto files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

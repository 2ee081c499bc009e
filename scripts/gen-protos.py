"""Regenerate the committed protobuf/gRPC code under src/ from proto/.

Run from the repository root: .venv/bin/python scripts/gen-protos.py [--out DIR]
(``--out`` writes the tree somewhere else; tests/test_protos.py compares it with src/).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent


# Protos whose names other libraries register globally too: the package-less SPIFFE Workload
# API (py-spiffe), and the subset of Envoy's SDS messages the agent serves (xds-protos, whose
# own modules would cost the agent about a megabyte of memory). They are never imported as
# modules: we ship their serialized descriptor (<name>.pb, loaded into a private pool at run
# time), with type stubs (<name>_pb2.pyi) where the value is True.
DESCRIPTOR_ONLY = {
    "meshtrust/_proto/spiffe/workload.proto": True,
    "meshtrust/_proto/sds/rpc.proto": False,
    "meshtrust/_proto/sds/core.proto": False,
    "meshtrust/_proto/sds/tls.proto": False,
    "meshtrust/_proto/sds/discovery.proto": False,
}


def _strip_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _strip_json_names(message.nested_type)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "src", help="output tree (src/)")
    out_root = parser.parse_args().out.resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    protoc = [sys.executable, "-m", "grpc_tools.protoc", "-Iproto"]
    services = [p for p in protos if p not in DESCRIPTOR_ONLY]
    if services:
        subprocess.run(
            [
                *protoc,
                f"--python_out={out_root}",
                f"--mypy_out={out_root}",
                f"--grpc_python_out={out_root}",
                f"--grpclib_python_out={out_root}",
                *services,
            ],
            cwd=ROOT,
            env=env,
            check=True,
        )
    for proto in sorted(set(DESCRIPTOR_ONLY) & set(protos)):
        stubs = [f"--mypy_out={out_root}"] if DESCRIPTOR_ONLY[proto] else []
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "set.pb"
            subprocess.run(
                [*protoc, *stubs, f"--descriptor_set_out={out}", proto],
                cwd=ROOT,
                env=env,
                check=True,
            )
            descriptors = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
        (file,) = descriptors.file
        _strip_json_names(file.message_type)  # as protoc embeds descriptors in *_pb2.py
        target = out_root / proto.removesuffix(".proto")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.with_suffix(".pb").write_bytes(file.SerializeToString(deterministic=True))
    for proto in protos:
        pkg = (out_root / proto).parent
        while pkg != out_root / "meshtrust":
            (pkg / "__init__.py").touch()
            pkg = pkg.parent
    print(f"generated code for {len(protos)} proto files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

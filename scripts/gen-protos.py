"""Regenerate the committed protobuf/gRPC code under src/meshtrust/_proto from proto/.

Run from the repository root: .venv/bin/python scripts/gen-protos.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-Iproto",
        "--python_out=src",
        "--mypy_out=src",
        "--grpc_python_out=src",
        "--grpclib_python_out=src",
        *protos,
    ]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    for proto in protos:
        pkg = (ROOT / "src" / proto).parent
        while pkg != ROOT / "src" / "meshtrust":
            (pkg / "__init__.py").touch()
            pkg = pkg.parent
    print(f"generated code for {len(protos)} proto files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

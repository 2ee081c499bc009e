"""Every file meshtrust reads refuses bad input the same way: a ConfigError (PolicyError for
policies) naming file, line and field, before anything starts, never a traceback.

The files: mesh.yaml (``load_mesh_config``), sidecar.yaml (``load_sidecar_config``), the agent's
and the CA's ``--config`` (``load_agent_settings``, ``load_config_file``) and policies
(``load_policy_files``). The loader itself is tested in ``test_config.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshtrust.agent.config import load_agent_settings
from meshtrust.ca.config import load_config_file
from meshtrust.cli import cli
from meshtrust.envoy.sidecar import SidecarConfig, load_sidecar_config
from meshtrust.errors import ConfigError, PolicyError
from meshtrust.mesh import load_mesh_config
from meshtrust.policy import load_policy_files
from tests.attack.bombs import billion_laughs

MESH = "services:\n  - name: a\n    port: 25001\n"
SIDECAR = "name: web\napp_port: 8080\ninbound_port: 15006\n"
AGENT = "output-dir: out\nca-root: root.pem\n"
CA = "ca-dir: ca\nlisten: 127.0.0.1:0\n"
POLICY = (
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
    "metadata: {name: x, namespace: default}\nspec:\n  rules: [{}]\n"
)


def _load_policy(path: Path) -> object:
    return load_policy_files([path])


# kind: (a valid file, a line that repeats one of its keys, the loader)
KINDS: dict[str, tuple[str, str, str, Callable[[Path], object]]] = {
    "mesh": (MESH, "services: []\n", "services", load_mesh_config),
    "sidecar": (SIDECAR, "name: other\n", "name", load_sidecar_config),
    "agent": (AGENT, "output-dir: elsewhere\n", "output-dir", load_agent_settings),
    "ca": (CA, "listen: 127.0.0.1:1\n", "listen", load_config_file),
    "policy": (POLICY, "kind: PeerAuthentication\n", "kind", _load_policy),
}


def test_each_valid_file_loads(tmp_path: Path) -> None:
    """The fixtures above are valid: what is refused is the defect, not the base."""
    for kind, (valid, _, _, load) in KINDS.items():
        path = tmp_path / f"{kind}.yaml"
        path.write_text(valid)
        assert load(path)


# --- mesh.yaml ----------------------------------------------------------------------------------

TWO = (
    "services:\n"
    "  - name: a\n"
    "    port: 25001\n"
    "  - name: b\n"
    "    port: 25002\n"
    "    upstreams:\n"
    "      - service: a\n"
    "        localPort: 25003\n"
)


def _mesh_cases(tmp_path: Path) -> list[tuple[str, str, int, str, str]]:
    regular = tmp_path / "regular"
    regular.write_text("not a directory")
    long_name = "a" * 300
    return [
        ("cert-ttl-list", "certTTL: [1h]\n" + MESH, 1, "certTTL", "got a list"),
        ("cert-ttl-short", "certTTL: 1s\n" + MESH, 1, "certTTL", "at least 10s"),
        ("name-300", MESH.replace("a\n", f"{long_name}\n", 1), 2, "services[0].name", "not a name"),
        ("name-nul", MESH.replace("a\n", '"a\\0b"\n', 1), 2, "services[0].name", "NUL"),
        ("name-web_1", MESH.replace("a\n", "Web_1\n", 1), 2, "services[0].name", "not a name"),
        ("namespace", MESH + "    namespace: Prod\n", 4, "services[0].namespace", "not a name"),
        ("sa", MESH + "    serviceAccount: SA_1\n", 4, "services[0].serviceAccount", "not a name"),
        (
            "local-port",
            TWO.replace("25003", "x"),
            8,
            "services[1].upstreams[0].localPort",
            "expected a port 1-65535, got 'x'",
        ),
        ("label-key", MESH + "    labels: {-x: y}\n", 4, "services[0].labels", "label key"),
        ("label-app", MESH + "    labels: {app: b}\n", 4, "services[0].labels.app", "app is 'b'"),
        ("env-list", MESH + "    env: {X: [1]}\n", 4, "services[0].env.X", "got a list"),
        ("command", MESH + "    command: python3\n", 4, "services[0].command", "list of strings"),
        ("ca-listen", "ca: {listen: nowhere}\n" + MESH, 1, "ca.listen", "is not HOST:PORT"),
        ("workdir-proc", "workDir: /proc/mesh\n" + MESH, 1, "workDir", "is under /proc"),
        (
            "workdir-below-file",
            f"workDir: {regular}/sub\n" + MESH,
            1,
            "workDir",
            f"is below {regular}, which is not a directory",
        ),
        (
            "workdir-long",
            f"workDir: {'w' * 300}\n" + MESH,
            1,
            "workDir",
            "longer than 255 bytes",
        ),
        ("ca-dir-file", f"ca: {{dir: {regular}}}\n" + MESH, 1, "ca.dir", "is not a directory"),
        ("ca-dir-sys", "ca: {dir: /sys/ca}\n" + MESH, 1, "ca.dir", "is under /sys"),
        (
            "own-upstream",
            TWO.replace("service: a", "service: b"),
            7,
            "services[1].upstreams[0].service",
            "its own",
        ),
        (
            "port-clash",
            TWO.replace("25003", "25001"),
            8,
            "services[1].upstreams[0].localPort",
            "already used",
        ),
        ("policy-missing", MESH + "policies: [nope.yaml]\n", 4, "policies[0]", "does not exist"),
        ("unknown-key", MESH + "    prot: http\n", 4, "services[0].prot", "unknown key"),
    ]


def test_mesh_errors_name_file_line_and_field(tmp_path: Path) -> None:
    for case, text, line, field, problem in _mesh_cases(tmp_path):
        path = tmp_path / f"{case}.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_mesh_config(path)
        error = info.value
        assert (error.file, error.line, error.field) == (path, line, field), case
        assert problem in str(error), (case, str(error))
        assert str(error).startswith(f"{path}:{line}: {field}: "), case
    assert not list(tmp_path.glob(".meshtrust"))  # refused before anything was created


def test_the_ca_port_is_read_by_the_one_parser(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("ca: {listen: '[::1]:25012'}\n" + MESH)
    assert load_mesh_config(path).ca_port == 25012


@pytest.mark.parametrize(
    "name", ["web", "web-1", "a" * 63, "a" * 64, "Web_1", "web.1", "-web", "wéb", "web\x00", "1"]
)
def test_mesh_accepts_a_name_exactly_when_the_sidecar_does(tmp_path: Path, name: str) -> None:
    """`up` must not plan a sidecar the agent then refuses (a name one accepts and the other
    does not would start the CA and then kill the agent)."""
    path = tmp_path / "mesh.yaml"
    escaped = name.replace("\x00", "\\0")
    path.write_text(f'services:\n  - name: "{escaped}"\n    port: 25001\n')
    try:
        load_mesh_config(path)
        mesh_ok = True
    except ConfigError:
        mesh_ok = False
    try:
        SidecarConfig(name=name, app_port=25001, inbound_port=25002)
        sidecar_ok = True
    except ConfigError:
        sidecar_ok = False
    assert mesh_ok == sidecar_ok


# --- agent and CA settings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("load", "text", "line", "field", "problem"),
    [
        (load_agent_settings, AGENT + "cert-ttl: [1h]\n", 3, "cert-ttl", "got a list"),
        (load_agent_settings, AGENT + "ca-address: nowhere\n", 3, "ca-address", "HOST:PORT"),
        (load_agent_settings, AGENT + 'sds-socket: "a\\0b"\n', 3, "sds-socket", "NUL"),
        (load_agent_settings, AGENT + "policy: [a, 3]\n", 3, "policy[1]", "expected a string"),
        (load_agent_settings, AGENT + "output_dir: x\n", 3, "output_dir", "given twice"),
        (load_config_file, CA + "max-ttl: {d: 90}\n", 3, "max-ttl", "got a mapping"),
        (load_config_file, CA + "workers: many\n", 3, "workers", "expected an integer"),
        (load_config_file, CA + "metrics-listen: '::1:80'\n", 3, "metrics-listen", "HOST:PORT"),
        (load_config_file, "ca-dir: ca\nlisten: [1]\n", 2, "listen", "expected a string"),
        (
            load_config_file,
            CA + "jwt-issuer:\n  - {issuer: a, jwks: j.json}\n  - {issuer: b,\n     jwks: 3}\n",
            6,
            "jwt-issuer[1].jwks",
            "string",
        ),
        (load_config_file, CA + "max_tll: 90d\n", 3, "max_tll", "unknown key"),
    ],
)
def test_settings_errors_name_file_line_and_key(
    tmp_path: Path,
    load: Callable[[Path], object],
    text: str,
    line: int,
    field: str,
    problem: str,
) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert (info.value.file, info.value.line, info.value.field) == (path, line, field)
    assert problem in str(info.value)


# --- policies -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["AuthorizationPolicy", "PeerAuthentication"])
def test_a_policy_with_spec_null_is_refused(tmp_path: Path, kind: str) -> None:
    """`spec:` with nothing after it (often a spec whose indentation went wrong) is not read as
    an empty spec: for an AuthorizationPolicy that would silently deny every request."""
    path = tmp_path / "p.yaml"
    path.write_text(
        f"apiVersion: security.istio.io/v1\nkind: {kind}\n"
        "metadata: {name: x, namespace: default}\nspec:\n"
    )
    with pytest.raises(PolicyError) as info:
        load_policy_files([path])
    error = info.value
    assert (error.file, error.obj, error.field, error.line) == (
        path,
        f"{kind} default/x",
        "spec",
        4,
    )
    assert "spec is null" in str(error) and "spec: {}" in str(error)
    path.write_text(path.read_text() + "  {}\n")  # the explicit empty spec is fine
    assert load_policy_files([path])


def test_a_merge_key_in_a_policy_names_its_object_document_and_field(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        POLICY
        + "---\n"
        + POLICY.replace("name: x", "name: y").replace(
            "  rules: [{}]\n", "  rules:\n  - <<: {from: []}\n"
        )
    )
    with pytest.raises(PolicyError) as info:
        load_policy_files([path])
    error = info.value
    assert (error.obj, error.field, error.line) == ("document 2", "spec.rules[0].<<", 12)


# --- through the CLI ----------------------------------------------------------------------------


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("command", "text", "message"),
    [
        (["ca", "serve", "--config"], CA + "listen: 127.0.0.1:1\n", ":3: listen: duplicate key"),
        (["ca", "serve", "--config"], "a: " + "[" * 20_000 + "\n", ":1: a: nests deeper than"),
        (["agent", "--config"], AGENT + billion_laughs(), ":8: f[1]: expands to more than"),
        (["agent", "--config"], AGENT + "cert-ttl: [1h]\n", ":3: cert-ttl: expected a duration"),
        (["up"], "workDir: /proc/mesh\n" + MESH, ":1: workDir: /proc/mesh is under /proc"),
        (["up"], MESH.replace("a\n", "Web_1\n", 1), ":2: services[0].name: 'Web_1' is not a name"),
    ],
    ids=["ca-duplicate", "ca-nesting", "agent-bomb", "agent-ttl", "up-proc", "up-web_1"],
)
def test_the_cli_prints_one_line_and_exits_2(
    tmp_path: Path, command: list[str], text: str, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, output = _run(*command, str(path))
    assert code == 2
    assert output.startswith(f"error: {path}{message}")
    assert output.count("\n") == 1 and "Traceback" not in output


@pytest.mark.parametrize(
    ("metadata", "field", "problem"),
    [
        ("{name: x, labels: {app: 'a b'}}", "metadata.labels.app", "is not a label value"),
        ("{name: x, namespace: Web_1}", "metadata.namespace", "is not a name"),
        (
            "{name: 'x' }\nspec: {selector: {matchLabels: {-a: b}}}",
            "spec.selector.matchLabels",
            "label key '-a'",
        ),
    ],
)
def test_policies_use_the_shared_name_and_label_rules(
    tmp_path: Path, metadata: str, field: str, problem: str
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        f"apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {metadata}\n"
    )
    with pytest.raises(PolicyError) as info:
        load_policy_files([path])
    assert info.value.field == field
    assert problem in str(info.value)

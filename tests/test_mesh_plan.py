"""`meshtrust up`'s plan, without starting anything: ports, paths, order, file contents."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshtrust.agent.config import AgentConfig, load_agent_settings
from meshtrust.errors import ConfigError
from meshtrust.mesh import MeshPlan, load_mesh_config, plan_mesh
from meshtrust.mesh.plan import SUN_PATH_MAX, HttpOk, PathExists, Start, Wait, mesh_state
from meshtrust.mesh.state import CaState

STRICT = (
    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
    "metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n"
)


def mesh_file(directory: Path, **change: Any) -> Path:
    mesh: dict[str, Any] = {
        "certTTL": "2m",
        "workDir": "work",
        "ca": {"listen": "127.0.0.1:25999"},
        "services": [
            {
                "name": "web",
                "port": 25001,
                "command": ["python3", "app.py"],
                "env": {"CALL_EVERY": "5"},
                "upstreams": [{"service": "db-main", "localPort": 25101}],
            },
            {"name": "db-main", "port": 25002, "inboundPort": 26002, "protocol": "tcp"},
        ],
        "policies": ["p.yaml"],
    }
    mesh.update(change)
    (directory / "p.yaml").write_text(STRICT)
    path = directory / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh))
    return path


def ports(*values: int) -> Callable[[], int]:
    it: Iterator[int] = iter(values)
    return lambda: next(it)


def plan(directory: Path, picks: Callable[[], int] | None = None, **change: Any) -> MeshPlan:
    config = load_mesh_config(mesh_file(directory, **change))
    return plan_mesh(
        config,
        picks or ports(40001, 40002, 40003, 40004),
        python="/py",
        environ={"HOME": "/home/u", "PORT": "1"},
    )


def test_ports_fixed_and_picked(tmp_path: Path) -> None:
    # The picker's answers that the mesh file already uses, or that were picked already,
    # are skipped: 25999 is ca.listen, 26002 db-main's inboundPort.
    p = plan(tmp_path, ports(25999, 40001, 40001, 26002, 40002, 40003, 40004))
    assert p.fixed_ports == {
        25999: "ca.listen",
        25001: "service web port",
        25101: "service web upstream db-main localPort",
        25002: "service db-main port",
        26002: "service db-main inboundPort",
    }
    web, db = p.services
    assert p.ca_metrics == "127.0.0.1:40001"
    assert (web.status_listen, db.status_listen) == ("127.0.0.1:40002", "127.0.0.1:40003")
    assert (web.inbound_port, db.inbound_port) == (40004, 26002)  # picked / from the file


def test_paths(tmp_path: Path) -> None:
    p = plan(tmp_path)
    p_ca = p.ca
    assert p_ca is not None
    work = tmp_path.resolve() / "work"
    web = p.service("web")
    table = [
        (web.dir, work / "web"),
        (web.sds_socket, work / "web" / "sds.sock"),
        (web.workload_socket, work / "web" / "workload.sock"),
        (web.cert_dir, work / "web" / "certs"),
        (web.envoy_workdir, work / "web" / "envoy"),
        (web.token_file, work / "web" / "token"),
        (web.agent_config.path, work / "web" / "agent.yaml"),
        (web.sidecar_config.path, work / "web" / "sidecar.yaml"),
        (web.agent.log, work / "logs" / "web-agent.log"),
        (p_ca.log, work / "logs" / "ca.log"),
    ]
    for got, expected in table:
        assert got == expected
    assert web.app is not None and web.app.log == work / "logs" / "web-app.log"
    assert p.service("db-main").app is None
    assert p.dirs == (work / "logs", work / "web", work / "db-main")


def test_processes(tmp_path: Path) -> None:
    p = plan(tmp_path)
    work = tmp_path.resolve() / "work"
    assert p.ca is not None
    assert p.ca.argv == (
        "/py",
        "-m",
        "meshtrust",
        "ca",
        "serve",
        "--ca-dir",
        str(work / "ca"),
        "--trust-domain",  # the mesh file's: a plugged-in CA's root need not name it
        "cluster.local",
        "--listen",
        "127.0.0.1:25999",
        "--metrics-listen",
        "127.0.0.1:40001",
        "--default-ttl",
        "120s",
        "--max-ttl",
        f"{90 * 86400}s",
    )
    web = p.service("web")
    # The agent gets one --config file, not its settings as flags.
    assert web.agent.argv == (
        "/py",
        "-m",
        "meshtrust",
        "agent",
        "--config",
        str(web.agent_config.path),
    )
    assert web.agent.env is None  # inherits meshtrust's environment
    app = web.app
    assert app is not None
    assert app.argv == ("/py", "app.py")  # python3 -> the Python that runs meshtrust
    assert app.cwd == tmp_path.resolve()
    assert app.env is not None
    assert {k: app.env[k] for k in ("HOME", "CALL_EVERY", "PORT", "SERVICE_NAME")} == {
        "HOME": "/home/u",
        "CALL_EVERY": "5",
        "PORT": "25001",  # the mesh's value beats the inherited one
        "SERVICE_NAME": "web",
    }
    assert app.env["SPIFFE_ENDPOINT_SOCKET"] == f"unix://{web.workload_socket}"
    assert app.env["UPSTREAM_DB_MAIN"] == "127.0.0.1:25101"
    assert set(p.processes()) == {"ca", "web-agent", "web-app", "db-main-agent"}


def test_start_order(tmp_path: Path) -> None:
    p = plan(tmp_path)
    web, db = p.services
    assert p.steps == (
        Start("ca", "starting the CA for cluster.local on 127.0.0.1:25999"),
        Wait("the CA", HttpOk("http://127.0.0.1:40001/ready"), 30.0, "ca"),
        Start(
            "web-agent",
            "starting web: agent + Envoy (spiffe://cluster.local/ns/default/sa/web)",
        ),
        Start(
            "db-main-agent",
            "starting db-main: agent + Envoy (spiffe://cluster.local/ns/default/sa/db-main)",
        ),
        Wait("the Workload API socket of web", PathExists(web.workload_socket), 30.0, "web-agent"),
        Start("web-app", "starting the app of web"),
        Wait(
            "the Workload API socket of db-main",
            PathExists(db.workload_socket),
            30.0,
            "db-main-agent",
        ),
        Wait(
            "web (certificate + Envoy)",
            HttpOk("http://127.0.0.1:40002/healthz/ready"),
            60.0,
            "web-agent",
        ),
        Wait(
            "db-main (certificate + Envoy)",
            HttpOk("http://127.0.0.1:40003/healthz/ready"),
            60.0,
            "db-main-agent",
        ),
    )


def test_the_state_file_of_the_started_mesh(tmp_path: Path) -> None:
    p = plan(tmp_path)
    work = tmp_path.resolve() / "work"
    state = mesh_state(p, {"ca": 10, "web-agent": 20, "web-app": 21, "db-main-agent": 30})
    assert (state.mesh_file, state.work_dir) == (str(tmp_path.resolve() / "mesh.yaml"), str(work))
    assert (state.trust_domain, state.cert_ttl_seconds) == ("cluster.local", 120)
    assert state.policy_files == [str(tmp_path.resolve() / "p.yaml")]
    assert state.ca == CaState(
        10, "127.0.0.1:25999", "127.0.0.1:40001", str(work / "ca"), str(work / "logs" / "ca.log")
    )
    web, db = state.services
    assert (web.name, web.agent_pid, web.app_pid, db.agent_pid, db.app_pid) == (
        "web",
        20,
        21,
        30,
        None,
    )
    assert (web.status, web.inbound_port, web.app_port) == ("127.0.0.1:40002", 40004, 25001)
    assert (web.sds_socket, web.workload_socket) == (
        str(work / "web" / "sds.sock"),
        str(work / "web" / "workload.sock"),
    )
    assert (web.agent_log, web.app_log, db.app_log) == (
        str(work / "logs" / "web-agent.log"),
        str(work / "logs" / "web-app.log"),
        None,
    )
    assert web.upstreams == {"db-main": 25101} and db.upstreams == {}
    assert (db.protocol, db.spiffe_id) == ("tcp", "spiffe://cluster.local/ns/default/sa/db-main")


def test_agent_config_is_a_file_the_agent_accepts(tmp_path: Path) -> None:
    p = plan(tmp_path)
    web = p.service("web")
    work = tmp_path.resolve() / "work"
    assert yaml.safe_load(web.agent_config.content) == {
        "ca-address": "127.0.0.1:25999",
        "ca-root": str(work / "ca" / "root-cert.pem"),
        "token-file": str(web.token_file),
        "trust-domain": "cluster.local",
        "namespace": "default",
        "service-account": "web",
        "cert-ttl": "120s",
        "sds-socket": str(web.sds_socket),
        "workload-socket": str(web.workload_socket),
        "output-dir": str(web.cert_dir),
        "status-listen": "127.0.0.1:40002",
        "sidecar": str(web.sidecar_config.path),
        "envoy-workdir": str(web.envoy_workdir),
        "root-namespace": "istio-system",
        "policy": [str(tmp_path.resolve() / "p.yaml")],
    }
    # Read by the agent's own loader, as `meshtrust agent --config` will.
    written = tmp_path / "agent.yaml"
    written.write_text(web.agent_config.content)
    settings: dict[str, Any] = load_agent_settings(written)
    config = AgentConfig(**settings)
    assert config.sds_socket == web.sds_socket and config.sidecar == web.sidecar_config.path
    assert config.policy_files == (tmp_path.resolve() / "p.yaml",)


def test_sidecar_config(tmp_path: Path) -> None:
    p = plan(tmp_path)
    assert yaml.safe_load(p.service("web").sidecar_config.content) == {
        "name": "web",
        "namespace": "default",
        "labels": {"app": "web"},
        "app_port": 25001,
        "inbound_port": 40004,
        "inbound_address": "127.0.0.1",
        "min_tls_version": "TLSV1_2",
        "protocol": "http",
        "upstreams": [
            {
                "name": "db-main",
                "local_port": 25101,
                "address": "127.0.0.1:26002",
                "spiffe_id": "spiffe://cluster.local/ns/default/sa/db-main",
                "protocol": "tcp",
            }
        ],
    }
    assert [f.path.name for f in p.files] == ["sidecar.yaml", "agent.yaml"] * 2


def _work_dir_for(tmp_path: Path, socket_bytes: int, name: str) -> Path:
    """A workDir that makes `<workDir>/<name>/envoy/admin.sock` (the longest socket path of a
    service: Envoy's admin API) exactly ``socket_bytes`` long."""
    base = tmp_path.resolve()
    fill = socket_bytes - len(f"{base}/{name}/envoy/admin.sock") - 1
    assert fill > 0
    return base / ("w" * fill)


@pytest.mark.parametrize(
    ("socket_bytes", "refused"),
    # db-main's admin.sock at 107, 108 bytes (web's paths are shorter: only db-main's
    # are too long), and far beyond (web, first in the file, is named first).
    [(SUN_PATH_MAX - 1, None), (SUN_PATH_MAX, "db-main"), (SUN_PATH_MAX + 40, "web")],
)
def test_a_socket_path_too_long_is_refused_naming_the_service(
    tmp_path: Path, socket_bytes: int, refused: str | None
) -> None:
    work = _work_dir_for(tmp_path, socket_bytes, "db-main")
    assert len(str(work / "db-main" / "envoy" / "admin.sock")) == socket_bytes
    if refused is None:
        p = plan(tmp_path, workDir=str(work))
        assert len(str(p.service("db-main").admin_socket).encode()) == SUN_PATH_MAX - 1
        assert p.service("db-main").admin_socket == work / "db-main" / "envoy" / "admin.sock"
        return
    with pytest.raises(ConfigError) as exc:
        plan(tmp_path, workDir=str(work))
    message = str(exc.value)
    assert message.startswith(f"service {refused}: its socket path ")
    assert ".sock is " in message
    assert "shorter workDir" in message
    if socket_bytes == SUN_PATH_MAX:  # only the admin socket is too long: it is the one named
        assert "/envoy/admin.sock is 108 bytes" in message


def test_a_long_service_name_is_refused_by_the_plan(tmp_path: Path) -> None:
    name = "s" * 60
    services = [{"name": name, "port": 25001}]
    deep = tmp_path.resolve() / ("d" * 40)
    with pytest.raises(ConfigError, match=f"service {name}: its socket path"):
        plan(tmp_path, services=services, workDir=str(deep))

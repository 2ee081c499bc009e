"""A mesh across hosts, without starting anything: mesh.yaml's hosts, placement, per-service
certificate settings and the TLS floor, and each host's plan (``plan_mesh(..., host=)``)."""

from __future__ import annotations

import copy
import datetime as dt
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from meshtrust.ca.cadir import init_ca_dir
from meshtrust.ca.join import create_join_file
from meshtrust.cli.main import cli
from meshtrust.clock import SystemClock
from meshtrust.envoy.sidecar import (
    SidecarConfig,
    inbound_listeners,
    load_sidecar_config,
    sidecar_bootstrap,
)
from meshtrust.errors import ConfigError
from meshtrust.joinfile import load_join_file
from meshtrust.mesh import MeshConfig, MeshPlan, load_mesh_config, plan_mesh
from meshtrust.mesh.join import plan_join
from meshtrust.mesh.launch import launch
from meshtrust.mesh.plan import HttpOk, Start, Wait, mesh_state
from meshtrust.policy import InboundPolicy, MtlsMode

BASE: dict[str, Any] = {
    "certTTL": "2m",
    "workDir": "work",
    "hosts": [
        {"name": "h1", "address": "198.18.0.1"},
        {"name": "h2", "address": "198.18.0.2"},
        {"name": "h3", "address": "198.18.0.3"},
    ],
    "ca": {"host": "h1"},
    "meshMTLS": {"minProtocolVersion": "TLSV1_3"},
    "services": [
        {
            "name": "web",
            "host": "h2",
            "port": 8080,
            "inboundPort": 16080,
            "certTTL": "1m",
            "rotationRatio": 0.6,
            "upstreams": [{"service": "api", "localPort": 19001}],
        },
        # On another host the same ports may be used again.
        {"name": "api", "host": "h3", "port": 8080, "inboundPort": 16080},
        {"name": "db", "host": "h3", "port": 8081, "inboundPort": 16081},
    ],
}


def write(directory: Path, mesh: dict[str, Any]) -> Path:
    path = directory / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh, sort_keys=False))
    return path


def ports(start: int = 40001) -> Callable[[], int]:
    it: Iterator[int] = iter(range(start, start + 100))
    return lambda: next(it)


def plan_for(directory: Path, host: str | None, mesh: dict[str, Any] | None = None) -> MeshPlan:
    config = load_mesh_config(write(directory, mesh or BASE))
    return plan_mesh(config, ports(), python="/py", environ={}, host=host)


def changed(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    mesh = copy.deepcopy(BASE)
    edit(mesh)
    return mesh


def test_hosts_placement_and_per_service_settings_are_read(tmp_path: Path) -> None:
    config = load_mesh_config(write(tmp_path, BASE))
    assert [(h.name, h.address) for h in config.hosts] == [
        ("h1", "198.18.0.1"),
        ("h2", "198.18.0.2"),
        ("h3", "198.18.0.3"),
    ]
    assert config.ca_host == "h1"
    assert config.ca_listen == "198.18.0.1:15012" == config.ca_address
    assert config.ca_dir == (tmp_path / "work" / "h1" / "ca").resolve()
    assert config.min_tls_version == "TLSV1_3"
    web, api, _ = config.services
    assert (web.host, web.cert_ttl and web.cert_ttl.total_seconds(), web.rotation_ratio) == (
        "h2",
        60,
        0.6,
    )
    assert (api.host, api.cert_ttl, api.rotation_ratio) == ("h3", None, None)


def test_without_hosts_nothing_changes(tmp_path: Path) -> None:
    mesh = {"services": [{"name": "a", "port": 8080}]}
    config = load_mesh_config(write(tmp_path, mesh))
    assert config.hosts == () and config.ca_host is None and config.min_tls_version == "TLSV1_2"
    assert config.ca_address == "127.0.0.1:15012"
    p = plan_mesh(config, ports(), python="/py", environ={})
    sidecar = yaml.safe_load(p.service("a").sidecar_config.content)
    assert sidecar["inbound_address"] == "127.0.0.1"


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit of BASE: ``services.0.host`` = value (``None`` removes the key)."""

    def edit(mesh: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = mesh
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is None:
            del node[int(last) if isinstance(node, list) else last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "line", "message"),
    [
        (_set("services.0.host", "h9"), 16, "services[0].host: no host 'h9' in hosts"),
        (_set("services.1.host", None), 24, "services[1]: missing required key 'host'"),
        (_set("services.1.inboundPort", None), 24, "services[1]: missing required key 'inbound"),
        (_set("ca.host", None), 10, "ca: missing required key 'host'"),
        (_set("ca.host", "h7"), 11, "ca.host: no host 'h7' in hosts"),
        (_set("hosts.1.name", "h1"), 6, "hosts[1].name: duplicate host 'h1' (also hosts[0])"),
        (_set("hosts.2.address", "198.18.0.1"), 9, "hosts[2].address: address 198.18.0.1 is"),
        (_set("hosts.0.address", "not an address!"), 5, "hosts[0].address: expected an IP"),
        (_set("hosts.0.port", 1), 6, "hosts[0].port: unknown key"),
        (_set("hosts", []), 3, "hosts: expected a non-empty list"),
        (_set("services.0.certTTL", "5s"), 19, "services[0].certTTL: must be at least 10s"),
        (_set("services.0.certTTL", "soon"), 19, "services[0].certTTL:"),
        (_set("services.0.rotationRatio", 1.5), 20, "services[0].rotationRatio: expected a"),
        (_set("services.0.rotationRatio", "half"), 20, "services[0].rotationRatio: expected a"),
        (
            _set("meshMTLS.minProtocolVersion", "TLSV1_1"),
            13,
            "meshMTLS.minProtocolVersion: expected TLSV1_2 or TLSV1_3, got 'TLSV1_1'",
        ),
        (_set("meshMTLS.maxProtocolVersion", "TLSV1_3"), 14, "meshMTLS.maxProtocolVersion: unk"),
        # Ports collide per host: db moved next to api takes api's port.
        (
            _set("services.2.inboundPort", 16080),
            31,
            "services[2].inboundPort: port 16080 is already used by services[1].inboundPort",
        ),
        # On the CA's host the CA's port counts.
        (_set("services.0.host", "h1"), 0, ""),
    ],
)
def test_bad_hosts_are_refused_with_file_line_and_field(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], line: int, message: str
) -> None:
    path = write(tmp_path, changed(edit))
    if not message:  # the control: a valid edit loads
        load_mesh_config(path)
        return
    with pytest.raises(ConfigError) as caught:
        load_mesh_config(path)
    text = str(caught.value)
    assert text.startswith(f"{path}:{line}: {message}"), text


def test_the_ca_port_collides_only_on_the_ca_host(tmp_path: Path) -> None:
    def on_h1(mesh: dict[str, Any]) -> None:
        mesh["services"][1]["host"] = "h1"
        mesh["services"][1]["inboundPort"] = 15012

    with pytest.raises(ConfigError, match=r"port 15012 is already used by ca.listen"):
        load_mesh_config(write(tmp_path, changed(on_h1)))
    mesh = changed(_set("services.1.inboundPort", 15012))  # on h3: fine
    load_mesh_config(write(tmp_path, mesh))


def test_service_host_without_hosts_is_refused(tmp_path: Path) -> None:
    mesh = {"services": [{"name": "a", "port": 8080, "host": "h1"}]}
    with pytest.raises(ConfigError, match=r"mesh.yaml:4: services\[0\].host: a service host"):
        load_mesh_config(write(tmp_path, mesh))


@pytest.mark.parametrize(
    ("host", "message"),
    [
        (None, "places services on hosts (h1, h2, h3): say which one this is, with --host"),
        ("h9", "has no host 'h9' (hosts: h1, h2, h3)"),
    ],
)
def test_a_plan_needs_a_known_host(tmp_path: Path, host: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_for(tmp_path, host)


def test_the_ca_host_plans_the_ca_on_its_address_and_no_other_service(tmp_path: Path) -> None:
    p = plan_for(tmp_path, "h1")
    work = (tmp_path / "work").resolve()
    assert p.work_dir == work / "h1" and p.logs_dir == work / "h1" / "logs"
    assert p.services == () and p.ca is not None and p.credentials == "mint"
    argv = list(p.ca.argv)
    assert argv[argv.index("--listen") + 1] == "198.18.0.1:15012"
    assert argv[argv.index("--ca-dir") + 1] == str(work / "h1" / "ca")
    assert p.ca_metrics is not None and p.ca_metrics.startswith("127.0.0.1:")
    assert p.fixed_ports == {15012: "ca.listen"}
    assert isinstance(p.steps[0], Start) and p.steps[0].process == "ca"
    state = mesh_state(p, {"ca": 1})
    assert state.host == "h1" and state.ca is not None and state.work_dir == str(work / "h1")
    # The CA's host knows every identity of the mesh, for `status`.
    assert state.identities == {
        "spiffe://cluster.local/ns/default/sa/web": "h2",
        "spiffe://cluster.local/ns/default/sa/api": "h3",
        "spiffe://cluster.local/ns/default/sa/db": "h3",
    }


def test_another_host_plans_its_services_bound_to_its_address(tmp_path: Path) -> None:
    p = plan_for(tmp_path, "h2")
    work = (tmp_path / "work").resolve()
    assert p.ca is None and p.ca_metrics is None and p.credentials == "provisioned"
    assert [s.spec.name for s in p.services] == ["web"]
    web = p.service("web")
    assert (
        web.dir == work / "h2" / "web" and web.agent.log == work / "h2" / "logs" / "web-agent.log"
    )
    assert web.status_listen.startswith("127.0.0.1:")
    assert p.fixed_ports == {
        8080: "service web port",
        16080: "service web inboundPort",
        19001: "service web upstream api localPort",
    }
    assert not any(isinstance(s, Start) and s.process == "ca" for s in p.steps)
    urls = [s.until.url for s in p.steps if isinstance(s, Wait) and isinstance(s.until, HttpOk)]
    assert urls and all(u.startswith("http://127.0.0.1:") for u in urls)
    agent = yaml.safe_load(web.agent_config.content)
    assert agent["ca-address"] == "198.18.0.1:15012"
    assert agent["ca-root"] == str(work / "h2" / "trust" / "root-cert.pem")
    assert agent["cert-ttl"] == "60s" and agent["rotation-ratio"] == 0.6
    sidecar = yaml.safe_load(web.sidecar_config.content)
    assert sidecar["inbound_address"] == "198.18.0.2"
    assert sidecar["min_tls_version"] == "TLSV1_3"
    assert sidecar["upstreams"] == [
        {
            "name": "api",
            "local_port": 19001,
            "address": "198.18.0.3:16080",
            "spiffe_id": "spiffe://cluster.local/ns/default/sa/api",
            "protocol": "http",
        }
    ]
    state = mesh_state(p, {"web-agent": 5})
    assert state.ca is None and state.ca_address == "198.18.0.1:15012"
    assert state.root_cert == agent["ca-root"] and state.identities == {}
    # A service without its own certTTL/rotationRatio gets the mesh's (no rotation-ratio key:
    # the agent's default).
    api = yaml.safe_load(plan_for(tmp_path, "h3").service("api").agent_config.content)
    assert api["cert-ttl"] == "120s" and "rotation-ratio" not in api


def test_a_host_named_by_dns_binds_every_address_and_is_dialled_by_name(tmp_path: Path) -> None:
    mesh = changed(_set("hosts.2.address", "h3.mesh.example"))
    api = plan_for(tmp_path, "h3", mesh).service("api")
    assert yaml.safe_load(api.sidecar_config.content)["inbound_address"] == "0.0.0.0"
    web = yaml.safe_load(plan_for(tmp_path, "h2", mesh).service("web").sidecar_config.content)
    assert web["upstreams"][0]["address"] == "h3.mesh.example:16080"


def test_the_ca_accepts_the_longest_per_service_ttl(tmp_path: Path) -> None:
    p = plan_for(tmp_path, "h1", changed(_set("services.1.certTTL", "100d")))
    assert p.ca is not None
    argv = list(p.ca.argv)
    assert argv[argv.index("--max-ttl") + 1] == f"{100 * 86400}s"


def test_the_sidecar_file_reaches_envoy_binding_and_tls_floor(tmp_path: Path) -> None:
    web = plan_for(tmp_path, "h2").service("web")
    path = tmp_path / "sidecar.yaml"
    path.write_text(web.sidecar_config.content)
    config = load_sidecar_config(path)
    assert config.inbound_address == "198.18.0.2" and config.min_tls_version == "TLSV1_3"
    listener = inbound_listeners(config, InboundPolicy(mode=MtlsMode.STRICT, rbac_filters=()))[0]
    assert listener["address"]["socket_address"] == {
        "address": "198.18.0.2",
        "port_value": 16080,
    }
    tls = listener["filter_chains"][0]["transport_socket"]["typed_config"]
    assert tls["common_tls_context"]["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_3"
    boot = sidecar_bootstrap(
        config,
        sds_socket=tmp_path / "sds.sock",
        lds_path=tmp_path / "lds" / "l.json",
        node_id="n",
        admin_socket=tmp_path / "admin.sock",
    )
    (outbound,) = [c for c in boot["static_resources"]["clusters"] if c["name"] == "outbound|api"]
    params = outbound["transport_socket"]["typed_config"]["common_tls_context"]["tls_params"]
    assert params["tls_minimum_protocol_version"] == "TLSv1_3"
    # The outbound listener stays on loopback.
    (out_listener,) = boot["static_resources"]["listeners"]
    assert out_listener["address"]["socket_address"]["address"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("inbound_address", "example.com", "inbound_address: expected an IP address"),
        ("min_tls_version", "TLSv1_0", "min_tls_version: expected TLSV1_2 or TLSV1_3"),
    ],
)
def test_bad_sidecar_binding_or_tls_floor_is_refused(
    tmp_path: Path, key: str, value: str, message: str
) -> None:
    path = tmp_path / "sidecar.yaml"
    sidecar = {"name": "a", "app_port": 1, "inbound_port": 2, key: value}
    path.write_text(yaml.safe_dump(sidecar, sort_keys=False))
    with pytest.raises(ConfigError, match=f"sidecar.yaml:4: {message}"):
        load_sidecar_config(path)
    assert SidecarConfig(name="a", app_port=1, inbound_port=2).inbound_address == "127.0.0.1"


# --- join files: what they grant, and `up --join` refusing a wrong one before anything starts


def test_a_join_grant_is_the_identities_of_the_hosts_services(tmp_path: Path) -> None:
    config = load_mesh_config(write(tmp_path, BASE))
    grant = plan_join(config, "h3")
    assert [str(i) for i in grant.identities] == [
        "spiffe://cluster.local/ns/default/sa/api",
        "spiffe://cluster.local/ns/default/sa/db",
    ]
    assert grant.ca_addresses == ("198.18.0.1:15012",)


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("h1", "h1 runs the CA: `meshtrust up .* --host h1` needs no join file"),
        ("h9", r"has no host 'h9' \(hosts: h1, h2, h3\)"),
    ],
)
def test_a_join_grant_for_the_ca_host_or_an_unknown_one_is_refused(
    tmp_path: Path, host: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_join(load_mesh_config(write(tmp_path, BASE)), host)


def test_a_join_grant_for_a_host_without_services_is_refused(tmp_path: Path) -> None:
    mesh = changed(lambda m: m["hosts"].append({"name": "h4", "address": "198.18.0.4"}))
    with pytest.raises(ConfigError, match="no service of .* is placed on h4: nothing to join"):
        plan_join(load_mesh_config(write(tmp_path, mesh)), "h4")


def _join_file(config: MeshConfig, host: str, out: Path, ttl: dt.timedelta) -> Path:
    init_ca_dir(config.ca_dir, config.trust_domain, SystemClock().now())
    grant = plan_join(config, host)
    now = SystemClock().now()
    create_join_file(config.ca_dir, grant.identities, grant.ca_addresses, ttl, now, out, host=host)
    return out


@pytest.mark.parametrize(
    ("made_for", "ttl", "message"),
    [
        ("h2", dt.timedelta(hours=1), "is not for host h3: it cannot obtain spiffe://"),
        ("h3", dt.timedelta(seconds=1), "expired at .* make a new one on the CA's host"),
    ],
)
def test_up_refuses_a_wrong_or_expired_join_file_before_anything_starts(
    tmp_path: Path, made_for: str, ttl: dt.timedelta, message: str
) -> None:
    config = load_mesh_config(write(tmp_path, BASE))
    join = _join_file(config, made_for, tmp_path / f"{made_for}.join", ttl)
    if ttl < dt.timedelta(minutes=1):
        time.sleep(1.1)
    p = plan_mesh(config, ports(), python="/py", environ={}, host="h3", join_file=join)
    assert p.credentials == "join"
    with pytest.raises(ConfigError, match=message):
        launch(p, progress=lambda _: None)
    assert not (tmp_path / "work" / "h3" / "api").exists()


def test_up_without_a_join_file_on_another_host_says_how_to_get_one(tmp_path: Path) -> None:
    config = load_mesh_config(write(tmp_path, BASE))
    p = plan_mesh(config, ports(), python="/py", environ={}, host="h2")
    with pytest.raises(ConfigError, match=r"start it with `--join FILE`.*join create .* --host h2"):
        launch(p, progress=lambda _: None)
    assert not (tmp_path / "work" / "h2" / "web").exists()


def test_up_on_the_wrong_machine_is_refused_before_anything_starts(tmp_path: Path) -> None:
    config = load_mesh_config(write(tmp_path, BASE))
    join = _join_file(config, "h2", tmp_path / "h2.join", dt.timedelta(hours=1))
    p = plan_mesh(config, ports(), python="/py", environ={}, host="h2", join_file=join)
    # This machine has no 198.18.0.2 (the netns tests give it to a host of theirs).
    with pytest.raises(ConfigError, match=r"address 198.18.0.2 is not an address of this machine"):
        launch(p, progress=lambda _: None)
    assert not (tmp_path / "work" / "h2" / "web").exists()


def test_a_join_file_on_the_ca_host_is_refused(tmp_path: Path) -> None:
    config = load_mesh_config(write(tmp_path, BASE))
    with pytest.raises(ConfigError, match="h1 runs the CA.*drop --join"):
        plan_mesh(config, ports(), python="/py", host="h1", join_file=tmp_path / "x.join")


def test_join_create_with_a_mesh_file_grants_the_hosts_services(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    config = load_mesh_config(path)
    init_ca_dir(config.ca_dir, config.trust_domain, SystemClock().now())
    out = tmp_path / "h3.join"
    args = ["join", "create", str(path), "--host", "h3", "--ttl", "30m", "-o", str(out)]
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    join = load_join_file(out)
    assert [str(i) for i in join.identities] == [
        "spiffe://cluster.local/ns/default/sa/api",
        "spiffe://cluster.local/ns/default/sa/db",
    ]
    assert join.ca_addresses == ("198.18.0.1:15012",) and join.host == "h3"
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    mixed = CliRunner().invoke(cli, [*args, "--identity", "spiffe://cluster.local/ns/x/sa/y"])
    assert mixed.exit_code != 0 and "drop --ca-dir, --identity and --ca-address" in mixed.output

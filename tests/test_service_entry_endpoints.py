"""A ServiceEntry with several endpoints: the sidecar upstream dials all of them.

The plan passes every endpoint of the entry (``address``, then ``extra_addresses`` in the
entry's order), the sidecar file carries them, the agent reads them back (bad ones refused
with file, line and field), the outbound cluster's load assignment lists them all behind one
TLS context (each endpoint must present the one expected identity), and the real Envoy
accepts the config (``--mode validate``), for IP endpoints (STATIC) and DNS names
(STRICT_DNS).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshtrust.envoy.bootstrap import envoy_binary
from meshtrust.envoy.sidecar import (
    SidecarConfig,
    Upstream,
    load_sidecar_config,
    sidecar_bootstrap,
)
from meshtrust.errors import ConfigError
from meshtrust.mesh import load_mesh_config, plan_mesh
from meshtrust.spiffe import SpiffeId
from tests.test_mesh_remote_upstreams import POLICIES, WEST_API, mesh_file, ports

API = SpiffeId.parse(WEST_API)

THREE_IPS = POLICIES.replace(
    "{address: 198.18.0.2}",
    "{address: 198.18.0.2}\n  - {address: 198.18.0.3}\n"
    "  - {address: 198.18.0.4, ports: {https: 17443}}",
)
TWO_NAMES = POLICIES.replace("resolution: STATIC", "resolution: DNS").replace(
    "{address: 198.18.0.2}", "{address: west-gw-a.example}\n  - {address: west-gw-b.example}"
)


def _api_upstream(tmp_path: Path, policies: str) -> dict[str, Any]:
    path = mesh_file(
        tmp_path, [{"host": "api.west.test", "port": 443, "localPort": 25102}], policies
    )
    plan = plan_mesh(load_mesh_config(path), ports(), python="/py", environ={})
    upstream: dict[str, Any] = yaml.safe_load(plan.service("web").sidecar_config.content)[
        "upstreams"
    ][0]
    return upstream


def test_the_plan_passes_every_endpoint_of_the_entry_in_its_order(tmp_path: Path) -> None:
    path = mesh_file(
        tmp_path, [{"host": "api.west.test", "port": 443, "localPort": 25102}], THREE_IPS
    )
    (remote,) = load_mesh_config(path).service("web").remote_upstreams
    assert remote.address == "198.18.0.2:16080"  # the port's targetPort
    # ... and the third endpoint's own port for the port's name.
    assert remote.extra_addresses == ("198.18.0.3:16080", "198.18.0.4:17443")
    assert _api_upstream(tmp_path, THREE_IPS) == {
        "name": "api-west-test",
        "local_port": 25102,
        "address": "198.18.0.2:16080",
        "spiffe_id": WEST_API,
        "protocol": "tcp",
        "extra_addresses": ["198.18.0.3:16080", "198.18.0.4:17443"],
    }


def test_one_endpoint_plans_no_extra_addresses(tmp_path: Path) -> None:
    assert "extra_addresses" not in _api_upstream(tmp_path, POLICIES)


def test_the_outbound_cluster_balances_over_all_endpoints_with_one_identity(
    tmp_path: Path,
) -> None:
    upstream = Upstream(
        name="api",
        local_port=25102,
        address="198.18.0.2:16080",
        spiffe_id=API,
        extra_addresses=("198.18.0.3:16080", "[2001:db8::4]:17443"),
    )
    assert upstream.endpoints == (
        ("198.18.0.2", 16080),
        ("198.18.0.3", 16080),
        ("2001:db8::4", 17443),
    )
    cluster = _clusters(tmp_path, upstream)["outbound|api"]
    assert cluster["type"] == "STATIC"
    (locality,) = cluster["load_assignment"]["endpoints"]
    assert [e["endpoint"]["address"]["socket_address"] for e in locality["lb_endpoints"]] == [
        {"address": "198.18.0.2", "port_value": 16080},
        {"address": "198.18.0.3", "port_value": 16080},
        {"address": "2001:db8::4", "port_value": 17443},
    ]
    context = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    sans = context["combined_validation_context"]["default_validation_context"]
    assert sans["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": WEST_API}}
    ]


def test_an_upstream_without_extra_addresses_has_its_one_endpoint(tmp_path: Path) -> None:
    upstream = Upstream(name="api", local_port=25102, address="198.18.0.2:443", spiffe_id=API)
    cluster = _clusters(tmp_path, upstream)["outbound|api"]
    (locality,) = cluster["load_assignment"]["endpoints"]
    assert locality["lb_endpoints"] == [
        {"endpoint": {"address": {"socket_address": {"address": "198.18.0.2", "port_value": 443}}}}
    ]


@pytest.mark.parametrize(
    ("address", "extra", "field", "problem"),
    [
        ("198.18.0.2:443", ("gw.example:443",), "extra_addresses[0]", "is a DNS name and"),
        ("gw.example:443", ("198.18.0.3:443",), "extra_addresses[0]", "is an IP address and"),
        (
            "198.18.0.2:443",
            ("198.18.0.3:443", "198.18.0.2:443"),
            "extra_addresses[1]",
            "198.18.0.2:443 is already given as address",
        ),
        (
            "198.18.0.2:443",
            ("198.18.0.3:443", "198.18.0.3:443"),
            "extra_addresses[1]",
            "is already given as extra_addresses[0]",
        ),
        ("198.18.0.2:443", ("198.18.0.3",), "extra_addresses[0]", "is not HOST:PORT"),
        ("198.18.0.2:443", ("198.18.0.3:0",), "extra_addresses[0]", "is not HOST:PORT"),
        ("198.18.0.2:443", "198.18.0.3:443", "extra_addresses", "expected a list"),
        ("198.18.0.2:443", (443,), "extra_addresses[0]", "expected HOST:PORT"),
    ],
)
def test_bad_extra_addresses_are_refused_naming_the_field(
    address: str, extra: Any, field: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Upstream(
            name="api", local_port=25102, address=address, spiffe_id=API, extra_addresses=extra
        )
    assert info.value.field == field, info.value
    assert problem in str(info.value), info.value


@pytest.mark.parametrize(
    ("value", "field", "problem"),
    [
        ("[198.18.0.3:443, gw.example:443]", "extra_addresses[1]", "is a DNS name and"),
        ("198.18.0.3:443", "extra_addresses", "expected a list of HOST:PORT"),
        ("[198.18.0.3:443, '198.18.0.3:x']", "extra_addresses[1]", "is not HOST:PORT"),
        ("[198.18.0.2:443]", "extra_addresses[0]", "already given as address"),
    ],
)
def test_a_bad_sidecar_file_names_the_line_of_the_extra_address(
    tmp_path: Path, value: str, field: str, problem: str
) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "name: web\napp_port: 8080\ninbound_port: 15006\nupstreams:\n"
        "  - name: api\n    local_port: 15101\n    address: 198.18.0.2:443\n"
        f"    spiffe_id: {WEST_API}\n    extra_addresses: {value}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_sidecar_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:9: upstreams[0].{field}: "), message
    assert problem in message, message


def _clusters(tmp_path: Path, *upstreams: Upstream) -> dict[str, Any]:
    return {c["name"]: c for c in _bootstrap(tmp_path, *upstreams)["static_resources"]["clusters"]}


def _bootstrap(tmp_path: Path, *upstreams: Upstream) -> dict[str, Any]:
    return sidecar_bootstrap(
        SidecarConfig(name="web", app_port=25001, inbound_port=26001, upstreams=upstreams),
        sds_socket=tmp_path / "sds.sock",
        lds_path=tmp_path / "lds" / "listeners.json",
        node_id="sidecar~127.0.0.1~web.default~local",
        admin_socket=tmp_path / "admin.sock",
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("policies", "kind", "endpoints"),
    [
        (
            THREE_IPS,
            "STATIC",
            [("198.18.0.2", 16080), ("198.18.0.3", 16080), ("198.18.0.4", 17443)],
        ),
        (TWO_NAMES, "STRICT_DNS", [("west-gw-a.example", 16080), ("west-gw-b.example", 16080)]),
    ],
    ids=["ips", "dns-names"],
)
def test_the_real_envoy_accepts_an_upstream_of_several_endpoints(
    tmp_path: Path, policies: str, kind: str, endpoints: list[tuple[str, int]]
) -> None:
    path = mesh_file(
        tmp_path, [{"host": "api.west.test", "port": 443, "localPort": 25102}], policies
    )
    planned = plan_mesh(load_mesh_config(path), ports(), python="/py", environ={})
    sidecar_file = planned.service("web").sidecar_config
    sidecar_file.path.parent.mkdir(parents=True)
    sidecar_file.path.write_text(sidecar_file.content)
    (api,) = load_sidecar_config(sidecar_file.path).upstreams  # what the agent reads
    assert api.endpoints == tuple(endpoints)
    bootstrap = _bootstrap(tmp_path, api)
    cluster = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}[
        "outbound|api-west-test"
    ]
    assert cluster["type"] == kind
    (locality,) = cluster["load_assignment"]["endpoints"]
    assert len(locality["lb_endpoints"]) == len(endpoints)
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(bootstrap))
    (tmp_path / "lds").mkdir()
    (tmp_path / "lds" / "listeners.json").write_text('{"resources": []}')
    done = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

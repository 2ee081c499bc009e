"""examples/multi-cluster: the seed's multi-cluster-mtls.yaml, adapted to the addresses of
the two-mesh test (tests/test_multi_cluster_netns.py), loaded through east's mesh.yaml as one
of its policy files; and the adaptation changes nothing of what the seed says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from meshtrust.mesh import load_mesh_config
from meshtrust.mesh.analyze import analyze_file
from meshtrust.policy import Protocol, load_policy_files
from meshtrust.policy.model import MtlsMode
from meshtrust.spiffe import SpiffeId
from tests.test_federation_services import SEED

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "multi-cluster"
WEST_HOST = "198.18.0.2"  # west's host in the netns test (tests/netns.py: the second host)
WEST_API = "spiffe://west.test/ns/default/sa/api"


def _documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def test_the_adapted_file_says_what_the_seed_says(tmp_path: Path) -> None:
    seed = _documents(SEED)
    adapted = _documents((EXAMPLE / "multi-cluster-mtls.yaml").read_text())
    seed_pa, seed_se = seed
    pa, se, dr = adapted
    assert pa == seed_pa  # mesh-wide STRICT, as written
    # The ServiceEntry: as written, but for its endpoint (an address of the test) and the
    # trafficPolicy Istio has no field for there...
    traffic = seed_se["spec"].pop("trafficPolicy")
    seed_se["spec"]["endpoints"] = [{"address": WEST_HOST}]
    assert se == seed_se
    # ...which is the DestinationRule's, for the same hosts, with the identity to accept.
    assert dr["kind"] == "DestinationRule" and dr["metadata"] == seed_se["metadata"]
    assert dr["spec"]["host"] == seed_se["spec"]["hosts"][0]
    tls = dr["spec"]["trafficPolicy"]["tls"]
    assert tls.pop("subjectAltNames") == [WEST_API]
    assert dr["spec"]["trafficPolicy"] == traffic


def test_east_loads_it_through_its_mesh_file_and_web_calls_wests_api() -> None:
    config = load_mesh_config(EXAMPLE / "east.yaml")
    assert config.policy_files == (EXAMPLE / "multi-cluster-mtls.yaml",)
    policies = load_policy_files(list(config.policy_files))
    (pa,) = policies.peer_authentications
    assert (pa.namespace, pa.mode) == ("istio-system", MtlsMode.STRICT)
    for name in ("web", "other"):
        (api,) = config.service(name).remote_upstreams
        assert (api.name, api.host, api.port) == ("api", "api.external.com", 443)
        assert api.address == f"{WEST_HOST}:443" and api.spiffe_id == SpiffeId.parse(WEST_API)
        assert api.protocol is Protocol.TCP  # HTTPS: the sidecar passes the bytes on
    west = load_mesh_config(EXAMPLE / "west.yaml")
    api_service = west.service("api")
    assert west.host("west").address == WEST_HOST and api_service.inbound_port == 443
    assert str(api_service.spiffe_id) == WEST_API
    assert not analyze_file(EXAMPLE / "east.yaml").findings

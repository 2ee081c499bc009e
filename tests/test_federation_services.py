"""Services of another mesh: Istio ServiceEntry + DestinationRule (ISTIO_MUTUAL) read with
the policies, refusals with file/line/field, and where an upstream naming a ServiceEntry
host connects and whom it accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshtrust.errors import PolicyError
from meshtrust.policy import load_policy_files
from meshtrust.policy.networking import UnknownHost
from meshtrust.spiffe import SpiffeId

#: The seed's multi-cluster-mtls.yaml as the article wrote it: its trafficPolicy sits in the
#: ServiceEntry, where Istio has no such field.
SEED = """\
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: external-cluster
spec:
  hosts:
  - "*.external.com"
  location: MESH_INTERNAL
  ports:
  - number: 443
    name: https
    protocol: HTTPS
  resolution: DNS
  endpoints:
  - address: service.external.com
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
"""

#: The same meaning, adapted: the west mesh's api at an address that exists in a test, the
#: trafficPolicy in a DestinationRule for the host, the expected identity named.
ADAPTED = """\
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: west-cluster, namespace: default}
spec:
  hosts:
  - "*.west.test"
  location: MESH_INTERNAL
  ports:
  - number: 443
    name: https
    protocol: HTTPS
    targetPort: 15006
  resolution: STATIC
  endpoints:
  - address: 198.18.0.2
    serviceAccount: api
  - address: 198.18.0.3
    ports: {https: 16006}
    serviceAccount: api
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: west-cluster, namespace: default}
spec:
  host: "*.west.test"
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
      subjectAltNames: ["spiffe://west.test/ns/default/sa/api"]
"""


def _load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "multi-cluster-mtls.yaml"
    path.write_text(text)
    return load_policy_files([path])


def test_the_seeds_file_is_refused_where_its_traffic_policy_is(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        _load(tmp_path, SEED)
    message = str(info.value)
    assert ":25:" in message and "ServiceEntry default/external-cluster" in message
    assert "spec.trafficPolicy" in message and "put it in a DestinationRule" in message


def test_the_adapted_seed_resolves_endpoints_and_the_expected_identity(tmp_path: Path) -> None:
    policies = load_policy_files([_write(tmp_path, ADAPTED)])
    (entry,) = policies.service_entries
    assert entry.hosts == ("*.west.test",) and entry.resolution == "STATIC"
    remote = policies.remote_service("api.west.test", 443, "east.test")
    assert remote.addresses == (("198.18.0.2", 15006), ("198.18.0.3", 16006))
    assert remote.expected == (SpiffeId.parse("spiffe://west.test/ns/default/sa/api"),)
    with pytest.raises(UnknownHost, match="no port 80"):
        policies.remote_service("api.west.test", 80, "east.test")
    with pytest.raises(UnknownHost, match="no ServiceEntry has host 'api.north.test'"):
        policies.remote_service("api.north.test", 443, "east.test")
    assert policies.peer_authentications[0].mode is not None  # read with the rest


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_without_subject_alt_names_the_endpoints_service_account_is_expected(
    tmp_path: Path,
) -> None:
    text = ADAPTED.split("---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule")[0]
    policies = load_policy_files([_write(tmp_path, text)])
    remote = policies.remote_service("api.west.test", 443, "mesh.test")
    # The ServiceEntry's namespace and the endpoints' service account, in the caller's trust
    # domain (Istio's rule for a shared trust domain); name subjectAltNames across domains.
    assert remote.expected == (SpiffeId.parse("spiffe://mesh.test/ns/default/sa/api"),)


BASE_SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: s, namespace: default}
spec:
  hosts: [api.west.test]
  location: MESH_INTERNAL
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: STATIC
  endpoints: [{address: 198.18.0.2}]
  subjectAltNames: ["spiffe://west.test/ns/default/sa/api"]
"""

BASE_DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: d, namespace: default}
spec:
  host: api.west.test
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
"""


@pytest.mark.parametrize(
    ("base", "old", "new", "line", "field", "reason"),
    [
        (
            BASE_SE,
            "  resolution: STATIC\n",
            "  resolution: STATIC\n  addresses: [10.0.0.1]\n",
            9,
            "spec.addresses",
            "not supported",
        ),
        (
            BASE_SE,
            "  resolution: STATIC\n",
            "  resolution: STATIC\n  workloadSelector: {}\n",
            9,
            "spec.workloadSelector",
            "not supported",
        ),
        (
            BASE_SE,
            "location: MESH_INTERNAL",
            "location: MESH_EXTERNAL",
            6,
            "spec.location",
            "MESH_INTERNAL",
        ),
        (
            BASE_SE,
            "  location: MESH_INTERNAL\n",
            "",
            4,
            "spec.location",
            "defaults to MESH_EXTERNAL",
        ),
        (
            BASE_SE,
            "resolution: STATIC",
            "resolution: NONE",
            8,
            "spec.resolution",
            "supported: STATIC, DNS",
        ),
        (
            BASE_SE,
            "{address: 198.18.0.2}",
            "{address: api.west.test}",
            9,
            "spec.endpoints[0].address",
            "not an IP address",
        ),
        (
            BASE_SE,
            "{address: 198.18.0.2}",
            "{address: 198.18.0.2, weight: 3}",
            9,
            "spec.endpoints[0].weight",
            "not supported",
        ),
        (
            BASE_SE,
            "hosts: [api.west.test]",
            "hosts: [API.west.test]",
            5,
            "spec.hosts[0]",
            "not a lower-case DNS name",
        ),
        (BASE_SE, "hosts: [api.west.test]", "hosts: []", 5, "spec.hosts", "at least one host"),
        (
            BASE_SE,
            "protocol: HTTPS}",
            "protocol: MONGO}",
            7,
            "spec.ports[0].protocol",
            "not supported",
        ),
        (
            BASE_SE,
            "[{number: 443, name: https, protocol: HTTPS}]",
            "[{number: 443}, {number: 443}]",
            7,
            "spec.ports[1]",
            "more than once",
        ),
        (
            BASE_SE,
            '["spiffe://west.test/ns/default/sa/api"]',
            '["api.west.test"]',
            10,
            "spec.subjectAltNames[0]",
            "SPIFFE IDs",
        ),
        (
            BASE_SE,
            "  resolution: STATIC\n",
            "  resolution: STATIC\n  colour: blue\n",
            9,
            "spec.colour",
            "unknown field 'colour'",
        ),
        (
            BASE_SE,
            "networking.istio.io/v1",
            "security.istio.io/v1",
            1,
            "apiVersion",
            "networking.istio.io/v1",
        ),
        (
            BASE_DR,
            "mode: ISTIO_MUTUAL",
            "mode: SIMPLE",
            7,
            "spec.trafficPolicy.tls.mode",
            "supported: ISTIO_MUTUAL",
        ),
        (
            BASE_DR,
            "{mode: ISTIO_MUTUAL}",
            "{mode: ISTIO_MUTUAL, clientCertificate: /c.pem}",
            7,
            "spec.trafficPolicy.tls.clientCertificate",
            "workload's own certificate",
        ),
        (
            BASE_DR,
            "  trafficPolicy:\n",
            "  subsets: []\n  trafficPolicy:\n",
            6,
            "spec.subsets",
            "not supported",
        ),
        (
            BASE_DR,
            "    tls: {mode: ISTIO_MUTUAL}\n",
            "    loadBalancer: {}\n",
            7,
            "spec.trafficPolicy.loadBalancer",
            "not supported",
        ),
    ],
)
def test_unsupported_and_bad_fields_name_file_line_and_field(
    tmp_path: Path, base: str, old: str, new: str, line: int, field: str, reason: str
) -> None:
    assert old in base
    path = _write(tmp_path, base.replace(old, new, 1))
    with pytest.raises(PolicyError) as info:
        load_policy_files([path])
    message = str(info.value)
    assert f"{path}:{line}" in message, message
    assert field in message and reason in message, message


def test_the_most_specific_host_wins_and_a_rule_must_be_istio_mutual(tmp_path: Path) -> None:
    wildcard = (
        BASE_SE.replace("name: s,", "name: w,")
        .replace("hosts: [api.west.test]", 'hosts: ["*.west.test"]')
        .replace("198.18.0.2", "198.18.0.9")
    )
    policies = load_policy_files(
        [_write(tmp_path, BASE_SE + "---\n" + wildcard + "---\n" + BASE_DR)]
    )
    assert policies.remote_service("api.west.test", 443, "east.test").addresses == (
        ("198.18.0.2", 443),
    )
    assert policies.remote_service("db.west.test", 443, "east.test").addresses == (
        ("198.18.0.9", 443),
    )
    no_san = BASE_SE.replace('  subjectAltNames: ["spiffe://west.test/ns/default/sa/api"]\n', "")
    policies = load_policy_files([_write(tmp_path, no_san)])
    with pytest.raises(UnknownHost, match="no identity to expect"):
        policies.remote_service("api.west.test", 443, "east.test")

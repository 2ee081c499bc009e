"""The CA root published to every namespace (as istiod's ``istio-ca-root-cert``): what to do
per namespace (pure), and the passes against an API (here an in-memory one; the real
kube-apiserver is in tests/test_kube_injector.py)."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from meshtrust.ca import init_ca_dir
from meshtrust.errors import ConfigError
from meshtrust.injector.rootpublisher import MANAGED_BY, ROOT_KEY, Action, RootPublisher, plan
from meshtrust.kube import KubeApiError
from meshtrust.pki import KeyType
from tests.conftest import TD
from tests.kube import make_tls_pair, pem_bytes

NAME = "meshtrust-ca-root-cert"
ROOT = "-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n"


def ns(name: str, phase: str = "Active") -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"phase": phase}}


def cm(data: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": NAME, "labels": labels}, "data": {ROOT_KEY: data}}


def test_plan_creates_replaces_and_leaves_foreign_configmaps_alone() -> None:
    namespaces = [ns("a"), ns("b"), ns("c"), ns("d"), ns("gone", "Terminating")]
    existing = {
        "b": cm(ROOT, MANAGED_BY),  # up to date
        "c": cm("old", MANAGED_BY),  # ours, stale
        "d": cm("someone else's", {"app": "x"}),
    }
    assert plan(namespaces, existing, ROOT) == [
        Action("create", "a"),
        Action("replace", "c"),
        Action("foreign", "d"),
    ]


class MemoryApi:
    """Namespaces and ConfigMaps, answering the four calls the publisher makes."""

    def __init__(self, namespaces: list[str]) -> None:
        self.namespaces = namespaces
        self.maps: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.conflict_next_create = False

    def request(self, method: str, path: str, body: Any = None) -> Any:
        self.calls.append((method, path))
        if (method, path) == ("GET", "/api/v1/namespaces"):
            return {"items": [ns(n) for n in self.namespaces]}
        if method == "GET" and path.startswith("/api/v1/configmaps?fieldSelector="):
            return {"items": [copy.deepcopy(m) for m in self.maps.values()]}
        namespace = path.split("/")[4]
        if method == "POST":
            if self.conflict_next_create:
                self.conflict_next_create = False
                raise KubeApiError("AlreadyExists", 409)
            stored = copy.deepcopy(body)
            stored["metadata"]["resourceVersion"] = "1"
            self.maps[namespace] = stored
            return body
        assert method == "PUT" and body["metadata"]["resourceVersion"]
        self.maps[namespace] = copy.deepcopy(body)
        return body


@pytest.fixture
def root_file(tmp_path: Path) -> Path:
    init_ca_dir(tmp_path / "ca", TD, dt.datetime.now(dt.UTC), KeyType.EC_P256)
    return tmp_path / "ca" / "root-cert.pem"


def test_each_pass_brings_every_namespace_to_the_current_root(root_file: Path) -> None:
    api = MemoryApi(["default", "shop"])
    publisher = RootPublisher(api, root_file, NAME)
    assert [a.verb for a in publisher.publish_once()] == ["create", "create"]
    assert api.maps["shop"]["data"][ROOT_KEY] == root_file.read_text()
    assert api.maps["shop"]["metadata"]["labels"] == MANAGED_BY
    assert publisher.publish_once() == []  # nothing to do: no writes
    api.namespaces.append("new")
    api.conflict_next_create = True  # another injector replica created it first
    assert publisher.publish_once() == [Action("create", "new")]
    assert "new" not in api.maps  # the next pass sees the other replica's (here: none)
    assert publisher.publish_once() == [Action("create", "new")] and "new" in api.maps
    # A rotated bundle (A+B) reaches every namespace on the next pass.
    ca2 = root_file.parent.parent / "ca2"
    init_ca_dir(ca2, TD, dt.datetime.now(dt.UTC), KeyType.EC_P256)
    both = root_file.read_text() + (ca2 / "root-cert.pem").read_text()
    root_file.write_text(both)
    assert {a.verb for a in publisher.publish_once()} == {"replace"}
    assert all(m["data"][ROOT_KEY] == both for m in api.maps.values())


def test_a_bad_root_file_publishes_nothing_and_says_which(root_file: Path, tmp_path: Path) -> None:
    api = MemoryApi(["default"])
    _, _, leaf = make_tls_pair(["localhost"], [])
    for content, message in [
        (b"not pem", "not a PEM certificate bundle"),
        (pem_bytes(leaf), "certificate 1 is not a CA certificate"),
    ]:
        root_file.write_bytes(content)
        with pytest.raises(ConfigError, match=message) as exc:
            RootPublisher(api, root_file, NAME).publish_once()
        assert str(root_file) in str(exc.value)
    with pytest.raises(ConfigError, match="cannot read"):
        RootPublisher(api, tmp_path / "missing.pem", NAME).publish_once()
    assert api.maps == {} and api.calls == []

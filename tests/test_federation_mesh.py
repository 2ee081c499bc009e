"""mesh.yaml ``federation``: checked with the mesh file's lines, and handed to the mesh's
``ca serve`` as its ``--config`` (the same settings ``ca serve --config`` reads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from meshtrust.ca.config import load_config_file
from meshtrust.errors import ConfigError
from meshtrust.mesh import load_mesh_config, plan_mesh
from tests.test_mesh_plan import mesh_file, ports

PEER: dict[str, str] = {
    "trustDomain": "west.test",
    "bundleEndpointUrl": "https://198.18.0.2:8443/",
    "profile": "https_spiffe",
    "endpointSpiffeId": "spiffe://west.test/meshtrust/bundle-endpoint",
    "bootstrapBundle": "west.pem",
}
FEDERATION: dict[str, object] = {
    "bundleEndpoint": {"listen": "127.0.0.1:28443", "refreshHint": "5s"},
    "federatesWith": [PEER],
}


def test_the_mesh_ca_serves_with_the_mesh_files_federation(tmp_path: Path) -> None:
    config = load_mesh_config(mesh_file(tmp_path, trustDomain="east.test", federation=FEDERATION))
    assert config.federation is not None
    assert config.federation.federates_with[0].bootstrap_bundle == tmp_path.resolve() / "west.pem"
    plan = plan_mesh(config, ports(40001, 40002, 40003, 40004), python="/py", environ={})
    assert plan.ca is not None and plan.ca_config is not None
    argv = list(plan.ca.argv)
    assert argv[argv.index("--config") + 1] == str(plan.ca_config.path)
    assert plan.ca_config in plan.files and plan.ca_config.private
    # What the CA will read is what the mesh file said.
    plan.ca_config.path.parent.mkdir(parents=True, exist_ok=True)
    plan.ca_config.path.write_text(plan.ca_config.content)
    assert load_config_file(plan.ca_config.path)["federation"] == config.federation


def test_without_federation_the_ca_has_no_config_file(tmp_path: Path) -> None:
    config = load_mesh_config(mesh_file(tmp_path))
    plan = plan_mesh(config, ports(40001, 40002, 40003, 40004), python="/py", environ={})
    assert plan.ca_config is None and "--config" not in plan.ca.argv  # type: ignore[union-attr]


def test_a_bad_federation_section_names_the_mesh_files_line_and_field(tmp_path: Path) -> None:
    bad = {**FEDERATION, "federatesWith": [{**PEER, "profile": "web"}]}
    path = mesh_file(tmp_path, federation=bad)
    lines = path.read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if "profile: web" in text)
    with pytest.raises(ConfigError) as info:
        load_mesh_config(path)
    assert str(info.value).startswith(f"{path}:{line}: federation.federatesWith[0].profile:")
    assert yaml.safe_load(path.read_text())["federation"]["federatesWith"][0]["profile"] == "web"

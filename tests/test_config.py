"""The one config layer (pure parts): the YAML loader, the error shape, the shared validators.

What each file kind (mesh.yaml, sidecar.yaml, agent/CA settings, policies) makes of them is in
``test_config_files.py``.
"""

from __future__ import annotations

import datetime as dt
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshtrust.config import (
    ConfigError,
    LineMap,
    LineSeq,
    YamlError,
    check_directory_location,
    check_dns_label,
    check_duration,
    check_labels,
    check_path,
    check_port,
    check_spiffe_id,
    check_trust_domain,
    line_for,
    load_yaml_documents,
    load_yaml_mapping,
    parse_host_port,
    parse_yaml_documents,
)
from meshtrust.errors import InvalidInput, PolicyError


def write(tmp_path: Path, text: str | bytes, name: str = "f.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# --- the error ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (ConfigError("bad", file="m.yaml", line=12, field="a[1].b"), "m.yaml:12: a[1].b: bad"),
        (ConfigError("bad", file="m.yaml", field="a"), "m.yaml: a: bad"),
        (ConfigError("bad", field="--listen"), "--listen: bad"),
        (ConfigError("bad"), "bad"),
        (
            PolicyError("p.yaml", "AuthorizationPolicy d/x", "spec", "bad", line=3),
            "p.yaml:3: AuthorizationPolicy d/x: spec: bad",
        ),
        (PolicyError("p.yaml", "", "", "bad"), "p.yaml: bad"),
    ],
)
def test_one_error_shape_names_file_line_and_field(error: ConfigError, message: str) -> None:
    assert str(error) == message
    assert isinstance(error, InvalidInput)


def test_located_places_a_validator_error_in_its_file() -> None:
    bare = ConfigError("expected a port", field="services[0].port")
    placed = bare.located(Path("mesh.yaml"), 7)
    assert (placed.file, placed.line, placed.field) == (Path("mesh.yaml"), 7, "services[0].port")
    assert str(placed) == "mesh.yaml:7: services[0].port: expected a port"
    assert placed.located(Path("other.yaml"), 1) is placed  # the first file named stays


# --- the loader ---------------------------------------------------------------------------------


def test_mappings_and_sequences_remember_their_lines(tmp_path: Path) -> None:
    doc = load_yaml_mapping(write(tmp_path, "a: 1\nb:\n  - x\n  - {c: 2,\n     d: 3}\n"))
    assert doc == {"a": 1, "b": ["x", {"c": 2, "d": 3}]}
    assert isinstance(doc, LineMap) and isinstance(doc["b"], LineSeq)
    assert doc.key_lines == {"a": 1, "b": 2}
    assert doc["b"].item_lines == [3, 4]
    assert line_for(doc, "b[1].d") == 5
    assert line_for(doc, "b[1].missing") == 4  # nearest ancestor
    assert line_for(doc, "b[9]") == 2


def test_within_limits_anchors_and_aliases_still_work(tmp_path: Path) -> None:
    doc = load_yaml_mapping(write(tmp_path, "l: &l {tier: web}\na: *l\nb: *l\n"))
    assert doc["a"] == doc["b"] == {"tier": "web"}


def test_documents_are_numbered_and_errors_name_theirs(tmp_path: Path) -> None:
    path = write(tmp_path, "a: 1\n---\n---\nb: 2\n---\nc: 1\nc: 2\n")
    with pytest.raises(YamlError) as info:
        load_yaml_documents(path)
    assert (info.value.document, info.value.line) == (4, 7)
    path.write_text("a: 1\n---\n---\nb: 2\n")
    assert load_yaml_documents(path) == [(1, {"a": 1}), (3, {"b": 2})]


@pytest.mark.parametrize(
    ("text", "problem"),
    [("- a\n", "expected a mapping"), ("a: 1\n---\nb: 2\n", "more than one YAML document")],
)
def test_a_settings_file_is_one_mapping(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_yaml_mapping(write(tmp_path, text))
    assert load_yaml_mapping(write(tmp_path, "")) == {}


def test_an_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read: No such file"):
        load_yaml_mapping(tmp_path / "missing.yaml")


_keys = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=8)
_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(string.printable, max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=30,
)


@settings(deadline=None)  # a shared CI machine; correctness is the claim, not speed
@given(st.dictionaries(_keys, _values, max_size=6))
def test_the_loader_reads_what_pyyaml_writes(data: dict[str, object]) -> None:
    """Line tracking and the checks change nothing about the data of a valid file."""
    text = yaml.safe_dump(data)
    assert parse_yaml_documents(text, Path("f.yaml")) == [(1, yaml.safe_load(text))]


# --- validators ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["web", "web-1", "a", "1a", "a" * 63])
def test_dns_labels_accepted(name: str) -> None:
    assert check_dns_label(name, "name") == name


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("Web_1", "is not a name"),
        ("a" * 64, "is not a name"),
        ("a" * 300, "is not a name"),
        ("-a", "is not a name"),
        ("a-", "is not a name"),
        ("a.b", "is not a name"),
        ("", "must not be empty"),
        ("a\x00b", "NUL"),
        (1, "expected a string, got 1"),
        (["a"], "expected a string, got a list"),
    ],
)
def test_dns_labels_refused(value: object, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        check_dns_label(value, "services[0].name")
    assert info.value.field == "services[0].name"
    assert len(str(info.value)) < 300  # a huge value is cut, not echoed whole


@pytest.mark.parametrize(
    ("text", "zero", "expected"),
    [
        ("127.0.0.1:15012", True, ("127.0.0.1", 15012)),
        ("localhost:0", True, ("localhost", 0)),
        ("[::1]:15006", False, ("::1", 15006)),
        (" istiod.istio-system.svc:15012 ", False, ("istiod.istio-system.svc", 15012)),
    ],
)
def test_host_port_accepted(text: str, zero: bool, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, what="listen", zero=zero) == expected


@pytest.mark.parametrize(
    ("text", "zero"),
    [
        ("nowhere", True),
        ("host:", True),
        (":80", True),
        ("host:65536", True),
        ("host:0", False),
        ("::1:80", True),  # IPv6 without brackets: which part is the port?
        ("[nonsense]:80", True),
        ("[127.0.0.1]:80", True),
        ("host:+80", True),
        ("host:\u0663", True),  # a non-ASCII digit
        ("a b:80", True),
        ("host:000000080", True),
    ],
)
def test_host_port_refused(text: str, zero: bool) -> None:
    with pytest.raises(ConfigError, match="is not HOST:PORT") as info:
        parse_host_port(text, what="ca.listen", zero=zero)
    assert info.value.field == "ca.listen"


@settings(deadline=None)
@given(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
    st.integers(1, 65535),
)
def test_host_port_round_trips(host: str, port: int) -> None:
    assert parse_host_port(f"{host}:{port}", what="address", zero=False) == (host, port)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (0, "expected a port 1-65535, got 0"),
        (65536, "got 65536"),
        ("80", "got '80'"),
        (True, "got a boolean"),
        (None, "got null"),
    ],
)
def test_ports_refused(value: object, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        check_port(value, "port")
    assert check_port(0, "admin_port", zero=True) == 0


@pytest.mark.parametrize(
    "labels",
    [{"app": "web"}, {"app.kubernetes.io/name": "web"}, {"version": ""}, {"a_b.c-d": "x_y.z"}],
)
def test_labels_accepted(labels: dict[str, str]) -> None:
    assert check_labels(labels, "labels") == labels


@pytest.mark.parametrize(
    ("labels", "field", "problem"),
    [
        ({"-app": "web"}, "labels", "label key '-app'"),
        ({"a" * 64: "x"}, "labels", "at most 63"),
        ({"Bad_Prefix/app": "x"}, "labels", "prefix before '/'"),
        ({"a/b/c": "x"}, "labels", "prefix before '/'"),
        ({"app": "a" * 64}, "labels.app", "is not a label value"),
        ({"app": "web!"}, "labels.app", "is not a label value"),
        ({"app": 1}, "labels.app", "quote numbers"),
        ({1: "x"}, "labels", "label keys must be strings"),
    ],
)
def test_labels_refused(labels: dict[object, object], field: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        check_labels(labels, "labels")
    assert info.value.field == field


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("90s", dt.timedelta(seconds=90)),
        (30, dt.timedelta(seconds=30)),
        ("1h30m", dt.timedelta(minutes=90)),
    ],
)
def test_durations_accepted(value: object, expected: dt.timedelta) -> None:
    assert check_duration(value, "certTTL") == expected


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (["1h"], "expected a duration like 90s, 15m, 24h or 90d, got a list"),
        ({"h": 1}, "got a mapping"),
        (None, "got null"),
        (True, "got a boolean"),
        ("90x", "'90x' is not a duration"),
    ],
)
def test_durations_refused(value: object, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        check_duration(value, "certTTL")
    assert str(info.value).startswith("certTTL: ")  # named once, not twice


def test_paths(tmp_path: Path) -> None:
    assert check_path("sub/x", "workDir", tmp_path) == tmp_path / "sub/x"
    assert check_path("/abs", "workDir", tmp_path) == Path("/abs")
    for value, problem in [
        ("a\x00b", "NUL"),
        ("x" * 256, "path component 'xxx"),
        ("/" + "/".join(["d" * 200] * 21), "longer than 4095 bytes"),
        (3, "expected a string"),
    ]:
        with pytest.raises(ConfigError, match=problem):
            check_path(value, "workDir", tmp_path)


def test_directory_locations(tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_text("x")
    assert check_directory_location(tmp_path / "new" / "dir", "workDir") == tmp_path / "new/dir"
    assert check_directory_location(tmp_path, "workDir") == tmp_path
    for path, problem in [
        (regular, "exists and is not a directory"),
        (regular / "sub" / "dir", f"is below {regular}, which is not a directory"),
        (Path("/proc/meshtrust"), "is under /proc"),
        (Path("/sys/x/y"), "is under /sys"),
        (Path("/dev/shm/mesh"), "is under /dev"),
        (Path("/proc"), "is under /proc"),
    ]:
        with pytest.raises(ConfigError, match=problem) as info:
            check_directory_location(path, "ca.dir")
        assert info.value.field == "ca.dir"


def test_trust_domains_and_spiffe_ids_use_the_spiffe_rules() -> None:
    assert str(check_trust_domain("example.org", "trustDomain")) == "example.org"
    with pytest.raises(ConfigError, match="upper-case") as info:
        check_trust_domain("Example.org", "trustDomain")
    assert info.value.field == "trustDomain"
    assert str(check_spiffe_id("spiffe://a/b", "spiffe_id")) == "spiffe://a/b"
    with pytest.raises(ConfigError, match="spiffe://"):
        check_spiffe_id("https://a/b", "upstreams[0].spiffe_id")

"""The dashboard's pure core (recent counts, events, the /api/state document), its server on
a real loopback socket, and ``dashboard.listen`` in mesh.yaml. The page itself in a real
Chromium on a live mesh: tests/test_dashboard_browser.py."""

from __future__ import annotations

import copy
import datetime as dt
import http.client
import json
import re
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshtrust.config import ConfigError
from meshtrust.dashboard import (
    ASSETS,
    DashboardServer,
    Edge,
    EdgeCounters,
    LedgerCert,
    LedgerView,
    Observation,
    Tracker,
    bind_dashboard,
    edge_counters,
)
from meshtrust.dashboard.server import _asset
from meshtrust.errors import AddressInUse
from meshtrust.mesh import load_mesh_config
from tests.mesh_helpers import meshtrust
from tests.waiting import until

T0 = dt.datetime(2026, 12, 2, 4, 0, 0, tzinfo=dt.UTC)
WEB_DB = Edge("web", "db", "http")
WEB_BACKEND = Edge("web", "backend", "http")
TD = "spiffe://cluster.local/ns/default/sa/"


def _service(name: str, serial: str | None = "aa" * 16, **changes: Any) -> dict[str, Any]:
    """One entry of `status --json`'s services, as status_document makes it."""
    svc: dict[str, Any] = {
        "name": name,
        "spiffe_id": TD + name,
        "agent": "running",
        "app": "running",
        "ready": True,
        "serial": serial,
        "not_before": "2026-12-02T03:58:00Z",
        "not_after": "2026-12-02T04:00:30Z",
        "next_rotation": "2026-12-02T04:00:15Z",
        "rotations": 0,
        "envoy": {
            "state": "live",
            "mtls_mode": "STRICT",
            "policy_version": 1,
            "policy_error": None,
        },
        "connections": {
            "allowed": 0,
            "denied": 0,
            "tls_handshakes": 0,
            "tls_errors": 0,
            "plaintext_refused": 0,
        },
    }
    for key, value in changes.items():
        if key in ("envoy", "connections"):
            svc[key] = {**svc[key], **value}
        else:
            svc[key] = value
    return svc


def _status(*services: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "trust_domain": "cluster.local",
        "mesh_file": "/m/mesh.yaml",
        "state": "running",
        "host": None,
        "cert_ttl_seconds": 30,
        "ca": {"address": "127.0.0.1:15012", "state": "running", "issued": 3, "refused": 0},
        "services": list(services),
    }


def _obs(
    seconds: float,
    services: list[dict[str, Any]],
    edges: Mapping[Edge, EdgeCounters | None] | None = None,
    ledger: LedgerView | None = None,
) -> Observation:
    return Observation(T0 + dt.timedelta(seconds=seconds), _status(*services), edges or {}, ledger)


def _mesh(web: dict[str, Any] | None = None, db: dict[str, Any] | None = None) -> list[Any]:
    return [web or _service("web"), _service("backend"), db or _service("db", "bb" * 16)]


def test_the_first_look_is_the_baseline_and_brings_only_the_observing_event() -> None:
    tracker = Tracker()
    busy = _service("db", connections={"denied": 7})
    events = tracker.ingest(_obs(0, _mesh(db=busy), {WEB_DB: EdgeCounters(9, 7)}))
    assert [e["kind"] for e in events] == ["observing"]
    snap = tracker.snapshot()
    edge = snap["edges"][0]
    # Calls from before the dashboard looked are totals, not recent.
    assert (edge["state"], edge["calls_total"], edge["denied_recent"]) == ("idle", 9, 0)
    assert [n["spiffe_id"] for n in snap["nodes"]] == [TD + "web", TD + "backend", TD + "db"]


def test_a_denied_call_turns_its_edge_denied_and_is_an_event_naming_the_caller() -> None:
    tracker = Tracker(window=60)
    edges = {WEB_DB: EdgeCounters(0, 0), WEB_BACKEND: EdgeCounters(0, 0)}
    tracker.ingest(_obs(0, _mesh(), edges))
    db = _service("db", "bb" * 16, connections={"denied": 1})
    edges = {WEB_DB: EdgeCounters(1, 1), WEB_BACKEND: EdgeCounters(4, 0)}
    events = tracker.ingest(_obs(1, _mesh(db=db), edges))
    assert [(e["kind"], e["service"], e["text"]) for e in events] == [
        ("denial", "db", "db denied 1 call (from web)")
    ]
    by_pair = {(e["from"], e["to"]): e for e in tracker.snapshot()["edges"]}
    assert by_pair["web", "db"]["state"] == "denied"
    assert by_pair["web", "db"]["denied_recent"] == 1
    assert by_pair["web", "backend"]["state"] == "allowed"
    assert by_pair["web", "backend"]["allowed_recent"] == 4
    node = {n["name"]: n for n in tracker.snapshot()["nodes"]}["db"]
    assert (node["denied_recent"], node["denied_total"]) == (1, 1)

    # A minute without denials: the edge is no longer denied, its total stays.
    tracker.ingest(_obs(30, _mesh(db=db), {WEB_DB: EdgeCounters(1, 1)}))
    tracker.ingest(_obs(62, _mesh(db=db), {WEB_DB: EdgeCounters(1, 1)}))
    (edge,) = tracker.snapshot()["edges"]
    assert (edge["state"], edge["denied_recent"], edge["denied_total"]) == ("idle", 0, 1)


def test_a_counter_that_goes_down_is_an_envoy_restart_not_negative_calls() -> None:
    tracker = Tracker()
    tracker.ingest(_obs(0, _mesh(), {WEB_BACKEND: EdgeCounters(50, 0)}))
    tracker.ingest(_obs(1, _mesh(), {WEB_BACKEND: EdgeCounters(2, 0)}))
    tracker.ingest(_obs(2, _mesh(), {WEB_BACKEND: EdgeCounters(5, 0)}))
    (edge,) = tracker.snapshot()["edges"]
    assert (edge["calls_recent"], edge["state"]) == (3, "allowed")


def test_tcp_edges_count_connections_and_say_denials_are_not_told_apart() -> None:
    stats = {"cluster.outbound|db.upstream_cx_total": 4, "cluster.outbound|db.upstream_rq_total": 0}
    assert edge_counters(stats, Edge("web", "db", "tcp")) == EdgeCounters(4, None)
    http_stats = {
        "cluster.outbound|db.upstream_rq_total": 6,
        "cluster.outbound|db.upstream_rq_403": 2,
    }
    assert edge_counters(http_stats, WEB_DB) == EdgeCounters(6, 2)
    assert edge_counters({}, WEB_DB) == EdgeCounters(0, 0)  # Envoy makes 403s' stat lazily
    tracker = Tracker()
    tcp = Edge("web", "db", "tcp")
    tracker.ingest(_obs(0, _mesh(), {tcp: EdgeCounters(0, None)}))
    tracker.ingest(_obs(1, _mesh(), {tcp: EdgeCounters(4, None)}))
    (edge,) = tracker.snapshot()["edges"]
    assert (edge["state"], edge["calls_recent"], edge["denied_recent"]) == ("allowed", 4, None)


def test_a_caller_whose_envoy_does_not_answer_has_unknown_edges() -> None:
    tracker = Tracker()
    tracker.ingest(_obs(0, _mesh(), {WEB_DB: None}))
    assert tracker.snapshot()["edges"][0]["state"] == "unknown"


def test_rotations_policy_reloads_and_refusals_are_events() -> None:
    tracker = Tracker()
    tracker.ingest(_obs(0, _mesh()))
    web = _service(
        "web", "cc" * 16, rotations=1, envoy={"policy_version": 2, "mtls_mode": "PERMISSIVE"}
    )
    events = tracker.ingest(_obs(1, _mesh(web=web)))
    assert [(e["kind"], e["service"]) for e in events] == [
        ("rotation", "web"),
        ("policy-reload", "web"),
    ]
    assert "aaaaaaaaaaaa… → cccccccccccc…" in events[0]["text"]
    assert "policy version 2 (PERMISSIVE)" in events[1]["text"]

    refused = copy.deepcopy(web)
    refused["envoy"]["policy_error"] = "policies.yaml:3: spec.action: unknown action 'MAYBE'"
    events = tracker.ingest(_obs(2, _mesh(web=refused)))
    assert [e["kind"] for e in events] == ["policy-refused"]
    assert "keeps version 2" in events[0]["text"] and "MAYBE" in events[0]["text"]
    assert tracker.ingest(_obs(3, _mesh(web=refused))) == []  # the same refusal: once
    # An agent that does not answer has no serial: that is not a rotation either.
    silent = _service("web", None, envoy={"policy_version": None, "policy_error": None})
    assert tracker.ingest(_obs(4, _mesh(web=silent))) == []
    assert tracker.ingest(_obs(5, _mesh(web=refused))) == []
    assert [e["seq"] for e in tracker.snapshot()["events"]] == [1, 2, 3, 4]


def _cert(serial: str, issued: float, who: str = "web", revoked: float | None = None) -> LedgerCert:
    at = T0 + dt.timedelta(seconds=issued)
    return LedgerCert(
        serial,
        TD + who,
        at - dt.timedelta(minutes=2),
        at + dt.timedelta(seconds=30),
        at,
        None if revoked is None else T0 + dt.timedelta(seconds=revoked),
    )


def test_the_timeline_shows_the_ledgers_certificates_the_current_one_and_revocations() -> None:
    tracker = Tracker()
    old, current = _cert("01" * 16, -20), _cert("aa" * 16, -5)
    tracker.ingest(_obs(0, _mesh(), ledger=LedgerView((old, current), revoked_total=0)))
    revoked = _cert("01" * 16, -20, revoked=1)
    view = LedgerView((revoked, current, _cert("bb" * 16, -3, "db")), revoked_total=1)
    events = tracker.ingest(_obs(2, _mesh(), ledger=view))
    assert [(e["kind"], e["text"]) for e in events] == [
        ("revocation", f"revoked {TD}web serial 010101010101…")
    ]
    snap = tracker.snapshot()
    assert snap["ca"]["revoked"] == 1 and snap["ca"]["issued"] == 3
    web = {t["service"]: t for t in snap["timelines"]}["web"]
    assert web["issued"] == "2026-12-02T03:59:55Z"  # signed, not the backdated NotBefore
    assert [(c["serial"], c["current"], c["revoked_at"]) for c in web["certs"]] == [
        ("01" * 16, False, "2026-12-02T04:00:01Z"),
        ("aa" * 16, True, None),
    ]


def test_no_key_token_or_pem_in_the_state_document() -> None:
    tracker = Tracker()
    ledger = LedgerView((_cert("aa" * 16, -5),))
    tracker.ingest(_obs(0, _mesh(), {WEB_DB: EdgeCounters(1, 0)}, ledger))
    text = json.dumps(tracker.snapshot())
    assert "PRIVATE KEY" not in text and "BEGIN" not in text

    def keys(value: object) -> Iterator[str]:
        if isinstance(value, dict):
            for k, v in value.items():
                yield k
                yield from keys(v)
        elif isinstance(value, list):
            for v in value:
                yield from keys(v)

    assert not [k for k in keys(tracker.snapshot()) if re.search("key|token|pem", k)]


# --- the server, on a real loopback socket --------------------------------------------------


@pytest.fixture
def server() -> Iterator[DashboardServer]:
    srv = DashboardServer("127.0.0.1", 0)
    looks = iter(range(1_000_000))
    srv.start(lambda: _obs(next(looks), _mesh(), {WEB_DB: EdgeCounters(0, 0)}), interval=0.05)
    try:
        yield srv
    finally:
        srv.stop()


def _get(
    srv: DashboardServer, path: str, method: str = "GET", host: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        conn.putrequest(method, path, skip_host=True)
        conn.putheader("Host", host or f"127.0.0.1:{srv.port}")
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_the_server_serves_the_page_its_assets_and_the_live_state(server: DashboardServer) -> None:
    status, headers, body = _get(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'<script src="/app.js"' in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for path in ASSETS:
        assert _get(server, path)[0] == 200
    until(lambda: json.loads(_get(server, "/api/state")[2])["observed"], what="first look")
    first = json.loads(_get(server, "/api/state")[2])["generated_at"]
    until(
        lambda: json.loads(_get(server, "/api/state")[2])["generated_at"] != first,
        what="the state moves on",
    )
    assert _get(server, "/nothing")[0] == 404


def test_the_server_is_read_only_and_refuses_other_host_names(server: DashboardServer) -> None:
    assert _get(server, "/api/state", method="POST")[0] == 501
    assert _get(server, "/api/state", method="DELETE")[0] == 501
    # DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1.
    assert _get(server, "/api/state", host=f"evil.example:{server.port}")[0] == 421
    assert _get(server, "/api/state", host=f"localhost:{server.port}")[0] == 200


def test_the_page_loads_nothing_from_elsewhere() -> None:
    for name, _ in ASSETS.values():
        text = _asset(name).decode()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), name
        assert not re.search(r"""(fetch|import)\(\s*["'](https?:)?//""", text), name
        assert "innerHTML" not in text, name  # mesh text goes in as textContent


def test_a_taken_dashboard_port_is_an_error_naming_it_and_the_default_moves_aside() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            AddressInUse, match=f"dashboard.listen 127.0.0.1:{port} is already in use"
        ):
            bind_dashboard(f"127.0.0.1:{port}")
    srv = bind_dashboard(None)  # the default port, or another free one when it is taken
    try:
        assert srv.host == "127.0.0.1" and srv.port > 0
        assert srv.url == f"http://127.0.0.1:{srv.port}/"
    finally:
        srv.stop()


# --- dashboard.listen in mesh.yaml ----------------------------------------------------------


def _mesh_file(tmp_path: Path, dashboard: object) -> Path:
    (tmp_path / "p.yaml").write_text("")
    doc = {"services": [{"name": "a", "port": 18000}], "dashboard": dashboard}
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.0.0.2:20001", "[::1]:20001", "localhost:9"])
def test_dashboard_listen_takes_loopback_addresses(tmp_path: Path, listen: str) -> None:
    assert load_mesh_config(_mesh_file(tmp_path, {"listen": listen})).dashboard_listen == listen


def test_without_dashboard_listen_the_default_is_used(tmp_path: Path) -> None:
    assert load_mesh_config(_mesh_file(tmp_path, None)).dashboard_listen is None


@pytest.mark.parametrize(
    ("dashboard", "message"),
    [
        ({"listen": "0.0.0.0:20001"}, r"mesh.yaml:5: dashboard.listen: 0.0.0.0 is not a loopback"),
        ({"listen": "198.18.0.1:20001"}, r"dashboard.listen: 198.18.0.1 is not a loopback"),
        ({"listen": "example.com:80"}, r"dashboard.listen: example.com is not a loopback"),
        ({"listen": "127.0.0.1"}, r"dashboard.listen: '127.0.0.1' is not HOST:PORT"),
        ({"port": 1}, r"mesh.yaml:5: dashboard.port: unknown key \(known keys: listen\)"),
        ("yes", r"dashboard: expected a mapping"),
    ],
)
def test_a_bad_dashboard_listen_names_file_line_and_field(
    tmp_path: Path, dashboard: object, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_mesh_config(_mesh_file(tmp_path, dashboard))


def test_dashboard_refuses_a_listen_address_off_loopback_and_a_mesh_not_started(
    tmp_path: Path,
) -> None:
    bad = meshtrust("dashboard", "--listen", "0.0.0.0:20001", home=tmp_path)
    assert bad.returncode == 2
    assert "error: --listen: 0.0.0.0 is not a loopback address" in bad.stderr
    none = meshtrust("dashboard", home=tmp_path)
    assert none.returncode == 2
    assert "no mesh has been started on this machine" in none.stderr
    assert "Traceback" not in bad.stderr + none.stderr


def test_up_with_its_dashboard_port_taken_starts_nothing_and_says_which(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = _mesh_file(tmp_path, {"listen": f"127.0.0.1:{port}"})
        up = meshtrust("up", str(path), home=tmp_path / "home")
    assert up.returncode == 1, up.stdout + up.stderr
    assert f"error: dashboard.listen 127.0.0.1:{port} is already in use" in up.stderr
    assert "Traceback" not in up.stderr
    assert "starting" not in up.stdout and not (tmp_path / "home").exists()

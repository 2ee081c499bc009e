"""`meshtrust status`'s document, from observations written by hand (no processes)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from rich.console import Console

from meshtrust.cli.mesh import status_view
from meshtrust.mesh.probes import serial_text
from meshtrust.mesh.rbac_stats import rbac_allowed, rbac_denials
from meshtrust.mesh.state import CaState, MeshState, ServiceState
from meshtrust.mesh.status import (
    IdentityObservation,
    MeshObservation,
    ServiceObservation,
    status_document,
)
from tests.mesh_helpers import assert_status_schema, status_example, status_schema

NOW = dt.datetime(2026, 12, 1, 22, 0, 0, tzinfo=dt.UTC)
SERIAL_TEXT = "0c1f0e6a3b2d4c5e8f7a6b5c4d3e2f10"  # 32 digits, with a leading zero
SERIAL = int(SERIAL_TEXT, 16)


def service(name: str, app_pid: int | None = 300) -> ServiceState:
    return ServiceState(
        name=name,
        namespace="default",
        spiffe_id=f"spiffe://cluster.local/ns/default/sa/{name}",
        protocol="http",
        app_port=8080,
        inbound_port=16080,
        status="127.0.0.1:40001",
        agent_pid=200,
        app_pid=app_pid,
        sds_socket="/w/sds.sock",
        workload_socket="/w/workload.sock",
        cert_dir="/w/certs",
        envoy_workdir="/w/envoy",
        agent_log="/w/logs/a.log",
        app_log="/w/logs/app.log",
    )


STATE = MeshState(
    mesh_file="/m/mesh.yaml",
    work_dir="/m/work",
    trust_domain="cluster.local",
    cert_ttl_seconds=60.0,  # state files of earlier versions hold a float
    ca=CaState(
        pid=100, address="127.0.0.1:15012", metrics="127.0.0.1:40000", ca_dir="/c", log="/l"
    ),
    services=[service("a", app_pid=None), service("b")],
)

# What the agent's /debug/status says today: +00:00 offsets, float seconds, 31-digit serials.
AGENT: dict[str, Any] = {
    "spiffe_id": "spiffe://cluster.local/ns/default/sa/b",
    "state": "valid",
    "ready": True,
    "issued": 3,
    "rotations": 2,
    "failed_attempts": 0,
    "last_error": None,
    "serial": format(SERIAL, "x"),
    "not_before": "2026-12-01T21:58:30+00:00",
    "not_after": "2026-12-01T22:00:30.000000+00:00",
    "expires_in_seconds": 30.25,
    "next_rotation": "2026-12-01T22:00:00.512345+00:00",
    "next_rotation_in_seconds": 0.512345,
    "envoy": {
        "live": True,
        "pid": 4242,
        "admin": "unix:///tmp/mesh/web/envoy/admin.sock",
        "restarts": 0,
        "inbound_port": 16080,
        "mtls_mode": "STRICT",
        "policy_version": 2,
        "policy_error": None,
    },
}
STATS = {
    "http.inbound_16080.rbac.allowed": 7,
    "http.inbound_16080.rbac.denied": 2,
    "listener.inbound_16080.ssl.handshake": 9,
    "listener.inbound_16080.ssl.connection_error": 1,
    "listener.inbound_16080.no_filter_chain_match": 4,
}
METRICS = (
    "# TYPE citadel_server_success_cert_issuance_count counter\n"
    "citadel_server_success_cert_issuance_count 6.0\n"
    'meshtrust_ca_refusals_total{reason="authentication"} 2.0\n'
    'meshtrust_ca_refusals_total{reason="identity"} 1.0\n'
)


def observe(
    *,
    ca_alive: bool = True,
    metrics: str | None = METRICS,
    agent: dict[str, Any] | None = AGENT,
    agents_alive: bool = True,
    app_alive: bool = True,
) -> MeshObservation:
    return MeshObservation(
        state=STATE,
        ca_alive=ca_alive,
        ca_metrics=metrics,
        services=(
            ServiceObservation(STATE.services[0], agents_alive, None, agent, STATS),
            ServiceObservation(STATE.services[1], agents_alive, app_alive, agent, STATS),
        ),
    )


def test_the_documented_example_matches_the_documented_fields() -> None:
    assert_status_schema(status_example())
    assert status_schema()["services[].envoy.policy_error"] == ("string", True)


def test_integers_z_timestamps_and_32_digit_serials() -> None:
    doc = status_document(observe(), NOW)
    assert_status_schema(doc)
    assert doc["generated_at"] == "2026-12-01T22:00:00Z"
    assert doc["cert_ttl_seconds"] == 60 and isinstance(doc["cert_ttl_seconds"], int)
    assert doc["ca"] == {
        "address": "127.0.0.1:15012",
        "state": "running",
        "issued": 6,
        "refused": 3,
    }
    b = doc["services"][1]
    assert AGENT["serial"] == SERIAL_TEXT[1:]  # the agent drops the zero (31 digits)
    assert b["serial"] == SERIAL_TEXT
    assert (b["not_before"], b["not_after"]) == ("2026-12-01T21:58:30Z", "2026-12-01T22:00:30Z")
    assert b["next_rotation"] == "2026-12-01T22:00:00Z"
    assert (b["expires_in_seconds"], b["next_rotation_in_seconds"]) == (30, 0)
    assert b["connections"] == {
        "allowed": 7,
        "denied": 2,
        "tls_handshakes": 9,
        "tls_errors": 1,
        "plaintext_refused": 4,
    }
    assert (doc["services"][0]["app"], b["app"]) == (None, "running")


def test_an_expired_certificate_has_negative_seconds() -> None:
    doc = status_document(observe(), NOW + dt.timedelta(seconds=40, microseconds=1))
    b = doc["services"][1]
    assert b["expires_in_seconds"] == -11 and b["next_rotation_in_seconds"] == -40


def test_a_refused_policy_edit_is_in_the_document() -> None:
    refused = {**AGENT, "envoy": {**AGENT["envoy"], "policy_error": "p.yaml: spec.action: MAYBE"}}
    doc = status_document(observe(agent=refused), NOW)
    assert_status_schema(doc)
    envoy = doc["services"][1]["envoy"]
    assert envoy["policy_error"] == "p.yaml: spec.action: MAYBE" and envoy["policy_version"] == 2


@pytest.mark.parametrize(
    ("change", "state"),
    [
        ({}, "running"),
        ({"app_alive": False}, "degraded"),
        ({"ca_alive": False, "metrics": None}, "degraded"),
        ({"agent": {**AGENT, "envoy": {**AGENT["envoy"], "live": False}}}, "degraded"),
        ({"agents_alive": False, "agent": None}, "degraded"),
        (
            {
                "ca_alive": False,
                "metrics": None,
                "agents_alive": False,
                "agent": None,
                "app_alive": False,
            },
            "down",
        ),
    ],
)
def test_mesh_state(change: dict[str, Any], state: str) -> None:
    doc = status_document(observe(**change), NOW)
    assert_status_schema(doc)
    assert doc["state"] == state


def test_a_sidecar_whose_listener_is_not_active_is_degraded_with_the_reason() -> None:
    why = "inbound listener 127.0.0.1:16080 is not active: the port is taken? (see the Envoy log)"
    envoy = {**AGENT["envoy"], "live": False, "not_live_reason": why}
    doc = status_document(observe(agent={**AGENT, "ready": False, "envoy": envoy}), NOW)
    assert_status_schema(doc)
    assert doc["state"] == "degraded"
    b = doc["services"][1]
    assert (b["ready"], b["envoy"]["state"], b["envoy"]["reason"]) == (False, "not ready", why)
    live = status_document(observe(), NOW)["services"][1]["envoy"]
    assert live["reason"] is None
    console = Console(record=True, width=250)
    console.print(status_view(doc))
    assert f"b: sidecar not ready: {why}" in console.export_text()


def test_nothing_answers() -> None:
    doc = status_document(
        observe(ca_alive=False, metrics=None, agents_alive=False, agent=None), NOW
    )
    assert_status_schema(doc)
    assert doc["ca"] == {
        "address": "127.0.0.1:15012",
        "state": "down",
        "issued": None,
        "refused": None,
    }
    b = doc["services"][1]
    assert b["agent"] == "down" and b["serial"] is None and b["envoy"]["state"] == "unknown"


@pytest.mark.parametrize(
    ("stats", "allowed", "denied"),
    [
        # one HTTP filter, no rules prefix
        ({"http.inbound_1.rbac.allowed": 7, "http.inbound_1.rbac.denied": 2}, 7, 2),
        # a DENY and an ALLOW filter: a request that passes both is allowed once
        (
            {
                "http.inbound_1.rbac.deny_.allowed": 5,
                "http.inbound_1.rbac.allow_.allowed": 4,
                "http.inbound_1.rbac.deny_.denied": 1,
                "http.inbound_1.rbac.allow_.denied": 1,
            },
            4,
            2,
        ),
        # the same on a TCP service (network RBAC, its own stat prefixes)
        (
            {
                "inbound_rbac_deny.rbac.allowed": 5,
                "inbound_rbac_allow.rbac.allowed": 4,
                "inbound_rbac_deny.rbac.denied": 1,
            },
            4,
            1,
        ),
        # shadow (dry-run) rules refuse nothing
        (
            {"http.inbound_1.rbac.shadow_denied": 9, "http.inbound_1.rbac.deny_.shadow_denied": 9},
            0,
            0,
        ),
    ],
)
def test_rbac_counters(stats: dict[str, int], allowed: int, denied: int) -> None:
    assert rbac_allowed(stats) == allowed
    assert sum(v for _, v in rbac_denials(stats)) == denied
    assert all(v for _, v in rbac_denials(stats))  # what check lists: non-zero counters


def test_serials_in_the_one_form() -> None:
    assert serial_text("c1f0e6a3b2d4c5e8f7a6b5c4d3e2f10") == SERIAL_TEXT
    assert [serial_text(v) for v in (None, "", "not hex")] == [None, None, None]


def test_the_table_says_expired_and_overdue_for_moments_past() -> None:
    console = Console(record=True, width=250)
    later = NOW + dt.timedelta(seconds=40)  # past not_after and past next_rotation
    console.print(status_view(status_document(observe(), later)))
    row = next(line for line in console.export_text().splitlines() if " b " in line)
    assert "EXPIRED" in row and "overdue" in row
    console.print(status_view(status_document(observe(), NOW)))
    row = next(line for line in console.export_text().splitlines()[::-1] if " b " in line)
    assert "EXPIRED" not in row and "overdue" not in row and "30s" in row


def test_the_ca_host_lists_every_identity_and_marks_those_that_stopped_renewing() -> None:
    fresh = IdentityObservation(
        "spiffe://cluster.local/ns/default/sa/a", "h2", SERIAL_TEXT, NOW + dt.timedelta(seconds=20)
    )
    stale = IdentityObservation(
        "spiffe://cluster.local/ns/default/sa/b", "h3", SERIAL_TEXT, NOW - dt.timedelta(seconds=5)
    )
    never = IdentityObservation("spiffe://cluster.local/ns/default/sa/c", "h3", None, None)
    ca_host = dataclasses.replace(STATE, host="h1")
    obs = dataclasses.replace(observe(), state=ca_host, identities=(fresh, stale, never))
    doc = status_document(obs, NOW)
    assert_status_schema(doc)
    assert [(i["host"], i["renewing"], i["expires_in_seconds"]) for i in doc["identities"]] == [
        ("h2", True, 20),
        ("h3", False, -5),
        ("h3", False, None),
    ]
    console = Console(record=True, width=250)
    console.print(status_view(doc))
    lines = console.export_text().splitlines()
    row = next(line for line in lines if "sa/b" in line and "h3" in line)
    assert "STOPPED" in row and "EXPIRED" in row
    assert "STOPPED" not in next(line for line in lines if "sa/a" in line and "h2" in line)
    # On one host the services table shows every identity already: no second table.
    console = Console(record=True, width=250)
    console.print(status_view(status_document(dataclasses.replace(obs, state=STATE), NOW)))
    assert "identities (CA ledger)" not in console.export_text()


def test_a_host_without_the_ca_reports_whether_it_reaches_it() -> None:
    remote = dataclasses.replace(STATE, ca=None, host="h2", ca_address="198.18.0.1:15012")
    obs = dataclasses.replace(observe(ca_alive=False, metrics=None), state=remote)
    doc = status_document(obs, NOW)
    assert_status_schema(doc)
    assert doc["host"] == "h2" and doc["identities"] == []
    assert doc["ca"] == {
        "address": "198.18.0.1:15012",
        "state": "unreachable",
        "issued": None,
        "refused": None,
    }
    # Another host's CA is not this host's process: the host itself is still running.
    assert doc["state"] == "running"

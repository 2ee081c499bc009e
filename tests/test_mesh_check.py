"""`meshtrust check`, `certs monitor` and `proxy-config secret` judged from observations
written by hand: every verdict and hint without a process."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import math
from pathlib import Path
from typing import Any

import pytest

from meshtrust.ca.signing import chain_expiry_warning
from meshtrust.mesh.certs_monitor import CertObservation, judge_expiry
from meshtrust.mesh.check import (
    CHECKS,
    CaObservation,
    ChainObservation,
    MeshCheck,
    Observation,
    Verdict,
    caught_mid_rotation,
    check_agent,
    check_app,
    check_ca_chain,
    check_certificate,
    check_chain,
    check_envoy,
    check_envoy_cert,
    check_identity,
    check_policy,
    check_rbac,
    check_time_left,
    check_tls_errors,
    judge,
    judge_ca,
)
from meshtrust.mesh.probes import admin_json, admin_unreachable
from meshtrust.mesh.proxy_config import secret_rows
from meshtrust.mesh.state import CaState, MeshState, ServiceState
from meshtrust.pki import format_serial
from tests.badcerts import (
    NOW,
    cert_pem,
    intermediate_without_key_usage,
    leaf_from_another_root,
    make_ca,
    root_without_key_usage,
    svid_leaf,
)
from tests.mesh_helpers import CHECK_WALK

WEB = "spiffe://cluster.local/ns/default/sa/web"
CA = make_ca("cluster.local")
LEAF = svid_leaf(CA.signer, WEB, ttl=dt.timedelta(minutes=10))
OTHER_LEAF = svid_leaf(CA.signer, "spiffe://cluster.local/ns/default/sa/db")
FOREIGN = leaf_from_another_root(WEB)
# The article's root plugged in as signing CA, and an intermediate, without KeyUsage.
ARTICLE = root_without_key_usage()
ARTICLE_LEAF = svid_leaf(ARTICLE.signer, WEB, ttl=dt.timedelta(minutes=10))
KU_LESS = intermediate_without_key_usage("cluster.local")
KU_LESS_LEAF = svid_leaf(KU_LESS.signer, WEB, ttl=dt.timedelta(minutes=10))
SERIAL = format_serial(LEAF.cert.serial_number)

SVC = ServiceState(
    name="web",
    namespace="default",
    spiffe_id=WEB,
    protocol="http",
    app_port=8080,
    inbound_port=16080,
    status="127.0.0.1:40001",
    agent_pid=200,
    app_pid=300,
    sds_socket="/w/web/sds.sock",
    workload_socket="/w/web/workload.sock",
    cert_dir="/w/web/certs",
    envoy_workdir="/w/web/envoy",
    agent_log="/w/logs/web-agent.log",
    app_log="/w/logs/web-app.log",
)
MESH = MeshState(
    mesh_file="/m/mesh.yaml",
    work_dir="/w",
    trust_domain="cluster.local",
    cert_ttl_seconds=600,
    ca=CaState(
        pid=100,
        address="127.0.0.1:15012",
        metrics="127.0.0.1:40000",
        ca_dir="/c",
        log="/w/logs/ca.log",
    ),
    services=[SVC],
    policy_files=["/m/policies.yaml"],
)
ENVOY: dict[str, Any] = {
    "live": True,
    "pid": 4242,
    "admin": "unix:///tmp/mesh/web/envoy/admin.sock",
    "restarts": 0,
    "mtls_mode": "STRICT",
    "policy_version": 1,
    "policy_error": None,
}
AGENT: dict[str, Any] = {
    "state": "valid",
    "ready": True,
    "serial": SERIAL,
    "not_after": LEAF.cert.not_valid_after_utc.isoformat(),
    "last_error": None,
    "envoy": ENVOY,
}
GOOD = Observation(
    mesh=MESH,
    service=SVC,
    ca_alive=True,
    agent_alive=True,
    agent=AGENT,
    app_alive=True,
    app_listening=True,
    chain=tuple(LEAF.chain),
    chain_error=None,
    roots=(CA.root,),
    roots_where="/c/root-cert.pem",
    envoy_answers=True,
    envoy_leaf={"serial_number": SERIAL, "expiration_time": "2030-01-01T00:10:00Z"},
    envoy_roots=(CA.root.serial_number,),
    stats={"listener.inbound_16080.ssl.handshake": 3, "http.inbound_16080.rbac.allowed": 2},
)


def obs(**change: Any) -> Observation:
    return dataclasses.replace(GOOD, **change)


def envoy(**change: Any) -> dict[str, Any]:
    return {**AGENT, "envoy": {**ENVOY, **change}}


def test_a_healthy_workload_passes_every_step_in_order() -> None:
    steps = judge(GOOD, NOW)
    assert [s.id for s in steps] == CHECK_WALK
    assert [s.verdict for s in steps] == [Verdict.PASS] * len(CHECKS)
    assert all(s.hint is None for s in steps)


# (case, observation, check, verdict, in detail, in hint)
CASES: list[tuple[str, Observation, Any, Verdict, str, str | None]] = [
    (
        "agent dead",
        obs(agent_alive=False, agent=None),
        check_agent,
        Verdict.FAIL,
        "pid 200) is not running",
        "web-agent.log",
    ),
    ("agent hung", obs(agent=None), check_agent, Verdict.FAIL, "does not answer", "hung"),
    ("no app", obs(app_alive=None), check_app, Verdict.SKIP, "no command", None),
    (
        "app dead",
        obs(app_alive=False),
        check_app,
        Verdict.FAIL,
        "pid 300) is not running",
        "web-app.log",
    ),
    (
        "app not listening",
        obs(app_listening=False),
        check_app,
        Verdict.WARN,
        "nothing listens on 127.0.0.1:8080",
        "still starting",
    ),
    ("envoy: no agent", obs(agent=None), check_envoy, Verdict.SKIP, "does not answer", None),
    (
        "no sidecar",
        obs(agent={**AGENT, "envoy": None}),
        check_envoy,
        Verdict.FAIL,
        "no Envoy sidecar",
        "--sidecar",
    ),
    (
        "envoy not live",
        obs(agent=envoy(live=False)),
        check_envoy,
        Verdict.FAIL,
        "is not live",
        "envoy-web.log",
    ),
    (
        "envoy listener not active",
        obs(
            agent=envoy(
                live=False,
                not_live_reason="inbound listener 127.0.0.1:16080 is not active: the port is "
                "taken? (see the Envoy log)",
            )
        ),
        check_envoy,
        Verdict.FAIL,
        "is not live: inbound listener 127.0.0.1:16080 is not active: the port is taken?",
        "envoy-web.log",
    ),
    (
        "envoy admin silent",
        obs(envoy_answers=False),
        check_envoy,
        Verdict.FAIL,
        "does not answer",
        "restarts",
    ),
    (
        "envoy restarted",
        obs(agent=envoy(restarts=2)),
        check_envoy,
        Verdict.WARN,
        "restarted 2×",
        "started it again",
    ),
    (
        "no cert file",
        obs(chain=None, chain_error="/w/web/certs/cert-chain.pem does not exist"),
        check_certificate,
        Verdict.FAIL,
        "does not exist",
        "renews at half-life",
    ),
    (
        "no cert, CA down",
        obs(chain=None, chain_error="x", ca_alive=False),
        check_certificate,
        Verdict.FAIL,
        "x",
        "CA (pid 100) is not running",
    ),
    ("chain: no cert", obs(chain=None), check_chain, Verdict.SKIP, "no certificate", None),
    (
        "chain: no root",
        obs(roots=None, roots_where="cannot read the mesh root /c/root-cert.pem"),
        check_chain,
        Verdict.FAIL,
        "cannot read",
        "damaged or gone",
    ),
    (
        "chain: another root",
        obs(chain=tuple(FOREIGN.chain)),
        check_chain,
        Verdict.FAIL,
        "",
        "re-created",
    ),
    (
        # As the agent writes it: the leaf alone (the signing CA is the root).
        "chain: the article's root, no KeyUsage",
        obs(chain=(ARTICLE_LEAF.cert,), roots=(ARTICLE.root,)),
        check_chain,
        Verdict.WARN,
        "1 certificate(s) to the root O=My-Organization,CN=My-Cluster-CA (serial "
        f"{format_serial(ARTICLE.root.serial_number)}); no KeyUsage extension in "
        "O=My-Organization,CN=My-Cluster-CA",
        "accepted, as Istio, Envoy and OpenSSL accept it (`openssl req -x509` makes CAs "
        "without one), but a CA certificate should say keyCertSign, cRLSign: make the next "
        'one with -addext "keyUsage=critical,keyCertSign,cRLSign"',
    ),
    (
        "chain: intermediate without KeyUsage",
        obs(chain=tuple(KU_LESS_LEAF.chain), roots=(KU_LESS.root,)),
        check_chain,
        Verdict.WARN,
        "no KeyUsage extension in CN=test intermediate without KeyUsage",
        "keyCertSign, cRLSign",
    ),
    (
        "identity: another",
        obs(chain=tuple(OTHER_LEAF.chain)),
        check_identity,
        Verdict.FAIL,
        "sa/db, the mesh expects " + WEB,
        "--service-account",
    ),
    ("identity: no cert", obs(chain=None), check_identity, Verdict.SKIP, "no certificate", None),
    (
        "envoy-cert: unreachable",
        obs(envoy_answers=False),
        check_envoy_cert,
        Verdict.SKIP,
        "not reachable",
        None,
    ),
    (
        "envoy-cert: none",
        obs(envoy_leaf=None),
        check_envoy_cert,
        Verdict.FAIL,
        "never arrived",
        "proxy-config secret web",
    ),
    (
        "envoy-cert: stale",
        obs(envoy_leaf={"serial_number": "ab" * 16}),
        check_envoy_cert,
        Verdict.WARN,
        f"Envoy serves serial {'ab' * 16}, the agent's current certificate is {SERIAL}",
        "SDS push",
    ),
    (
        "envoy-cert: old files",
        obs(chain=tuple(OTHER_LEAF.chain)),
        check_envoy_cert,
        Verdict.WARN,
        "cert-chain.pem holds serial",
        "istio#53118",
    ),
    (
        "envoy-cert: no root",
        obs(envoy_roots=(1,)),
        check_envoy_cert,
        Verdict.WARN,
        "ROOTCA does not contain the mesh root",
        "restart the mesh",
    ),
    (
        "time: none",
        obs(envoy_leaf=None, agent={**AGENT, "not_after": None}, chain=None),
        check_time_left,
        Verdict.SKIP,
        "no certificate",
        None,
    ),
    (
        "time: expired",
        obs(envoy_leaf={"serial_number": SERIAL, "expiration_time": "2029-12-31T23:00:00Z"}),
        check_time_left,
        Verdict.FAIL,
        "EXPIRED 1h ago (NotAfter 2029-12-31T23:00:00Z)",
        "renews at half-life",
    ),
    (
        "time: expired, CA down",
        obs(ca_alive=False, envoy_leaf={"expiration_time": "2029-12-31T23:00:00Z"}),
        check_time_left,
        Verdict.FAIL,
        "EXPIRED",
        "CA (pid 100) is not running",
    ),
    (
        "time: short",
        obs(envoy_leaf={"expiration_time": "2030-01-01T00:01:00Z"}),
        check_time_left,
        Verdict.WARN,
        "1m left of a 10m certificate",
        "half-life",
    ),
    (
        "time: from the agent",
        obs(envoy_leaf=None),
        check_time_left,
        Verdict.PASS,
        "10m (NotAfter",
        None,
    ),
    ("policy: no agent", obs(agent=None), check_policy, Verdict.SKIP, "does not answer", None),
    (
        "policy refused",
        obs(agent=envoy(policy_error="spec.action: MAYBE")),
        check_policy,
        Verdict.FAIL,
        "refused: spec.action: MAYBE",
        "/m/policies.yaml; until then the sidecar keeps the last good policy (STRICT, version 1)",
    ),
    (
        "lds rejected",
        obs(stats={"listener_manager.lds.update_rejected": 1}),
        check_policy,
        Verdict.WARN,
        "rejected 1 listener update",
        "previous listener",
    ),
    (
        "DISABLE",
        obs(agent=envoy(mtls_mode="DISABLE")),
        check_policy,
        Verdict.WARN,
        "plain text only",
        "STRICT",
    ),
    (
        "no policy yet",
        obs(agent=envoy(mtls_mode=None)),
        check_policy,
        Verdict.WARN,
        "no policy compiled",
        "web-agent.log",
    ),
    (
        "PERMISSIVE",
        obs(agent=envoy(mtls_mode="PERMISSIVE")),
        check_policy,
        Verdict.PASS,
        "PERMISSIVE",
        None,
    ),
    ("tls: no stats", obs(stats=None), check_tls_errors, Verdict.SKIP, "unreachable", None),
    (
        "tls: no client cert",
        obs(stats={"listener.inbound_16080.ssl.fail_verify_no_cert": 1}),
        check_tls_errors,
        Verdict.WARN,
        "fail_verify_no_cert=1 (since Envoy (pid 4242) started)",
        "without a client certificate",
    ),
    (
        "tls: outbound",
        obs(stats={"cluster.outbound|db.ssl.fail_verify_san": 2}),
        check_tls_errors,
        Verdict.WARN,
        "fail_verify_san=2",
        "another identity",
    ),
    ("rbac: no stats", obs(stats=None), check_rbac, Verdict.SKIP, "unreachable", None),
    (
        "rbac: denied",
        obs(stats={"http.inbound_16080.rbac.denied": 3, "http.x.rbac.shadow_denied": 9}),
        check_rbac,
        Verdict.WARN,
        "3 denied",
        "AuthorizationPolicy",
    ),
]


@pytest.mark.parametrize(
    ("observation", "check", "verdict", "detail", "hint"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_each_check(
    observation: Observation, check: Any, verdict: Verdict, detail: str, hint: str | None
) -> None:
    step = check(observation, NOW)
    assert step.verdict == verdict, step
    assert detail in step.detail
    if hint is None:
        assert step.hint is None
    else:
        assert step.hint is not None and hint in step.hint, step.hint


def test_the_chain_is_judged_apart_from_expiry() -> None:
    # An expired certificate still chains to the mesh root; the time-left step says EXPIRED.
    later = LEAF.cert.not_valid_after_utc + dt.timedelta(hours=1)
    assert check_chain(GOOD, later).verdict == Verdict.PASS
    assert check_time_left(obs(envoy_leaf=None), later).verdict == Verdict.FAIL


# --- certs monitor ------------------------------------------------------------------------


def cert_obs(
    agent: dict[str, Any] | None = AGENT, chain: Any = None, ca_alive: bool = True
) -> CertObservation:
    return CertObservation(SVC, agent, chain, ca_alive)


AFTER = LEAF.cert.not_valid_after_utc


@pytest.mark.parametrize(
    ("observation", "now", "status", "source", "message"),
    [
        (cert_obs(), AFTER - dt.timedelta(hours=1), "OK", "agent", "expires in 1h"),
        (cert_obs(), AFTER - dt.timedelta(minutes=5), "WARN", "agent", "expires in 5m, within 10m"),
        (cert_obs(), AFTER + dt.timedelta(minutes=1), "EXPIRED", "agent", "expired 1m ago"),
        (
            cert_obs(ca_alive=False),
            AFTER + dt.timedelta(minutes=1),
            "EXPIRED",
            "agent",
            "the CA is not running",
        ),
        (
            cert_obs({**AGENT, "last_error": "UNAVAILABLE"}),
            AFTER + dt.timedelta(seconds=1),
            "EXPIRED",
            "agent",
            "renewal failing",
        ),
        (
            cert_obs(None, list(LEAF.chain)),
            AFTER - dt.timedelta(hours=1),
            "OK",
            "files",
            "read from cert-chain.pem",
        ),
        (cert_obs(None), AFTER, "MISSING", "files", "no certificate"),
    ],
)
def test_certs_monitor(
    observation: CertObservation, now: dt.datetime, status: str, source: str, message: str
) -> None:
    row = judge_expiry(observation, dt.timedelta(minutes=10), now)
    assert (row.status, row.source) == (status, source)
    assert message in row.message
    if status != "MISSING":
        assert row.serial == SERIAL and row.not_after is not None and row.not_after.endswith("Z")
        # whole seconds, as in every JSON output (not 599.999)
        left = (AFTER - now).total_seconds()
        assert row.expires_in_seconds == math.floor(left)
        assert isinstance(row.expires_in_seconds, int)


# --- proxy-config secret ------------------------------------------------------------------


def _inline(*certs: Any) -> dict[str, str]:
    return {"inline_bytes": base64.b64encode(cert_pem(*certs)).decode()}


def test_secret_rows() -> None:
    active = {
        "configs": [
            {
                "name": "default",
                "version_info": "3",
                "last_updated": "2026-01-01T12:00:00.123Z",
                "secret": {"tls_certificate": {"certificate_chain": _inline(*LEAF.chain)}},
            },
            {"name": "ROOTCA", "secret": {"validation_context": {"trusted_ca": _inline(CA.root)}}},
        ]
    }
    rows = secret_rows(active, {}, None, NOW)
    leaf, root = rows
    assert (leaf.resource_name, leaf.type, leaf.status, leaf.valid_cert) == (
        "default",
        "Cert Chain",
        "ACTIVE",
        True,
    )
    assert leaf.serial_number == SERIAL and leaf.subject_alt_names == [WEB]
    assert leaf.not_after.endswith("Z") and leaf.version_info == "3"
    assert (root.resource_name, root.type, root.serial_number) == (
        "ROOTCA",
        "CA",
        format_serial(CA.root.serial_number),
    )
    expired = secret_rows(active, {}, None, AFTER)
    assert [r.valid_cert for r in expired] == [False, True]  # istio#44929: not "valid" when expired


def test_secret_rows_from_certs_when_the_dump_has_no_pem() -> None:
    warming = {"configs": [{"name": "default", "secret": {"tls_certificate": {}}}]}
    certs = {
        "certificates": [
            {
                "cert_chain": [
                    {
                        "serial_number": format(LEAF.cert.serial_number, "x"),
                        "valid_from": "2029-12-31T23:58:00Z",
                        "expiration_time": "2030-01-01T01:00:00Z",
                        "subject_alt_names": [{"uri": WEB}],
                    }
                ]
            }
        ]
    }
    (row,) = secret_rows({}, warming, certs, NOW)
    assert (row.status, row.serial_number, row.subject_alt_names) == ("WARMING", SERIAL, [WEB])
    assert row.valid_cert is True and row.not_after == "2030-01-01T01:00:00Z"


@pytest.mark.parametrize(
    ("serials", "again"),
    [((1, 1, 1), False), ((2, 1, 1), True), ((1, 1, 2), True), ((1, None, 2), False)],
)
def test_a_rotation_seen_halfway_is_looked_at_again(
    serials: tuple[int | None, int | None, int | None], again: bool
) -> None:
    assert caught_mid_rotation(*serials) is again


def test_why_an_admin_socket_does_not_answer(tmp_path: Path) -> None:
    missing = f"unix://{tmp_path}/admin.sock"
    assert admin_json(missing, "/certs") is None
    assert admin_unreachable(missing).endswith("does not exist: Envoy is not running?")
    old = "http://127.0.0.1:40123"  # what agents reported before the admin API moved
    assert admin_json(old, "/certs") is None
    assert "before the admin API moved to a Unix socket" in admin_unreachable(old)


# --- the mesh-wide walk: the CA's steps ------------------------------------------------------

DAY = dt.timedelta(days=1)
# A plugged-in CA's 90-day intermediate, made a day before NOW.
CHAIN = ChainObservation(generation=1, issued_at=NOW - DAY, not_after=NOW + 89 * DAY, rotates=False)
CA_GOOD = CaObservation(
    mesh=MESH,
    alive=True,
    ready=True,
    roots=(CA.root,),
    roots_where="/c/root-cert.pem",
    chain=CHAIN,
)
ROOT_END = CA.root.not_valid_after_utc


@pytest.mark.parametrize(
    ("change", "now", "verdicts", "words"),
    [
        ({}, NOW, ("PASS", "PASS"), ["pid 100", "ready", "1 root(s)"]),
        ({"alive": False}, NOW, ("FAIL", "PASS"), ["not running", "/w/logs/ca.log"]),
        ({"ready": False}, NOW, ("FAIL", "PASS"), ["/ready does not say ready"]),
        ({"roots": None, "roots_where": "cannot read it"}, NOW, ("PASS", "FAIL"),
         ["cannot read it", "damaged or gone"]),
        ({}, ROOT_END - dt.timedelta(days=10), ("PASS", "WARN"), ["10d", "rotate the root"]),
        ({}, ROOT_END + dt.timedelta(days=1), ("PASS", "FAIL"), ["has expired"]),
    ],
)  # fmt: skip
def test_ca_checks(
    change: dict[str, Any], now: dt.datetime, verdicts: tuple[str, str], words: list[str]
) -> None:
    steps = judge_ca(dataclasses.replace(CA_GOOD, **change), now)
    assert [s.id for s in steps] == ["ca", "root", "signing-chain"]
    assert tuple(s.verdict for s in steps[:2]) == verdicts  # the chain: test_ca_chain_step
    text = " ".join(f"{s.detail} {s.hint or ''}" for s in steps[:2])
    for word in words:
        assert word in text
    for s in steps:
        assert (s.hint is not None) == (s.verdict in (Verdict.WARN, Verdict.FAIL))


@pytest.mark.parametrize(
    ("change", "days", "verdict", "words"),
    [
        ({}, 0, "PASS", ["89d left", "generation 1, NotAfter 2030-03-31T00:00:00Z",
                         "a plugged-in CA (no root key): this step warns from 2030-03-01"]),
        ({}, 44, "PASS", ["45d left"]),
        ({}, 58.9, "PASS", ["30d"]),  # 30 days before NotAfter (SPIRE's cap): level 1
        ({}, 60, "WARN", ["signing CA chain expires at 2030-03-31 00:00:00Z (29.0 days left, "
                          "notice)", "no root key", "`meshtrust ca rotate-root`"]),
        ({}, 84, "WARN", ["5.0 days left, warning"]),
        ({}, 88.5, "WARN", ["0.5 days left, critical"]),
        ({}, 90, "FAIL", ["EXPIRED 1d ago", "do not verify", "put a renewed plugged-in CA"]),
        ({"rotates": True}, 84, "PASS", ["the CA rotates it", "a successor from 2030-03-01"]),
        ({"rotates": True}, 90, "FAIL", ["EXPIRED", "is it running?",
                                         "`meshtrust ca slots --ca-dir /c`"]),
    ],
)  # fmt: skip
def test_ca_chain_step(change: dict[str, Any], days: float, verdict: str, words: list[str]) -> None:
    obs = dataclasses.replace(CA_GOOD, chain=dataclasses.replace(CHAIN, **change))
    step = check_ca_chain(obs, NOW + days * DAY)
    assert (step.id, step.title, step.verdict) == ("signing-chain", "signing CA chain", verdict)
    text = f"{step.detail} {step.hint or ''}"
    for word in words:
        assert word in text, text
    assert (step.hint is not None) == (step.verdict in (Verdict.WARN, Verdict.FAIL))


def test_the_chain_step_warns_exactly_when_the_ca_does() -> None:
    """The same decision as the CA's log line, gauge and `ca slots --check`, at every hour of
    the chain's life: WARN (or, past NotAfter, FAIL) iff chain_expiry_warning says so."""
    for hour in range(0, 92 * 24, 7):
        now = NOW - DAY + dt.timedelta(hours=hour)
        warning = chain_expiry_warning(CHAIN.issued_at, CHAIN.not_after, now)
        step = check_ca_chain(CA_GOOD, now)
        if now >= CHAIN.not_after:
            assert step.verdict == Verdict.FAIL
        elif warning is None:
            assert step.verdict == Verdict.PASS
        else:
            assert (step.verdict, step.detail, step.hint) == (
                Verdict.WARN,
                warning.summary,
                warning.advice,
            )
            assert warning.message == f"{step.detail}: {step.hint}"


def test_the_chain_step_without_a_chain() -> None:
    broken = dataclasses.replace(CA_GOOD, chain=None, chain_error="cannot read signing slots: X")
    step = check_ca_chain(broken, NOW)
    assert step.verdict == Verdict.WARN and "cannot read signing slots: X" in step.detail
    assert step.hint is not None and "meshtrust ca slots --ca-dir /c" in step.hint
    elsewhere = dataclasses.replace(CA_GOOD, chain=None, chain_missing="the CA runs elsewhere")
    assert check_ca_chain(elsewhere, NOW) == check_ca_chain(elsewhere, NOW + 90 * DAY)
    assert check_ca_chain(elsewhere, NOW).verdict == Verdict.SKIP
    assert check_ca_chain(elsewhere, NOW).detail == "the CA runs elsewhere"


def test_ca_on_another_host_is_judged_by_its_address() -> None:
    remote = dataclasses.replace(MESH, ca=None, ca_address="198.18.0.1:15012")
    up = judge_ca(dataclasses.replace(CA_GOOD, mesh=remote, ready=None), NOW)[0]
    assert (up.verdict, up.detail) == (Verdict.PASS, "198.18.0.1:15012 accepts connections")
    down = judge_ca(dataclasses.replace(CA_GOOD, mesh=remote, alive=False, ready=None), NOW)[0]
    assert down.verdict == Verdict.FAIL and "not reachable from this host" in down.detail


def test_the_mesh_check_fails_when_any_step_fails() -> None:
    good = judge(GOOD, NOW)
    bad = judge(obs(agent_alive=False, agent=None), NOW)
    ca = judge_ca(CA_GOOD, NOW)
    assert not MeshCheck(ca=ca, workloads={"web": good}).failed
    report = MeshCheck(ca=ca, workloads={"web": good, "db": bad})
    assert report.failed
    doc = report.to_json()
    assert doc["ok"] is False and doc["ca"]["ok"] is True
    assert [(w["workload"], w["ok"]) for w in doc["workloads"]] == [("web", True), ("db", False)]
    assert [s["id"] for s in doc["workloads"][0]["steps"]] == CHECK_WALK
    failed_ca = MeshCheck(ca=judge_ca(dataclasses.replace(CA_GOOD, alive=False), NOW), workloads={})
    assert failed_ca.failed and failed_ca.to_json()["ca"]["ok"] is False

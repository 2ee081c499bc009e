"""The dashboard of a real `meshtrust up` (CA, agents, Envoys, apps), in a real headless
Chromium (Debian's, driven by Playwright): it loads without console errors, shows every
service with its SPIFFE ID, a denied call turns its edge denied within seconds, a rotation
moves the timeline. One live mesh for the module; a screenshot is kept as an artifact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from meshtrust.mesh import MeshState, read_state
from tests.mesh_helpers import APP, http_get, meshtrust, upstream_port, write_mesh
from tests.processes import free_port
from tests.waiting import until

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"

POLICIES = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-allow-backend, namespace: default}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules:
    - from:
        - source: {principals: ["cluster.local/ns/default/sa/backend"]}
"""


@dataclass
class LiveMesh:
    url: str
    state: MeshState
    artifacts: Path
    mesh_file: Path
    home: Path


def _app(name: str, upstreams: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "command": [sys.executable, str(APP)],
        "env": {"CALL_EVERY": "0"},  # the test makes the calls
        "upstreams": [{"service": u} for u in upstreams],
    }


def _state_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "api/state", timeout=5) as resp:
        data = json.loads(resp.read())
    assert isinstance(data, dict)
    return data


def _all_serving(url: str) -> bool:
    try:
        data = _state_json(url)
    except OSError:
        return False
    timelines = data.get("timelines", [])
    return len(timelines) == 3 and all(t["serial"] for t in timelines)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveMesh]:
    tmp = tmp_path_factory.mktemp("dashboard")
    services = [_app("web", ["backend", "db"]), _app("backend", ["db"]), _app("db", [])]
    path = write_mesh(tmp, services, POLICIES, cert_ttl="20s")
    port = free_port()
    mesh = yaml.safe_load(path.read_text())
    mesh["dashboard"] = {"listen": f"127.0.0.1:{port}"}
    path.write_text(yaml.safe_dump(mesh, sort_keys=False))
    home = tmp / "home"
    out = (tmp / "up.out").open("w")
    with out:
        up = subprocess.Popen(
            [sys.executable, "-m", "meshtrust", "up", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MESHTRUST_HOME": str(home), "COLUMNS": "200"},
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        until(lambda: up.poll() is not None or _all_serving(url), timeout=120, what="the mesh")
        assert up.poll() is None, (tmp / "up.out").read_text()
        assert f"dashboard: {url}" in (tmp / "up.out").read_text()
        state = read_state(Path((home / "current").read_text().strip()))
        yield LiveMesh(url, state, tmp, path, home)
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        meshtrust("down", str(path), home=home)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser, live: LiveMesh) -> Iterator[tuple[Page, list[str]]]:
    context = browser.new_context(viewport={"width": 1280, "height": 1100})
    page = context.new_page()
    errors: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type in ("error", "warning"):
            errors.append(f"{msg.type}: {msg.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url}"))
    page.goto(live.url)
    page.wait_for_selector("body[data-rendered=true]", timeout=15_000)
    try:
        yield page, errors
    finally:
        context.close()


def test_the_page_loads_cleanly_and_shows_every_service_and_its_spiffe_id(
    page: tuple[Page, list[str]], live: LiveMesh
) -> None:
    p, errors = page
    for svc in live.state.services:
        row = p.locator(f"#services tr[data-service={svc.name}]")
        assert row.locator("td.id").first.inner_text() == svc.spiffe_id
        node = p.locator(f"#graph g.node[data-service={svc.name}]")
        assert node.get_attribute("data-mtls") == "STRICT"
        assert svc.spiffe_id in node.inner_html()
    assert p.locator("#graph g.edge").count() == 3  # web->backend, web->db, backend->db
    assert p.locator("#ca dd[data-field=state]").inner_text() == "running"
    assert int(p.locator("#ca dd[data-field=issued]").inner_text()) >= 3
    assert errors == []


def test_a_denied_call_turns_its_edge_denied_within_seconds(
    page: tuple[Page, list[str]], live: LiveMesh
) -> None:
    p, errors = page
    assert http_get(upstream_port(live.state, "web", "backend"))[0] == 200
    status, body = http_get(upstream_port(live.state, "web", "db"))
    assert (status, body) == (403, "RBAC: access denied")
    p.wait_for_selector("g.edge[data-from=web][data-to=db][data-state=denied]", timeout=10_000)
    p.wait_for_selector(
        "g.edge[data-from=web][data-to=backend][data-state=allowed]", timeout=10_000
    )
    assert p.locator("g.edge[data-from=backend][data-to=db]").get_attribute("data-state") == "idle"
    p.wait_for_selector("#events li[data-kind=denial]", timeout=10_000)
    assert "db denied" in p.locator("#events li[data-kind=denial]").first.inner_text()
    shot = live.artifacts / "dashboard.png"
    p.screenshot(path=str(shot), full_page=True)
    print(f"\ndashboard screenshot: {shot}")
    assert errors == []


def test_a_rotation_moves_the_timeline(page: tuple[Page, list[str]], live: LiveMesh) -> None:
    p, errors = page
    row = p.locator("#timelines [data-timeline=backend]")
    serial, issued = row.get_attribute("data-serial"), row.get_attribute("data-issued")
    assert serial and issued
    # 20 s certificates renew at about half-life: a new one within ~10 s (slack for load).
    p.wait_for_function(
        "old => document.querySelector('[data-timeline=backend]').dataset.serial !== old",
        arg=serial,
        timeout=40_000,
    )
    new_serial = row.get_attribute("data-serial")
    new_issued = row.get_attribute("data-issued")
    assert new_issued is not None and new_issued > issued
    current = row.locator("rect.cert.current")
    assert current.get_attribute("data-serial") == new_serial
    assert row.locator(f"rect.cert[data-serial='{serial}']").count() == 1  # the old one stays
    p.wait_for_selector("#events li[data-kind=rotation]", timeout=10_000)
    assert errors == []


def test_dashboard_serves_a_mesh_started_elsewhere_until_stopped(live: LiveMesh) -> None:
    """`meshtrust dashboard` for a mesh `up --detach` left running (here: another `up`'s)."""
    port = free_port()
    cmd = [sys.executable, "-m", "meshtrust", "dashboard", str(live.mesh_file)]
    proc = subprocess.Popen(
        [*cmd, "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MESHTRUST_HOME": str(live.home)},
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        until(lambda: proc.poll() is not None or _all_serving(url), timeout=30, what="served")
        assert proc.poll() is None, proc.communicate()
        names = [n["name"] for n in _state_json(url)["nodes"]]
        assert names == ["web", "backend", "db"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"dashboard of {live.state.mesh_file}: {url}" in out
    assert "Traceback" not in err


def test_a_revocation_is_an_event_and_a_red_bar_on_the_timeline(
    page: tuple[Page, list[str]], live: LiveMesh
) -> None:
    p, errors = page
    assert live.state.ca is not None
    row = p.locator("#timelines [data-timeline=web]")
    serial = row.get_attribute("data-serial")
    assert serial
    revoke = meshtrust(
        "ca", "revoke", "--ca-dir", live.state.ca.ca_dir, "--serial", serial, home=live.home
    )
    assert revoke.returncode == 0, revoke.stderr
    p.wait_for_selector("#events li[data-kind=revocation]", timeout=10_000)
    assert serial[:12] in p.locator("#events li[data-kind=revocation]").first.inner_text()
    p.wait_for_selector(f"[data-timeline=web] rect.cert.revoked[data-serial='{serial}']")
    assert int(p.locator("#ca dd[data-field=revoked]").inner_text()) >= 1
    # The agent renews at once when its own certificate is revoked: the timeline moves on.
    p.wait_for_function(
        "old => document.querySelector('[data-timeline=web]').dataset.serial !== old",
        arg=serial,
        timeout=30_000,
    )
    assert errors == []

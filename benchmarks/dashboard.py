"""The dashboard's page weight and time to first render, on a live mesh, in real Chromium.

Set-up: a real ``meshtrust up`` (CA, three agents with their Envoys, the quickstart's app
and policies: web -> backend allowed, web -> db denied, backend -> db allowed) on free
loopback ports in a scratch directory, its dashboard on ``dashboard.listen``. The apps call
their upstreams every 2 s, so the graph has traffic and denials to show.

Figures:

* **page weight**: the bytes of everything the page loads (the HTML, ``app.js``,
  ``style.css``: nothing else, no CDN) as served, and of one ``/api/state`` document (what
  every poll, once a second, transfers);
* **time to first render**: Debian's headless Chromium (Playwright, never a downloaded
  browser) loads the page ``--loads`` times, each in a fresh browser context (cold cache);
  per load, Chromium's performance timing: first contentful paint (``paint`` entries), and
  the ``meshtrust-first-render`` mark the page sets once it has drawn the first state
  (graph, timelines, events), both in ms since navigation start. Medians are printed, with
  the min and max.

* **cost**: ``meshtrust dashboard`` (the same server and observer ``up`` runs in a thread)
  as a process of its own on the same mesh, with one page open and polling: its CPU over
  ``--cost-seconds`` (as a share of one core, from ``/proc/<pid>/stat``) and its RSS.

``--screenshot PATH`` also saves a full-page screenshot once traffic, a denial and a rotation
are on it (docs/dashboard.png is made this way).

Run: ``.venv/bin/python benchmarks/dashboard.py [--loads 9] [--screenshot docs/dashboard.png]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from playwright.sync_api import Browser, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart"
CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"error: {what} within {timeout:.0f}s")
        time.sleep(0.2)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return bytes(resp.read())


def _state(url: str) -> dict[str, Any]:
    try:
        data = json.loads(_get(url + "api/state"))
    except OSError:
        return {}
    return data if isinstance(data, dict) else {}


def _mesh_file(directory: Path, dashboard_port: int) -> Path:
    shutil.copy(QUICKSTART / "policies.yaml", directory / "policies.yaml")
    app = [sys.executable, str(QUICKSTART / "app.py")]

    def service(name: str, upstreams: list[str]) -> dict[str, Any]:
        return {
            "name": name,
            "port": _free_port(),
            "inboundPort": _free_port(),
            "command": app,
            "env": {"CALL_EVERY": "2"},
            "upstreams": [{"service": u, "localPort": _free_port()} for u in upstreams],
        }

    mesh = {
        "trustDomain": "cluster.local",
        "certTTL": "30s",
        "workDir": str(directory / "work"),
        "ca": {"listen": f"127.0.0.1:{_free_port()}"},
        "services": [
            service("web", ["backend", "db"]),
            service("backend", ["db"]),
            service("db", []),
        ],
        "policies": ["policies.yaml"],
        "dashboard": {"listen": f"127.0.0.1:{dashboard_port}"},
    }
    path = directory / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh, sort_keys=False))
    return path


@contextmanager
def live_mesh(directory: Path) -> Iterator[tuple[str, Path, dict[str, str]]]:
    """``meshtrust up`` in the foreground (its live view to a file); yields the dashboard URL
    once every service has a certificate; SIGTERM stops it all."""
    port = _free_port()
    path = _mesh_file(directory, port)
    env = {**os.environ, "MESHTRUST_HOME": str(directory / "home")}
    with (directory / "up.out").open("w") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "meshtrust", "up", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait(
            lambda: (
                up.poll() is not None
                or all(t["serial"] for t in _state(url).get("timelines", [{"serial": None}]))
            ),
            120,
            "the mesh did not start",
        )
        if up.poll() is not None:
            raise SystemExit(f"error: meshtrust up exited:\n{(directory / 'up.out').read_text()}")
        yield url, path, env
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()


def page_weight(url: str) -> dict[str, int]:
    from meshtrust.dashboard import ASSETS

    sizes = {path: len(_get(url + path.lstrip("/"))) for path in ASSETS}
    sizes["/api/state"] = len(_get(url + "api/state"))
    return sizes


FIRST_RENDER = """() => {
  const mark = performance.getEntriesByName('meshtrust-first-render')[0];
  const fcp = performance.getEntriesByType('paint')
    .find(e => e.name === 'first-contentful-paint');
  return [fcp ? fcp.startTime : null, mark ? mark.startTime : null];
}"""


def first_render(browser: Browser, url: str, loads: int) -> tuple[list[float], list[float]]:
    fcps, renders = [], []
    for _ in range(loads):
        context = browser.new_context(viewport={"width": 1280, "height": 1100})
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("body[data-rendered=true]", timeout=15_000)
        fcp, render = page.evaluate(FIRST_RENDER)
        fcps.append(float(fcp))
        renders.append(float(render))
        context.close()
    return fcps, renders


def screenshot(browser: Browser, url: str, path: Path) -> None:
    """Once the page shows allowed and denied calls and a rotation."""
    _wait(
        lambda: (
            {e["state"] for e in _state(url).get("edges", [])} >= {"allowed", "denied"}
            and any(e["kind"] == "rotation" for e in _state(url).get("events", []))
        ),
        90,
        "no traffic, denial and rotation to show",
    )
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("body[data-rendered=true]", timeout=15_000)
    page.wait_for_timeout(1500)  # a couple of polls: the recent counts fill in
    page.screenshot(path=str(path), full_page=True)
    context.close()
    print(f"screenshot: {path}")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def dashboard_cost(
    browser: Browser, mesh_file: Path, env: dict[str, str], seconds: float
) -> tuple[float, float]:
    """CPU share of one core and RSS (MB) of `meshtrust dashboard` with one page polling."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshtrust", "dashboard", str(mesh_file)]
        + ["--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait(lambda: bool(_state(url).get("observed")), 30, "meshtrust dashboard did not serve")
        context = browser.new_context()
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("body[data-rendered=true]", timeout=15_000)
        before, start = _cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)  # measuring a steady state, not waiting for one
        used, elapsed = _cpu_seconds(proc.pid) - before, time.monotonic() - start
        rss = _rss_mb(proc.pid)
        context.close()
        return used / elapsed, rss
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def _summary(values: list[float]) -> str:
    median, low, high = statistics.median(values), min(values), max(values)
    return f"median {median:6.1f} ms  (min {low:.1f}, max {high:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", type=int, default=9, help="page loads to time (default 9)")
    parser.add_argument("--screenshot", type=Path, help="also save a screenshot here")
    parser.add_argument(
        "--cost-seconds", type=float, default=20, help="how long to measure the CPU (default 20)"
    )
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="meshtrust-dash-") as tmp,
        live_mesh(Path(tmp)) as (url, mesh_file, env),
    ):
        sizes = page_weight(url)
        assets = sum(v for k, v in sizes.items() if k != "/api/state")
        print("page weight (bytes, as served):")
        for path, size in sizes.items():
            print(f"  {path:12} {size:7d}")
        print(f"  {'assets':12} {assets:7d}  (everything the page loads; nothing from elsewhere)")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
            )
            try:
                fcps, renders = first_render(browser, url, args.loads)
                chromium = f"headless Chromium {browser.version}"
                print(f"time to first render, {args.loads} loads, {chromium}:")
                print(f"  first contentful paint   {_summary(fcps)}")
                print(f"  first state drawn        {_summary(renders)}")
                cpu, rss = dashboard_cost(browser, mesh_file, env, args.cost_seconds)
                print(
                    f"`meshtrust dashboard`, one page polling, {args.cost_seconds:.0f} s: "
                    f"CPU {100 * cpu:.1f}% of one core, RSS {rss:.0f} MB"
                )
                if args.screenshot is not None:
                    screenshot(browser, url, args.screenshot)
            finally:
                browser.close()


if __name__ == "__main__":
    main()

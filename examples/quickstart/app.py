"""The quickstart's app: one tiny plain-text HTTP server, run once per service of mesh.yaml.

It knows nothing about TLS. Its Envoy sidecar terminates mTLS in front of it and tells it who
called in the ``x-forwarded-client-cert`` header (``...;URI=spiffe://<caller>``); to call
another service it talks plain HTTP to a local port of its own sidecar, which carries the
request over mTLS.

Environment (set by ``meshtrust up``)::

    PORT                 the port to listen on, on 127.0.0.1 only (required)
    SERVICE_NAME         this service's name (default "app")
    UPSTREAM_<NAME>      127.0.0.1:<localPort> of each upstream (NAME upper-cased, '-' -> '_')
    CALL_EVERY           seconds between rounds of calls to every upstream (default 5; 0 = off)
    SPIFFE_ENDPOINT_SOCKET   the agent's Workload API (unused here; a SPIFFE client would use it)

Endpoints::

    GET /                 200, JSON: which service answered and who called it
    GET /call/<upstream>  calls that upstream through the sidecar; answers with the
                          upstream's status (502 when it could not be reached) and one line
                          such as "web -> db: 403 RBAC: access denied"

Stdlib only. SIGTERM or SIGINT: stops cleanly, exit status 0.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType

NO_IDENTITY = "plain text (no client identity)"
XFCC = "x-forwarded-client-cert"
CALL_TIMEOUT = 5.0  # seconds, per call to an upstream
MAX_BODY = 64 * 1024  # bytes of an upstream's answer kept


def out(line: str) -> None:
    """One line to stdout, flushed at once (the runner shows it as it comes)."""
    print(line, flush=True)


# --- who called: x-forwarded-client-cert ---------------------------------------------------------


def _split_quoted(text: str, sep: str) -> list[str]:
    """Split ``text`` on ``sep`` outside double quotes (backslash escapes inside them)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif quoted and ch == "\\":
            current.append(ch)
            escaped = True
        elif ch == '"':
            current.append(ch)
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        result: list[str] = []
        escaped = False
        for ch in inner:
            if escaped or ch != "\\":
                result.append(ch)
                escaped = False
            else:
                escaped = True
        return "".join(result)
    return value


def caller_identity(xfcc: str | None) -> str | None:
    """The caller's SPIFFE ID from an ``x-forwarded-client-cert`` value, or None.

    The header is a comma-separated list of elements, one per proxy hop, each a list of
    ``Key=value`` pairs separated by ``;`` (values may be double-quoted). The last element
    is the hop nearest to us: the one our own sidecar wrote.
    """
    if not xfcc:
        return None
    elements = [e for e in _split_quoted(xfcc, ",") if e.strip()]
    if not elements:
        return None
    for pair in _split_quoted(elements[-1], ";"):
        key, sep, value = pair.partition("=")
        if sep and key.strip().lower() == "uri":
            uri = _unquote(value)
            if uri.startswith("spiffe://"):
                return uri
    return None


# --- calling an upstream -------------------------------------------------------------------------


@dataclass(frozen=True)
class CallResult:
    """What one call to an upstream came to: an HTTP status and body, or an error."""

    caller: str
    upstream: str
    status: int | None  # None: no HTTP answer at all
    body: str
    error: str | None = None

    def summary(self) -> str:
        """One line: ``web -> backend: 200 (backend saw spiffe://...)``."""
        head = f"{self.caller} -> {self.upstream}:"
        if self.status is None:
            return f"{head} error: {self.error}"
        answer = _parse_answer(self.body)
        if answer is not None:
            who = answer.get("service", self.upstream)
            return f"{head} {self.status} ({who} saw {answer.get('caller', '?')})"
        first = self.body.strip().splitlines()[0] if self.body.strip() else ""
        if len(first) > 160:
            first = first[:157] + "..."
        return f"{head} {self.status} {first}".rstrip()


def _parse_answer(body: str) -> dict[str, str] | None:
    """This app's own ``GET /`` answer, or None when ``body`` is something else."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or "service" not in data or "caller" not in data:
        return None
    return {str(k): str(v) for k, v in data.items()}


def _reason(exc: BaseException) -> str:
    """A short, human reason for a failed connection (never a traceback)."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the sidecar running?)"
    if isinstance(exc, TimeoutError):
        return f"no answer within {CALL_TIMEOUT:g}s"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by peer"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "connection closed before an answer"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def call_upstream(caller: str, upstream: str, address: str) -> CallResult:
    """``GET /`` on the upstream's local port (plain HTTP; the sidecar adds the mTLS)."""
    host, _, port_text = address.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        return CallResult(caller, upstream, None, "", f"bad address {address!r}")
    conn = http.client.HTTPConnection(host or "127.0.0.1", port, timeout=CALL_TIMEOUT)
    try:
        conn.request("GET", "/", headers={"Host": upstream, "User-Agent": f"quickstart/{caller}"})
        resp = conn.getresponse()
        body = resp.read(MAX_BODY).decode("utf-8", errors="replace")
        return CallResult(caller, upstream, resp.status, body)
    except (OSError, http.client.HTTPException) as exc:
        return CallResult(caller, upstream, None, "", _reason(exc))
    finally:
        conn.close()


# --- the app -------------------------------------------------------------------------------------


def upstreams_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """``UPSTREAM_<NAME>=host:port`` -> ``{name: host:port}`` (``MY_DB`` becomes ``my-db``)."""
    found = {}
    for key, value in env.items():
        if key.startswith("UPSTREAM_") and len(key) > len("UPSTREAM_") and value:
            found[key[len("UPSTREAM_") :].lower().replace("_", "-")] = value
    return dict(sorted(found.items()))


class App:
    def __init__(self, name: str, upstreams: dict[str, str]) -> None:
        self.name = name
        self.upstreams = upstreams
        self.stop = threading.Event()

    def call(self, upstream: str) -> CallResult:
        return call_upstream(self.name, upstream, self.upstreams[upstream])

    def call_loop(self, every: float) -> None:
        """Every ``every`` seconds: call each upstream, print one line per call."""
        while not self.stop.wait(every):
            for upstream in self.upstreams:
                if self.stop.is_set():
                    return
                out(self.call(upstream).summary())


class Handler(BaseHTTPRequestHandler):
    server_version = "quickstart"
    protocol_version = "HTTP/1.1"
    app: App  # set on the subclass made in main()

    def do_GET(self) -> None:  # noqa: N802 (the name http.server looks for)
        path = self.path.split("?", 1)[0]
        if path == "/":
            caller = caller_identity(self.headers.get(XFCC)) or NO_IDENTITY
            body = {"service": self.app.name, "caller": caller}
            self._send(200, json.dumps(body) + "\n", "application/json")
        elif path.startswith("/call/") and path.count("/") == 2:
            upstream = path[len("/call/") :]
            if upstream not in self.app.upstreams:
                known = ", ".join(self.app.upstreams) or "none"
                self._send(
                    404, f"{self.app.name} has no upstream {upstream!r} (its upstreams: {known})\n"
                )
                return
            result = self.app.call(upstream)
            text = result.summary() + "\n"
            answer = result.body.strip()
            if answer and answer not in text:  # the whole answer, when the line left some out
                text += answer + "\n"
            self._send(result.status if result.status is not None else 502, text)
        else:
            self._send(404, "try GET / or GET /call/<upstream>\n")

    def _send(self, status: int, text: str, content_type: str = "text/plain") -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (base's name)
        pass  # no access log: the call lines are what this demo is about


class Server(ThreadingHTTPServer):
    daemon_threads = True
    label = "app"

    def handle_error(self, request: object, client_address: object) -> None:
        exc = sys.exc_info()[1]
        if exc is not None and not isinstance(exc, ConnectionError):
            out(f"{self.label}: error serving a request: {_reason(exc)}")


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise SystemExit(f"{name}={text!r}: expected a number of seconds") from None
    if value < 0:
        raise SystemExit(f"{name}={text!r}: expected 0 (off) or more seconds")
    return value


def main() -> int:
    name = os.environ.get("SERVICE_NAME") or "app"
    port_text = os.environ.get("PORT", "")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        print(f"{name}: PORT must be set to a port number, got {port_text!r}", file=sys.stderr)
        return 2
    every = _env_seconds("CALL_EVERY", 5.0)
    app = App(name, upstreams_from_env(os.environ))
    handler = type("BoundHandler", (Handler,), {"app": app})
    try:
        server = Server(("127.0.0.1", int(port_text)), handler)
    except OSError as exc:
        print(f"{name}: cannot listen on 127.0.0.1:{port_text}: {_reason(exc)}", file=sys.stderr)
        return 1
    server.label = name

    def on_signal(signum: int, frame: FrameType | None) -> None:
        app.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    serving = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    serving.start()
    ups = ", ".join(f"{u} via {a}" for u, a in app.upstreams.items()) or "none"
    out(f"{name}: listening on 127.0.0.1:{port_text}; upstreams: {ups}")
    if every > 0 and app.upstreams:
        threading.Thread(target=app.call_loop, args=(every,), name="calls", daemon=True).start()
    while not app.stop.wait(1.0):
        pass
    server.shutdown()
    server.server_close()
    out(f"{name}: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

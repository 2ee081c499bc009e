// meshtrust dashboard: polls /api/state (docs/dashboard.md) and draws it. Plain JS and SVG,
// no libraries, nothing fetched from elsewhere. Every text from the mesh goes in through
// textContent, never as HTML.
"use strict";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";
let firstRender = true;

function make(ns, tag, attrs, text) {
  const node = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) node.setAttribute(k, String(v));
  }
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}
const h = (tag, attrs, text) => make(null, tag, attrs, text);
const s = (tag, attrs, text) => make(SVG, tag, attrs, text);

function seconds(text) {
  const t = Date.parse(text || "");
  return Number.isNaN(t) ? null : t / 1000;
}

function duration(secs) {
  if (secs === null || secs === undefined) return "-";
  const neg = secs < 0;
  let v = Math.abs(Math.round(secs));
  const parts = [];
  if (v >= 3600) { parts.push(Math.floor(v / 3600) + "h"); v %= 3600; }
  if (v >= 60) { parts.push(Math.floor(v / 60) + "m"); v %= 60; }
  if (!parts.length || v) parts.push(v + "s");
  return (neg ? "-" : "") + parts.slice(0, 2).join("");
}

function clock(text) {
  const t = seconds(text);
  return t === null ? "-" : new Date(t * 1000).toISOString().slice(11, 19);
}

function short(serial) {
  return serial ? (serial.length > 12 ? serial.slice(0, 12) + "…" : serial) : "-";
}

function replace(parent, children) {
  parent.replaceChildren(...children);
}

// --- the graph -------------------------------------------------------------------------

function layout(nodes) {
  // On a circle, then moved so the drawing is centred (three nodes make a triangle that
  // would otherwise sit in the top half).
  const cx = 320, cy = 190, r = nodes.length > 1 ? 150 : 0;
  const at = {};
  nodes.forEach((n, i) => {
    const a = -Math.PI / 2 + (2 * Math.PI * i) / nodes.length;
    at[n.name] = { x: cx + r * Math.cos(a), y: cy + r * Math.sin(a) };
  });
  const ys = Object.values(at).map((p) => p.y);
  const shift = cy - (Math.min(...ys) + Math.max(...ys)) / 2;
  for (const p of Object.values(at)) p.y += shift;
  return at;
}

function edgeLabel(e) {
  if (e.state === "unknown") return "?";
  if (e.denied_recent === null) return e.calls_recent + " conn";
  return "✓" + e.allowed_recent + " ✗" + e.denied_recent;
}

function drawGraph(state) {
  const svg = document.getElementById("graph");
  const at = layout(state.nodes);
  const defs = s("defs");
  for (const kind of ["allowed", "denied", "idle", "unknown"]) {
    const m = s("marker", { id: "arrow-" + kind, viewBox: "0 0 10 10", refX: 9, refY: 5,
      markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
    m.appendChild(s("path", { d: "M0,0 L10,5 L0,10 z", class: "arrowhead-" + kind }));
    defs.appendChild(m);
  }
  const children = [defs];
  const pairs = new Set(state.edges.map((e) => e.from + "\u0000" + e.to));
  for (const e of state.edges) {
    const a = at[e.from], b = at[e.to];
    if (!a || !b) continue;  // a callee on another host
    const dx = b.x - a.x, dy = b.y - a.y, len = Math.hypot(dx, dy) || 1;
    const ux = dx / len, uy = dy / len;
    const off = pairs.has(e.to + "\u0000" + e.from) ? 7 : 0;  // both ways: side by side
    const ox = -uy * off, oy = ux * off, gap = 40;
    const g = s("g", { class: "edge edge-" + e.state, "data-from": e.from, "data-to": e.to,
      "data-state": e.state });
    g.appendChild(s("line", { x1: a.x + ux * gap + ox, y1: a.y + uy * gap + oy,
      x2: b.x - ux * (gap + 2) + ox, y2: b.y - uy * (gap + 2) + oy,
      "marker-end": "url(#arrow-" + e.state + ")" }));
    g.appendChild(s("text", { x: (a.x + b.x) / 2 + ox * 2.5, y: (a.y + b.y) / 2 + oy * 2.5,
      "text-anchor": "middle", class: "count" }, edgeLabel(e)));
    g.appendChild(s("title", {}, e.from + " → " + e.to + " (" + e.protocol + "): " + e.state +
      "; last " + state.window_seconds + " s: " + e.calls_recent + " call(s)" +
      (e.denied_recent === null ? "" : ", " + e.denied_recent + " denied") +
      "; since the sidecar started: " + e.calls_total + (e.denied_total === null ? "" :
      ", " + e.denied_total + " denied")));
    children.push(g);
  }
  for (const n of state.nodes) {
    const p = at[n.name];
    const cls = "node mtls-" + (n.mtls_mode || "none") + (n.agent === "running" ? "" : " down");
    const g = s("g", { class: cls, "data-service": n.name, "data-mtls": n.mtls_mode });
    g.appendChild(s("circle", { cx: p.x, cy: p.y, r: 34 }));
    g.appendChild(s("text", { x: p.x, y: p.y - 2, "text-anchor": "middle", class: "name" }, n.name));
    g.appendChild(s("text", { x: p.x, y: p.y + 13, "text-anchor": "middle", class: "mode" },
      n.mtls_mode || "?"));
    g.appendChild(s("text", { x: p.x, y: p.y + 50, "text-anchor": "middle", class: "id" },
      n.spiffe_id));
    if (n.denied_recent) {
      g.appendChild(s("text", { x: p.x + 30, y: p.y - 30, class: "badge" }, "✗" + n.denied_recent));
    }
    children.push(g);
  }
  replace(svg, children);
}

// --- the tables --------------------------------------------------------------------------

function drawCa(state) {
  const ca = state.ca;
  const rows = [
    ["address", ca.address], ["state", ca.state], ["issued", ca.issued], ["refused", ca.refused],
    ["revoked", ca.revoked], ["trust domain", state.trust_domain],
    ["certificate TTL", duration(state.cert_ttl_seconds)],
  ];
  if (ca.ledger_error) rows.push(["ledger", ca.ledger_error]);
  const out = [];
  for (const [k, v] of rows) {
    out.push(h("dt", {}, k), h("dd", { "data-field": k }, v === null || v === undefined ? "-" : v));
  }
  replace(document.getElementById("ca"), out);
}

function drawServices(state) {
  const now = seconds(state.generated_at);
  const timelines = Object.fromEntries(state.timelines.map((t) => [t.service, t]));
  const rows = state.nodes.map((n) => {
    const t = timelines[n.name] || {};
    const expires = seconds(t.not_after), rotates = seconds(t.next_rotation);
    const tr = h("tr", { "data-service": n.name });
    tr.append(
      h("td", {}, n.name),
      h("td", { class: "id" }, n.spiffe_id),
      h("td", {}, n.mtls_mode || "-"),
      h("td", { class: n.envoy === "live" && n.agent === "running" ? "" : "bad" },
        n.agent === "running" ? n.envoy : "agent down"),
      h("td", { class: "id", title: t.serial || "" }, short(t.serial)),
      h("td", { class: "num" }, t.rotations === null ? "-" : t.rotations),
      h("td", { class: "num" }, rotates === null ? "-" : duration(rotates - now)),
      h("td", { class: expires !== null && expires < now ? "num bad" : "num" },
        expires === null ? "-" : duration(expires - now)),
      h("td", { class: "num" }, n.allowed_recent + " / " + n.allowed_total),
      h("td", { class: n.denied_recent ? "num bad" : "num" }, n.denied_recent + " / " + n.denied_total),
      h("td", { class: n.policy_error ? "bad" : "", title: n.policy_error || "" },
        "v" + (n.policy_version ?? "-") + (n.policy_error ? " (edit refused)" : "")),
    );
    return tr;
  });
  replace(document.querySelector("#services tbody"), rows);
}

// --- certificate timelines -------------------------------------------------------------------

function drawTimelines(state) {
  const now = seconds(state.generated_at);
  const ttl = Math.max(state.cert_ttl_seconds || 60, 10);
  const t0 = now - 1.5 * ttl, t1 = now + 1.1 * ttl, W = 1000;
  const x = (t) => Math.max(0, Math.min(W, ((t - t0) / (t1 - t0)) * W));
  const rows = state.timelines.map((t) => {
    const svg = s("svg", { viewBox: "0 0 " + W + " 34", preserveAspectRatio: "none" });
    const certs = t.certs.length ? t.certs : (t.serial ? [{ serial: t.serial, issued: t.issued,
      not_after: t.not_after, revoked_at: null, current: true }] : []);
    certs.forEach((c, i) => {
      const a = seconds(c.issued), b = seconds(c.not_after);
      if (a === null || b === null || b < t0) return;
      // A certificate overlaps the one before it (renewed at half-life): two lanes.
      const lane = (certs.length - 1 - i) % 2;
      const cls = "cert" + (c.current ? " current" : "") + (c.revoked_at ? " revoked" : "");
      const r = s("rect", { x: x(a), y: 3 + lane * 12, width: Math.max(2, x(b) - x(a)),
        height: 10, rx: 2, class: cls, "data-serial": c.serial });
      r.appendChild(s("title", {}, "serial " + c.serial + "\nsigned " + c.issued +
        "\nNotAfter " + c.not_after + (c.revoked_at ? "\nrevoked " + c.revoked_at : "")));
      svg.appendChild(r);
    });
    const rot = seconds(t.next_rotation);
    if (rot !== null) {
      svg.appendChild(s("line", { x1: x(rot), x2: x(rot), y1: 2, y2: 26, class: "rotation" }));
    }
    svg.appendChild(s("line", { x1: x(now), x2: x(now), y1: 0, y2: 28, class: "now" }));
    svg.appendChild(s("text", { x: 2, y: 33, class: "tick" }, "-" + duration(now - t0)));
    svg.appendChild(s("text", { x: W - 2, y: 33, class: "tick", "text-anchor": "end" },
      "+" + duration(t1 - now)));
    const label = h("div", { class: "label" });
    label.append(h("b", {}, t.service),
      h("span", {}, "signed " + clock(t.issued) + " · rotates in " +
        duration(rot === null ? null : rot - now) + " · expires in " +
        duration(seconds(t.not_after) === null ? null : seconds(t.not_after) - now)));
    const row = h("div", { class: "timeline", "data-timeline": t.service,
      "data-serial": t.serial, "data-issued": t.issued, "data-rotations": t.rotations });
    row.append(label, svg);
    return row;
  });
  replace(document.getElementById("timelines"), rows);
}

// --- events ----------------------------------------------------------------------------------

function drawEvents(state) {
  const items = state.events.slice(-50).reverse().map((e) => {
    const li = h("li", { class: "ev ev-" + e.kind, "data-kind": e.kind, "data-seq": e.seq });
    li.append(h("time", { datetime: e.at }, clock(e.at)), h("span", { class: "kind" }, e.kind),
      h("span", {}, e.text));
    return li;
  });
  replace(document.getElementById("events"), items);
}

// --- the loop --------------------------------------------------------------------------------

function render(state) {
  document.getElementById("trust-domain").textContent =
    state.trust_domain + (state.host ? " · host " + state.host : "") + " · " + state.mesh_file;
  const pill = document.getElementById("mesh-state");
  pill.textContent = state.state;
  pill.className = "pill " + state.state;
  document.getElementById("window").textContent =
    "(counts: last " + state.window_seconds + " s)";
  drawGraph(state);
  drawCa(state);
  drawServices(state);
  drawTimelines(state);
  drawEvents(state);
  document.body.dataset.generatedAt = state.generated_at;
  if (firstRender) {
    firstRender = false;
    performance.mark("meshtrust-first-render");
    document.body.dataset.rendered = "true";
  }
}

async function tick() {
  const conn = document.getElementById("connection");
  try {
    const resp = await fetch("/api/state", { cache: "no-store" });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    const state = await resp.json();
    if (state.observed) render(state);
    conn.textContent = state.observed ? "live" : "waiting for the first look at the mesh…";
  } catch (err) {
    // The mesh's `up` stopped (or is restarting): say so, and keep trying.
    conn.textContent = "disconnected (" + err.message + "), retrying…";
  } finally {
    setTimeout(tick, POLL_MS);
  }
}

tick();

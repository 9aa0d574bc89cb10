// The operator page: polls /ui/state every 2 s and redraws. Every value from the
// server goes in through textContent (names and reasons come from Cloud Map).
"use strict";

const POLL_MS = 2000;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "text") node.textContent = String(v);
    else node.setAttribute(k, String(v));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// White (0 %) to deep blue (100 %): the heat map's colour for a share.
function heat(percent) {
  const p = Math.max(0, Math.min(100, percent)) / 100;
  const light = 97 - p * 55;
  return `hsl(212, 80%, ${light}%)`;
}

function zoneTable(service) {
  const head = el("tr", {}, el("th", { scope: "col", text: "zone" }), el("th", { scope: "col", text: "endpoints" }),
    el("th", { scope: "col", text: "healthy" }), el("th", { scope: "col", text: "capacity" }),
    el("th", { scope: "col", text: "clients (plans)" }), el("th", { scope: "col", text: "clients (live)" }));
  const rows = service.zones.map((z) => el("tr", {}, el("td", { text: z.zone || "(none)" }), el("td", { text: z.endpoints }),
    el("td", { text: z.healthy }), el("td", { text: z.capacity }), el("td", { text: z.clients }), el("td", { text: z.live_clients })));
  return el("table", { "aria-label": `zones of ${service.name}` }, el("thead", {}, head), el("tbody", {}, ...rows));
}

function matrixTable(service) {
  const zones = service.server_zones;
  const head = el("tr", {}, el("th", { scope: "col", text: "client zone → server zone" }),
    ...zones.map((z) => el("th", { scope: "col", text: z })), el("th", { scope: "col", text: "clients" }));
  const rows = service.matrix.map((r) => {
    const cells = zones.map((z) => {
      const p = r.percent[z] || 0;
      const cell = el("td", { class: r.zone === z ? "heat local" : "heat", text: `${p.toFixed(1)} %` });
      cell.style.background = heat(p);
      if (p > 60) cell.style.color = "#ffffff";
      return cell;
    });
    return el("tr", {}, el("th", { scope: "row", text: r.zone === null ? "(no zone)" : r.zone }), ...cells,
      el("td", { text: r.zone === null ? "–" : r.clients }));
  });
  return el("table", { class: "matrix", "aria-label": `traffic matrix of ${service.name}` },
    el("thead", {}, head), el("tbody", {}, ...rows));
}

function serviceCard(service) {
  const cross = service.cross_zone_percent === null ? "no zoned clients" : `${service.cross_zone_percent.toFixed(1)} % cross-zone`;
  const age = service.sync_age_seconds === null ? "never synced" : `synced ${service.sync_age_seconds.toFixed(0)} s ago`;
  const card = el("article", { class: "service", tabindex: "0", "aria-labelledby": `svc-${service.name}` },
    el("h3", { id: `svc-${service.name}`, text: service.name }),
    el("p", { class: "meta" }, el("span", { class: "cross", text: cross }), ` · policy ${service.policy.policy} · ${age}`,
      service.fail_open ? " · FAIL-OPEN (no healthy instance)" : null),
    el("div", { class: "grid" }, el("div", {}, zoneTable(service)), el("div", {}, matrixTable(service))));
  if (service.routing_error) card.append(el("p", { class: "errors", text: `routing attributes refused: ${service.routing_error}` }));
  if (service.skipped.length > 0) {
    card.append(el("h4", { text: `skipped instances (${service.skipped.length})` }),
      el("ul", { class: "skipped" }, ...service.skipped.map((s) => el("li", { text: `${s.instance_id}: ${s.reason}` }))));
  }
  return card;
}

function clientsTable(clients) {
  if (clients.length === 0) return el("p", { text: "no client connected" });
  const head = el("tr", {}, ...["node", "kind", "zone", "protocol", "state", "detail"].map((h) => el("th", { scope: "col", text: h })));
  const rows = clients.map((c) => el("tr", {}, el("td", { text: c.node_id || "(not identified yet)" }), el("td", { text: c.kind || "" }),
    el("td", { text: c.zone || "(none)" }), el("td", { text: c.protocol }), el("td", { class: `state-${c.state}`, text: c.state }),
    el("td", { text: c.nacks.map((n) => `${n.type_url.split(".").pop()}: ${n.message}`).join("; ") })));
  return el("table", { "aria-label": "connected clients" }, el("thead", {}, head), el("tbody", {}, ...rows));
}

function render(state) {
  const status = document.getElementById("status");
  status.className = state.ready ? "" : "bad";
  status.textContent = `${state.ready ? "ready" : "not ready"} · generation ${state.generation} · ${state.services.length} services · ${state.clients.length} clients · ${new Date().toLocaleTimeString()}`;
  document.getElementById("namespaces").replaceChildren(...Object.entries(state.namespaces).map(([name, ns]) =>
    el("li", { class: ns.state, text: ns.error ? `${name}: ${ns.state} (${ns.error})` : `${name}: ${ns.state}` })));
  const list = document.getElementById("service-list");
  list.replaceChildren(...(state.services.length ? state.services.map(serviceCard) : [el("p", { text: "no service served yet" })]));
  document.getElementById("clients").replaceChildren(clientsTable(state.clients));
}

async function poll() {
  try {
    const response = await fetch("/ui/state", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
  } catch (e) {
    const status = document.getElementById("status");
    status.className = "bad";
    status.textContent = `cannot reach the control plane (${e.message}); retrying`;
  }
  setTimeout(poll, POLL_MS);
}

poll();

// HomeNet dashboard: polls /api/state (same origin, same credentials) and renders it.
// Text goes in with textContent only: listenIds, names and addresses come from the network.
"use strict";

const REFRESH_MS = 2000;

function bytes(n) {
  n = Number(n || 0);
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function age(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  if (s < 86400) return Math.floor(s / 3600) + " h";
  return Math.floor(s / 86400) + " d";
}

function count(n, one, many) {
  return n + " " + (Number(n) === 1 ? one : many);
}

// A state word as a class name: letters only, whatever the node sent.
function stateClass(state) {
  return "pill state-" + String(state).toLowerCase().replace(/[^a-z]/g, "");
}

function facts(id, pairs) {
  const dl = document.getElementById(id);
  dl.replaceChildren();
  for (const [k, v] of pairs) {
    const div = document.createElement("div");
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = String(v);
    dd.dataset.key = k;
    div.append(dt, dd);
    dl.append(div);
  }
}

// cells(item) gives [value, td class, pill class] per column; a pill wraps the value in a badge.
function rows(id, items, cells, emptyText) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  if (items.length === 0) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    const td = document.createElement("td");
    td.colSpan = document.querySelectorAll("#" + id + " th").length;
    td.textContent = emptyText;
    tr.append(td);
    body.append(tr);
    return;
  }
  for (const item of items) {
    const tr = document.createElement("tr");
    for (const [value, cls, pill] of cells(item)) {
      const td = document.createElement("td");
      if (pill) {
        const span = document.createElement("span");
        span.className = pill;
        span.textContent = String(value);
        td.append(span);
      } else {
        td.textContent = String(value);
      }
      if (cls) td.className = cls;
      tr.append(td);
    }
    body.append(tr);
  }
}

function render(state) {
  const st = state.status;
  const now = Date.now() / 1000;
  document.getElementById("node-name").textContent = st.name;
  document.title = "HomeNet " + st.name;
  document.getElementById("summary").textContent = [
    count(st.active_sessions, "session open", "sessions open"),
    count(st.listeners, "listener", "listeners"),
    st.state,
  ].join(" · ");
  facts("node", [
    ["address", st.address], ["version", st.version], ["state", st.state],
    ["uptime", age(st.uptime_seconds)],
    ["fleet peers up", st.fleet_peers_up + " / " + st.fleet_peers],
  ]);
  facts("traffic", [
    ["sessions open", st.active_sessions], ["sessions total", st.total_sessions],
    ["refused", st.refused_sessions], ["bytes up", bytes(st.bytes_up)], ["bytes down", bytes(st.bytes_down)],
  ]);
  rows("listeners", state.listeners, (l) => [
    [l.listen_id, "mono"], [l.state, "", stateClass(l.state)], [l.peer, "mono"],
    [l.active_sessions, "num"], [l.total_sessions, "num"], [bytes(l.bytes_up), "num"], [bytes(l.bytes_down), "num"],
  ], "no listener registered here");
  rows("sessions", state.sessions, (s) => [
    [s.id, "num"], [s.client, "mono"], [s.target, "mono"], [age(now - s.since), "num"],
    [bytes(s.bytes_up), "num"], [bytes(s.bytes_down), "num"],
  ], "no session open");
  rows("peers", state.fleet.peers, (p) => [
    [p.target, "mono"], [p.name], [p.state, "", stateClass(p.state)], [p.listeners, "num"], [p.forwarded, "num"],
    [p.last_seen_seconds ? p.last_seen_seconds.toFixed(1) + " s ago" : "-", "num"],
  ], "not in a fleet");
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const resp = await fetch("/api/state", { cache: "no-store", credentials: "same-origin" });
    if (!resp.ok) throw new Error("the node answered " + resp.status);
    render(await resp.json());
    error.hidden = true;
    error.textContent = "";
    document.body.className = "fresh";
    document.body.dataset.updated = String(Date.now());
    document.getElementById("updated").textContent = "live · updated " + new Date().toLocaleTimeString();
  } catch (err) {
    // keep the last figures on screen, marked stale, and say why
    error.textContent = "cannot refresh: " + err.message;
    error.hidden = false;
    document.body.className = "stale";
  }
}

refresh();
setInterval(refresh, REFRESH_MS);

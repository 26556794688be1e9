// The fleet dashboard: fetches /admin/dashboard/data for the chosen range and draws each
// plot from the traces the server shaped (plotly.js, served by the control plane itself).
"use strict";

const STATE_COLORS = { healthy: "#2ca02c", unknown: "#7f7f7f", unhealthy: "#ff7f0e", offline: "#d62728", removed: "#393b79" };
const PLOTS = {
  timeline: { title: "Node states", barmode: "overlay", yaxis: { type: "category", automargin: true } },
  requests: { title: "Requests per minute, by API and status", barmode: "stack" },
  errors: { title: "Errors by kind (per bucket)", barmode: "stack" },
  ttft_worker: { title: "Time to first token per node, ms (p50 solid, p95 dotted)" },
  ttft_api: { title: "Time to first token per API, ms (p50 solid, p95 dotted)" },
  tokens_worker: { title: "Decode tokens/s per request, per node (p50, p95)" },
  tokens_api: { title: "Decode tokens/s per request, per API (p50, p95)" },
  load: { title: "In flight (streams from this fleet's control planes) and queued on the node" },
  model_loads: { title: "Model loads: cold-start time, ms" },
  cache: { title: "Prefix cache: % of requests that hit, % of prompt tokens cached" },
  routing: { title: "Routing decisions by reason", barmode: "stack" },
};

const state = { range: "1h", since: null, until: null, timer: null, loads: 0, inflight: false, lastError: null };
window.dashboard = state; // for people (and tests) looking from the console

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "style") node.setAttribute("style", v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return node;
}

function query() {
  const p = new URLSearchParams();
  if (state.range === "custom" && state.since && state.until) {
    p.set("since", state.since);
    p.set("until", state.until);
  } else {
    p.set("range", state.range === "custom" ? "1h" : state.range);
  }
  return p.toString();
}

function layoutFor(id, data) {
  const spec = PLOTS[id];
  const layout = {
    title: { text: spec.title, font: { size: 13 }, x: 0.01, xanchor: "left" },
    margin: { l: 56, r: 12, t: 32, b: 36 },
    xaxis: { type: "date", range: [data.range.plot_since, data.range.plot_until] },
    yaxis: Object.assign({ rangemode: "tozero", automargin: true }, spec.yaxis || {}),
    legend: { orientation: "h", y: id === "timeline" ? -0.3 : -0.18, font: { size: 11 } },
    barmode: spec.barmode,
    hovermode: id === "timeline" ? "closest" : "x unified",
    uirevision: id, // keep the user's zoom across refreshes
    annotations: [],
  };
  if (!(data.plots[id] || []).length) {
    layout.annotations.push({ text: "nothing recorded in this range", showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5, font: { color: "#6b7385" } });
  }
  return layout;
}

function drawPlots(data) {
  for (const id of Object.keys(PLOTS)) {
    const div = $("plot-" + id);
    if (!div) continue;
    const traces = data.plots[id] || [];
    Plotly.react(div, traces, layoutFor(id, data), { displaylogo: false, responsive: true });
    div.dataset.traces = String(traces.length);
  }
}

function card(label, value, cls) {
  return el("div", { class: "card" + (cls ? " " + cls : "") }, el("div", { class: "value" }, value), el("div", { class: "label" }, label));
}

function drawLive(data) {
  const live = data.live;
  const byState = {};
  for (const w of live.workers) byState[w.state] = (byState[w.state] || 0) + 1;
  const cards = $("cards");
  cards.replaceChildren(
    card("workers healthy", `${byState.healthy || 0} / ${live.workers.length}`),
    card("streams in flight", live.inflight),
    card("waiting for room", live.waiting),
    card("refused (429) since start", live.rejected),
    card("requests in range", sumTraces(data.plots.requests) ),
  );
  const rows = live.workers.map((w) =>
    el("tr", {},
      el("td", {}, w.id), el("td", {}, w.name),
      el("td", {}, el("span", { class: "state", style: `background:${STATE_COLORS[w.state] || "#17becf"}` }, w.state)),
      el("td", { class: "num" }, w.inflight), el("td", { class: "num" }, w.active ?? ""), el("td", { class: "num" }, w.queue_length ?? ""),
      el("td", {}, w.models.join(", ")), el("td", {}, w.last_error || "")));
  $("table-workers").replaceChildren(
    el("tr", {}, ...["id", "node", "state", "in flight", "active", "queued", "models ready", "last error"].map((h) => el("th", {}, h))), ...rows);
}

function sumTraces(traces) {
  // requests per minute back to a count: the server scaled bucket counts by 60 / bucket_s
  const perBucket = 60 / (window.lastData ? window.lastData.range.bucket_s : 60);
  let n = 0;
  for (const t of traces || []) for (const y of t.y) n += (y || 0) / perBucket;
  return Math.round(n);
}

function drawTables(data) {
  const errs = data.tables.errors;
  $("table-errors").replaceChildren(
    el("tr", {}, ...["kind", "API", "count", "message"].map((h) => el("th", {}, h))),
    ...(errs.length ? errs.map((e) => el("tr", {}, el("td", {}, e.kind), el("td", {}, e.api), el("td", { class: "num" }, e.count), el("td", {}, e.error)))
      : [el("tr", {}, el("td", { colspan: "4", class: "muted" }, "no errors in this range"))]));
  const ev = data.tables.model_events;
  $("table-model_events").replaceChildren(
    el("tr", {}, ...["at (UTC)", "model", "node", "event", "ms", "reason"].map((h) => el("th", {}, h))),
    ...(ev.length ? ev.map((e) => el("tr", {}, el("td", {}, e.at), el("td", {}, e.model), el("td", {}, e.worker), el("td", {}, e.event),
      el("td", { class: "num" }, e.duration_ms ?? ""), el("td", {}, e.reason || "")))
      : [el("tr", {}, el("td", { colspan: "6", class: "muted" }, "no model loads or unloads in this range"))]));
}

async function load() {
  if (state.inflight) return;
  state.inflight = true;
  const status = $("status");
  try {
    const r = await fetch("dashboard/data?" + query(), { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (r.status === 401) { window.location.reload(); return; } // the session ended: the sign-in form
    const body = await r.json();
    if (!r.ok) throw new Error(body.detail || r.statusText);
    window.lastData = body;
    drawLive(body);
    drawPlots(body);
    drawTables(body);
    state.loads += 1;
    state.lastError = null;
    document.body.dataset.loads = String(state.loads);
    status.className = "";
    status.textContent = `updated ${new Date().toLocaleTimeString()} (${body.query_ms} ms in the database${body.truncated.length ? "; cut: " + body.truncated.join(", ") : ""})`;
    $("range-label").textContent = `${body.range.since} → ${body.range.until}, ${body.range.bucket_s} s a point`;
  } catch (e) {
    state.lastError = String(e.message || e);
    status.className = "error";
    status.textContent = "could not load: " + state.lastError;
  } finally {
    state.inflight = false;
  }
}

function schedule() {
  if (state.timer) clearInterval(state.timer);
  const s = Number($("interval").value);
  state.timer = s > 0 ? setInterval(load, s * 1000) : null;
}

function localInput(date) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}T${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

function init() {
  if (document.body.dataset.signedIn !== "true") $("logout").hidden = true;
  for (const b of $("presets").querySelectorAll("button")) {
    b.addEventListener("click", () => {
      for (const o of $("presets").querySelectorAll("button")) o.classList.toggle("active", o === b);
      state.range = b.dataset.range;
      $("custom").hidden = state.range !== "custom";
      if (state.range === "custom") {
        if (!$("since").value) {
          const now = new Date();
          $("until").value = localInput(now);
          $("since").value = localInput(new Date(now.getTime() - 3600 * 1000));
        }
        return; // drawn on "apply"
      }
      load();
    });
  }
  $("apply").addEventListener("click", () => {
    state.since = new Date($("since").value).toISOString();
    state.until = new Date($("until").value).toISOString();
    load();
  });
  $("interval").addEventListener("change", schedule);
  $("refresh").addEventListener("click", load);
  load();
  schedule();
}

document.addEventListener("DOMContentLoaded", init);

// lossguard dashboard: the runs list and a run's page, served by lossguardd
// from /api (a JSON view of the gRPC API, proto field names; int64 values
// arrive as strings). Hash routes: #/ (runs), #/run/<id>. Both pages poll
// every POLL_MS while open.
"use strict";

const POLL_MS = 2000;
const KIND_COLOUR = {
  DIVERGENCE: "#d62728", OSCILLATION: "#ff7f0e", STAGNATION: "#9467bd",
  OVERFITTING: "#8c564b", GRADIENT_EXPLOSION: "#e377c2", LOSS_SPIKE: "#7f7f7f",
};
const STATES = ["HEALTHY", "AT_RISK", "UNHEALTHY", "FINISHED", "DETACHED"];

let timer = null;
let plot = null;       // the uPlot of the run page
let plotRun = null;    // its run id
let logScale = true;   // loss axis in log scale

const lower = (s) => String(s || "").toLowerCase();
const num = (v) => (v === undefined || v === null ? NaN : Number(v));
const fmt = (v) => (Number.isFinite(v) ? Number(v).toPrecision(4).replace(/\.?0+(e|$)/, "$1") : "-");
// A finite number or null (a gap in the plot).
const finite = (v) => { const x = num(v); return Number.isFinite(x) ? x : null; };

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "onclick") e.addEventListener("click", v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function badge(state) {
  return el("span", { class: "badge " + lower(state) }, lower(state).replace("_", " "));
}

// A lossguardd with --auth_config wants a token: open the dashboard as
// /#token=TOKEN once; the token is kept for this browser tab only
// (sessionStorage) and sent as "Authorization: Bearer", never in a URL that
// reaches the server.
const TOKEN_KEY = "lossguard-token";
function takeTokenFromHash() {
  const m = location.hash.match(/^#token=([^&]+)/);
  if (!m) return;
  sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
  history.replaceState(null, "", location.pathname + location.search + "#/");
}

async function api(path) {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = "Bearer " + token;
  const r = await fetch(path, { cache: "no-store", headers });
  const body = await r.json().catch(() => ({}));
  if (r.status === 401) {
    throw new Error((body.error || "a token is needed") + ": open this page as /#token=YOUR_TOKEN");
  }
  if (!r.ok) throw new Error(body.error || r.status + " " + r.statusText);
  return body;
}

function setStatus(text, isError) {
  const s = document.getElementById("server-status");
  s.textContent = text;
  s.className = isError ? "error" : "muted";
}

// ------------------------------------------------------------------ runs list

const filters = { project: "", state: "" };

function renderRunsPage(view) {
  const project = el("input", { type: "search", placeholder: "project", value: filters.project });
  project.addEventListener("input", () => { filters.project = project.value; refreshRuns(); });
  const state = el("select", { id: "state-filter" }, el("option", { value: "" }, "all states"),
    ...STATES.map((s) => el("option", { value: s }, lower(s).replace("_", " "))));
  state.value = filters.state;
  state.addEventListener("change", () => { filters.state = state.value; refreshRuns(); });
  view.replaceChildren(
    el("h2", {}, "Runs"),
    el("div", { class: "filters" }, project, state, el("span", { id: "run-count", class: "muted" })),
    el("table", { id: "runs" },
      el("thead", {}, el("tr", {}, ...["run", "project", "state", "step", "loss", "val loss", "LR", "active diagnoses", "updated"].map((h) => el("th", {}, h)))),
      el("tbody")));
}

async function refreshRuns() {
  const q = new URLSearchParams();
  if (filters.project) q.set("project", filters.project);
  if (filters.state) q.set("state", filters.state);
  let data;
  try {
    data = await api("/api/runs?" + q);
    setStatus("live, every " + POLL_MS / 1000 + " s");
  } catch (e) {
    setStatus("cannot reach lossguardd: " + e.message, true);
    return;
  }
  const body = document.querySelector("#runs tbody");
  if (!body) return;
  const runs = data.runs || [];
  body.replaceChildren(...runs.map((r) => {
    const tr = el("tr", { class: "run", "data-run": r.run_id },
      el("td", {}, el("a", { href: "#/run/" + encodeURIComponent(r.run_id) }, r.run_id)),
      el("td", {}, r.project || "-"),
      el("td", {}, badge(r.state)),
      el("td", { class: "num" }, r.has_steps ? r.last_step : "-"),
      el("td", { class: "num" }, r.has_steps ? fmt(num(r.last_loss)) : "-"),
      el("td", { class: "num" }, fmt(num(r.last_val_loss))),
      el("td", { class: "num" }, r.has_steps ? fmt(num(r.last_lr)) : "-"),
      el("td", {}, (r.active || []).map(lower).join(", ") || "-"),
      el("td", { class: "muted" }, r.updated_time ? new Date(r.updated_time * 1000).toLocaleTimeString() : "-"));
    tr.addEventListener("click", (ev) => {
      if (ev.target.tagName !== "A") location.hash = "#/run/" + encodeURIComponent(r.run_id);
    });
    return tr;
  }));
  document.getElementById("run-count").textContent = runs.length + (runs.length === 1 ? " run" : " runs");
}

// ------------------------------------------------------------------- run page

function renderRunPage(view, runId) {
  const logBox = el("input", { type: "checkbox", id: "log-scale" });
  logBox.checked = logScale;
  logBox.addEventListener("change", () => { logScale = logBox.checked; destroyPlot(); refreshRun(runId); });
  view.replaceChildren(
    el("h2", {}, el("a", { href: "#/" }, "runs"), " / ", runId, " ", el("span", { id: "run-state" })),
    el("div", { id: "run-summary", class: "muted" }),
    el("div", { class: "controls" },
      el("label", {}, logBox, " log-scale loss"),
      el("span", { class: "muted" }, "drag to zoom, double-click to reset; dashed lines: diagnosis onsets, solid: applied actions")),
    el("div", { id: "plot" }),
    el("ul", { id: "markers" }),
    el("h3", {}, "Active diagnoses"), el("div", { id: "active" }),
    el("h3", {}, "Advice"),
    el("table", { id: "advice" },
      el("thead", {}, el("tr", {}, ...["#", "step", "diagnosis", "action", "status", "outcome", "explanation"].map((h) => el("th", {}, h)))),
      el("tbody")));
}

function actionText(a) {
  if (!a) return "no action";
  let s = "no action";
  if (a.scale_lr) s = "LR x" + fmt(num(a.scale_lr.factor));
  else if (a.set_lr) s = "LR = " + fmt(num(a.set_lr.lr));
  else if (a.restart_cosine) {
    const r = a.restart_cosine;
    s = `cosine ${fmt(num(r.eta_max))} → ${fmt(num(r.eta_min))} over ${r.t_0} steps`;
  }
  else if (a.enable_grad_clip) s = "clip at " + fmt(num(a.enable_grad_clip.max_norm));
  else if (a.early_stop) s = "early stop";
  else if (a.ramp_lr) {
    const r = a.ramp_lr;
    s = `LR ramp x${fmt(num(r.factor_per_step))}/step for ${r.steps} steps`;
    if (num(r.decay_steps) > 0) s += `, then cosine to ${fmt(num(r.decay_eta_min))} over ${r.decay_steps} steps`;
  }
  if (num(a.grad_clip_max_norm) > 0 && !a.enable_grad_clip) s += " + clip";
  if (a.restore_checkpoint) s += " + restore";
  return s;
}

// Vertical markers drawn over the plot: diagnosis onsets (dashed, kind
// colour) and applied actions (solid, black), each with a label.
function markerPlugin(getMarkers) {
  return {
    hooks: {
      draw: [(u) => {
        const ctx = u.ctx;
        const { left, top, width, height } = u.bbox;
        const drawn = [];
        ctx.save();
        ctx.font = `${12 * devicePixelRatio}px sans-serif`;
        let row = 0;
        for (const m of getMarkers()) {
          const x = u.valToPos(m.step, "x", true);
          if (!(x >= left && x <= left + width)) continue;
          ctx.strokeStyle = m.colour;
          ctx.fillStyle = m.colour;
          ctx.lineWidth = (m.type === "action" ? 2 : 1.5) * devicePixelRatio;
          ctx.setLineDash(m.type === "action" ? [] : [5 * devicePixelRatio, 4 * devicePixelRatio]);
          ctx.beginPath();
          ctx.moveTo(x, top);
          ctx.lineTo(x, top + height);
          ctx.stroke();
          ctx.fillText(m.label, x + 3 * devicePixelRatio, top + (14 + 14 * (row++ % 4)) * devicePixelRatio);
          drawn.push(m);
        }
        ctx.restore();
        window.lossguardDrawnMarkers = drawn;
      }],
    },
  };
}

let markers = [];

function destroyPlot() {
  if (plot) plot.destroy();
  plot = null;
  plotRun = null;
}

function plotData(curve) {
  const pts = curve.points || [];
  const x = new Float64Array(pts.length);
  const loss = new Array(pts.length), val = new Array(pts.length), lr = new Array(pts.length);
  pts.forEach((p, i) => {
    x[i] = num(p.step);
    const l = finite(p.loss);
    loss[i] = logScale && l !== null && l <= 0 ? null : l;
    const v = finite(p.val_loss);
    val[i] = logScale && v !== null && v <= 0 ? null : v;
    const r = finite(p.lr);
    lr[i] = r !== null && r > 0 ? r : null;
  });
  return [x, loss, val, lr];
}

// Axis tick labels short enough for the axis: 1e+8, 0.003, 2.5.
function ticks(u, splits) {
  return splits.map((v) => {
    if (v === null || v === undefined) return "";
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e4 || a < 1e-3)) return v.toExponential(0);
    return String(Number(v.toPrecision(3)));
  });
}

function makePlot(data) {
  const container = document.getElementById("plot");
  const width = Math.max(400, container.clientWidth || 900);
  const opts = {
    width, height: 420,
    scales: { x: { time: false }, y: { distr: logScale ? 3 : 1 }, lr: { distr: 3 } },
    series: [
      { label: "step" },
      { label: "loss", stroke: "#1f77b4", width: 1, scale: "y", spanGaps: false },
      { label: "val loss", stroke: "#17becf", width: 2, scale: "y", spanGaps: true, points: { show: true, size: 5 } },
      { label: "LR", stroke: "#2ca02c", width: 1.5, dash: [6, 3], scale: "lr" },
    ],
    axes: [
      { label: "step" },
      { label: logScale ? "loss (log)" : "loss", scale: "y", size: 64, values: ticks },
      { label: "learning rate (log)", scale: "lr", side: 1, stroke: "#2ca02c", grid: { show: false },
        size: 64, values: ticks },
    ],
    plugins: [markerPlugin(() => markers)],
  };
  return new uPlot(opts, data, container);
}

async function refreshRun(runId) {
  let health, curve;
  try {
    const id = encodeURIComponent(runId);
    [health, curve] = await Promise.all([api("/api/runs/" + id), api("/api/runs/" + id + "/curve?max_points=4000")]);
    setStatus("live, every " + POLL_MS / 1000 + " s");
  } catch (e) {
    setStatus(e.message, true);
    return;
  }
  if (!document.getElementById("plot")) return;  // navigated away
  const s = health.summary || {};
  document.getElementById("run-state").replaceChildren(badge(s.state));
  document.getElementById("run-summary").textContent =
    `project ${s.project || "-"} · mode ${lower(s.mode)} · step ${s.has_steps ? s.last_step : "-"} · loss ${fmt(num(s.last_loss))}` +
    ` · val loss ${fmt(num(s.last_val_loss))} · LR ${fmt(num(s.last_lr))} · ${curve.total_points || 0} points`;

  // Markers: diagnosis onsets from the curve, actions the trainer applied.
  const applied = (health.advice || []).filter((r) => r.status === "APPLIED" && r.advice && r.advice.action);
  markers = [
    ...(curve.diagnoses || []).filter((d) => d.kind !== "LOSS_SPIKE").map((d) => ({
      type: "diagnosis", kind: d.kind, step: num(d.onset), decided: num(d.step),
      colour: KIND_COLOUR[d.kind] || "#7f7f7f", label: lower(d.kind), evidence: d.evidence,
    })),
    ...applied.map((r) => ({
      type: "action", step: num(r.advice.at_step), colour: "#000",
      label: actionText(r.advice.action), evidence: r.advice.explanation,
    })),
  ];
  document.getElementById("markers").replaceChildren(...markers.map((m) =>
    el("li", { class: `marker ${m.type} ${lower(m.kind || "")}`, "data-step": m.step, title: m.evidence || "" },
      `${m.type === "action" ? "action" : "onset"} @ ${m.step}: ${m.label}`)));

  const data = plotData(curve);
  if (!plot || plotRun !== runId) {
    destroyPlot();
    plot = makePlot(data);
    plotRun = runId;
  } else {
    plot.setData(data, false);  // keep the zoom
    plot.redraw();
  }
  const container = document.getElementById("plot");
  container.dataset.points = String(data[0].length);
  container.dataset.markers = String(markers.length);
  window.lossguardPlot = plot;

  const active = health.active_diagnoses || [];
  document.getElementById("active").replaceChildren(...(active.length ? active.map((d) =>
    el("div", { class: "diagnosis" },
      el("span", { class: "kind", style: `color:${KIND_COLOUR[d.kind] || "#333"}` }, lower(d.kind)),
      ` at step ${d.step} (onset ${d.onset}), severity ${fmt(num(d.severity))}, confidence ${fmt(num(d.confidence))}`,
      el("div", { class: "evidence" }, d.evidence))) : [el("div", { class: "muted" }, "none")]));

  document.querySelector("#advice tbody").replaceChildren(...(health.advice || []).map((r) => {
    const a = r.advice || {};
    return el("tr", {},
      el("td", {}, a.advice_id), el("td", { class: "num" }, a.at_step),
      el("td", {}, lower((a.diagnosis || {}).kind)),
      el("td", {}, a.action ? actionText(a.action) : "no action" + (a.blocked_by ? ` (${a.blocked_by})` : "")),
      el("td", {}, lower(r.status)),
      el("td", { title: r.outcome_evidence || "" }, lower(r.outcome).replace("not_judged", "-")),
      el("td", {}, a.explanation || ""));
  }));
}

// --------------------------------------------------------------------- router

function route() {
  clearInterval(timer);
  const view = document.getElementById("view");
  const m = location.hash.match(/^#\/run\/(.+)$/);
  if (m) {
    const runId = decodeURIComponent(m[1]);
    destroyPlot();  // the page is rebuilt, with a new plot container
    renderRunPage(view, runId);
    refreshRun(runId);
    timer = setInterval(() => refreshRun(runId), POLL_MS);
  } else {
    destroyPlot();
    renderRunsPage(view);
    refreshRuns();
    timer = setInterval(refreshRuns, POLL_MS);
  }
}

takeTokenFromHash();
window.addEventListener("hashchange", () => { takeTokenFromHash(); route(); });
window.addEventListener("resize", () => {
  const c = document.getElementById("plot");
  if (plot && c) plot.setSize({ width: Math.max(400, c.clientWidth), height: 420 });
});
route();

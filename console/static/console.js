"use strict";
// The console's five pages in one script: the path names the page. Every value that comes from the
// server is put into the page as text (textContent, SVG text nodes), never as markup: an event id is user input.

const SVG = "http://www.w3.org/2000/svg";
const view = document.getElementById("view");
const problems = {};

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "text") node.textContent = value;
    else if (key === "on") for (const [event, handler] of Object.entries(value)) node.addEventListener(event, handler);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(value, digits = 0) {
  return value === null || value === undefined ? "-" : Number(value).toLocaleString("en", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function when(ms) {
  return ms ? new Date(ms).toLocaleTimeString("en-GB") : "-";
}

// Which sources could not be reached, by page part; shown in the red band at the top.
function report(part, sources) {
  problems[part] = Object.values(sources || {}).filter(Boolean);
  const band = document.getElementById("problems");
  band.replaceChildren(...Object.values(problems).flat().map((text) => el("div", { text: "Unreachable: " + text })));
}

async function getJSON(url, part) {
  try {
    const answer = await fetch(url);
    return await answer.json();
  } catch (error) {
    report(part, { console: "the console (" + error + ")" });
    return null;
  }
}

// ---------------------------------------------------------------------------------------------- Pipeline
const NODES = {
  producer: [80, 150, "producer"], events: [290, 150, "events"], predict: [480, 60, "predict"], train: [480, 240, "train"],
  predictions: [680, 60, "predictions"], ps: [680, 240, "parameter server"], registry: [860, 240, "registry"],
  serving: [860, 60, "serving"], dlq: [290, 300, "events.dlq"],
};
const ARROWS = [
  ["producer", "events", "events_per_s", "/s"], ["events", "predict", "predictions_per_s", "/s"], ["events", "train", "trained_per_s", "/s"],
  ["predict", "predictions", "predictions_per_s", "/s"], ["train", "ps", "trained_per_s", "/s"], ["ps", "registry", "candidate", ""],
  ["registry", "serving", "champion", ""], ["events", "dlq", "dead_letters_per_s", "/s"],
];

function diagram() {
  const box = svg("svg", { viewBox: "0 0 940 340", role: "img", "aria-label": "pipeline diagram" });
  const defs = svg("defs");
  const head = svg("marker", { id: "head", viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto" });
  head.append(svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "#475569" }));
  defs.append(head);
  box.append(defs);
  for (const [from, to, key, unit] of ARROWS) {
    const [x1, y1] = NODES[from], [x2, y2] = NODES[to];
    const dx = x2 - x1, dy = y2 - y1, len = Math.hypot(dx, dy), trimX = (dx / len) * 70, trimY = (dy / len) * 22;
    box.append(svg("line", { class: "arrow", x1: x1 + trimX, y1: y1 + trimY, x2: x2 - trimX, y2: y2 - trimY }));
    box.append(svg("text", { class: "rate", id: `arrow-${from}-${to}`, "data-key": key, "data-unit": unit, x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 6 }, "-"));
  }
  for (const [name, [x, y, label]] of Object.entries(NODES)) {
    const kind = ["events", "predictions"].includes(name) ? "node topic" : name === "dlq" ? "node dlq" : "node";
    const group = svg("g", { class: kind });
    group.append(svg("rect", { x: x - 70, y: y - 22, width: 140, height: 44, rx: 6 }));
    group.append(svg("text", { x, y: y + 5 }, label));
    group.append(svg("text", { class: "sub", id: `sub-${name}`, x, y: y + 38 }, ""));
    box.append(group);
  }
  return box;
}

function lagText(lag) {
  return lag ? `lag ${fmt(lag.records)} (${fmt(lag.seconds, 1)} s)` : "lag -";
}

const FIGURES = [
  ["events", "events in"], ["events_per_s", "events/s"], ["predictions", "predictions out"], ["predictions_per_s", "predictions/s"],
  ["dead_letters", "dead letters"], ["trained_events", "trained events"], ["window_accuracy", "prequential accuracy"],
  ["drifts", "drift flags"], ["champion", "champion"], ["candidate", "candidate"], ["served", "served version"],
  ["serve_requests_per_s", "serving requests/s"],
];

function showPipeline(sample) {
  report("pipeline", sample.sources);
  for (const node of document.querySelectorAll("text.rate")) {
    const value = sample[node.dataset.key];
    node.textContent = node.dataset.unit ? `${fmt(value, 1)}${node.dataset.unit}` : value === null || value === undefined ? "-" : node.dataset.key === "champion" ? `champion v${value}` : `v${value}`;
  }
  const lag = sample.lag || {};
  document.getElementById("sub-predict").textContent = lagText(lag.predict);
  document.getElementById("sub-train").textContent = lagText(lag.train);
  document.getElementById("sub-dlq").textContent = `${fmt(sample.dead_letters)} dead letters`;
  document.getElementById("sub-serving").textContent = `serves v${fmt(sample.served)}`;
  document.getElementById("sub-registry").textContent = `candidate v${fmt(sample.candidate)}`;
  for (const [key] of FIGURES) {
    const node = document.getElementById(`figure-${key}`);
    const value = sample[key];
    node.textContent = key === "window_accuracy" ? fmt(value, 3) : key.endsWith("_per_s") ? fmt(value, 1) : fmt(value);
  }
  document.getElementById("figure-lag").textContent = `predict ${lagText(lag.predict)}; train ${lagText(lag.train)}`;
  document.getElementById("sampled").textContent = `sampled ${when(sample.at * 1000)}`;
}

function Pipeline() {
  const figures = FIGURES.map(([key, label]) => el("div", { class: "figure" }, el("div", { class: "label", text: label }), el("div", { class: "value", id: `figure-${key}`, text: "-" })));
  figures.push(el("div", { class: "figure" }, el("div", { class: "label", text: "consumer lag" }), el("div", { class: "value", id: "figure-lag", text: "-" })));
  view.append(
    el("h1", { text: "Pipeline" }),
    el("div", { class: "card" }, diagram(), el("p", { class: "note", id: "sampled", text: "waiting for the first sample" })),
    el("div", { class: "figures" }, ...figures),
  );
  const source = new EventSource("/api/stream");
  source.onmessage = (message) => showPipeline(JSON.parse(message.data));
  source.onerror = () => report("pipeline", { console: "the console's live stream (retrying)" });
  source.onopen = () => report("pipeline", {});
}

// ---------------------------------------------------------------------------------------------- Learning
const RANGES = [["15 min", 15], ["1 hour", 60], ["6 hours", 360], ["all", 0]];
let learningMinutes = 60;

function markersOf(data) {
  const marks = [];
  for (const b of data.batches) {
    if (b.drift) marks.push({ at: b.at, kind: "drift", text: "drift flagged" });
    for (const v of b.published) marks.push({ at: b.at, kind: "published", text: `published v${v}` });
    if (b.gate) {
      const g = b.gate;
      const verdict = g.promoted ? "promoted" : g.passed ? "passed, waits for a manual promotion" : "refused: trails the champion by more than the margin";
      marks.push({ at: b.at, kind: g.promoted ? "promoted" : "refused", text: `gate: candidate v${g.candidate} ${fmt(g.candidate_accuracy, 3)} vs champion v${fmt(g.champion)} ${fmt(g.champion_accuracy, 3)} on ${fmt(g.events)} events: ${verdict}` });
    }
  }
  for (const m of data.moves) marks.push({ at: m.at, kind: "move", text: m.deleted ? `${m.alias} deleted (was v${m.version})` : `${m.alias} → v${m.version}` });
  return marks.sort((a, b) => a.at - b.at);
}

function chart(title, batches, series, marks, from, to, bounds) {
  const W = 900, H = 220, L = 50, R = 10, T = 10, B = 30;
  const box = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  const values = batches.flatMap((b) => series.map(([key]) => b[key])).filter((v) => v !== null && v !== undefined);
  const [lo, hi] = bounds || [Math.min(0, ...values), Math.max(1e-9, ...values)];
  const x = (t) => L + ((t - from) / Math.max(1, to - from)) * (W - L - R);
  const y = (v) => T + (1 - (v - lo) / (hi - lo || 1)) * (H - T - B);
  box.append(svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }), svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  for (const v of [lo, (lo + hi) / 2, hi]) box.append(svg("text", { class: "tick", x: 4, y: y(v) + 4 }, fmt(v, 2)));
  for (const t of [from, (from + to) / 2, to]) box.append(svg("text", { class: "tick", x: Math.min(x(t), W - 60), y: H - 8 }, when(t)));
  for (const m of marks) {
    const line = svg("line", { x1: x(m.at), x2: x(m.at), y1: T, y2: H - B, stroke: `var(--${m.kind === "published" ? "accent" : m.kind === "drift" ? "bad" : m.kind === "promoted" ? "good" : m.kind === "move" ? "move" : "warn"})`, "stroke-dasharray": "3 3" });
    line.append(svg("title", {}, `${when(m.at)} ${m.text}`));
    box.append(line);
  }
  for (const [key, color] of series) {
    const points = batches.filter((b) => b[key] !== null && b[key] !== undefined).map((b) => `${x(b.at).toFixed(1)},${y(b[key]).toFixed(1)}`);
    if (points.length) box.append(svg("polyline", { class: "series", stroke: color, points: points.join(" ") }));
  }
  const legend = el("div", { class: "legend" }, ...series.map(([key, color]) => el("span", { style: `color:${color}`, text: `— ${key.replace("_", " ")}` })));
  return el("div", { class: "card" }, el("h2", { text: title }), box, legend);
}

async function drawLearning() {
  const data = await getJSON("/api/learning", "learning");
  if (!data) return;
  report("learning", data.sources);
  const now = Date.now();
  // the chosen range, but no empty stretch before the first record (a young run fills the width)
  const earliest = Math.min(now - 60000, ...data.batches.map((b) => b.at), ...data.moves.map((m) => m.at));
  const from = learningMinutes ? Math.max(now - learningMinutes * 60000, earliest) : earliest;
  const batches = data.batches.filter((b) => b.at >= from);
  const marks = markersOf(data).filter((m) => m.at >= from);
  const rows = marks.slice().reverse().map((m) => el("tr", { class: "marker" }, el("td", { text: when(m.at) }), el("td", { class: m.kind, text: m.kind }), el("td", { text: m.text })));
  document.getElementById("learning-body").replaceChildren(
    el("p", { class: "note", text: `${data.model}: ${fmt(batches.length)} training micro-batches in view` }),
    chart("Prequential accuracy", batches, [["accuracy", "#94a3b8"], ["window_accuracy", "#2563eb"]], marks, from, now, [0, 1]),
    chart("Log loss", batches, [["log_loss", "#c2410c"]], marks, from, now),
    el("div", { class: "card" }, el("h2", { text: "Drift, versions, gate verdicts and alias moves" }),
      el("div", { class: "scroll" }, el("table", { id: "markers" }, el("thead", {}, el("tr", {}, el("th", { text: "time" }), el("th", { text: "what" }), el("th", { text: "detail" }))), el("tbody", {}, ...rows)))),
  );
}

function Learning() {
  const buttons = RANGES.map(([label, minutes]) => el("button", { class: minutes === learningMinutes ? "chosen" : null, "data-minutes": minutes, text: label, on: { click: (event) => {
    learningMinutes = minutes;
    for (const b of event.target.parentNode.children) b.classList.toggle("chosen", b === event.target);
    drawLearning();
  } } }));
  view.append(el("h1", { text: "Learning" }), el("div", { class: "note" }, "Show the last ", ...buttons), el("div", { id: "learning-body" }));
  drawLearning();
  setInterval(drawLearning, 5000);
}

// ---------------------------------------------------------------------------------------------- Models
function adminNote(data) {
  if (!data.admin) return "Admin actions are off: serving and the console were started without STREAMFIT_ADMIN_TOKEN.";
  if (!sessionStorage.getItem("adminToken")) return "Enter the admin token (STREAMFIT_ADMIN_TOKEN) to promote, roll back or pin.";
  return "Actions go to serving's admin routes with this token.";
}

async function act(model, action, version) {
  const result = document.getElementById("admin-result");
  result.textContent = `${action} ${version ? "v" + version : ""}: waiting for serving…`;
  const answer = await fetch(`/api/admin/${encodeURIComponent(model)}/${action}`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: "Bearer " + sessionStorage.getItem("adminToken") },
    body: JSON.stringify(version ? { version } : {}),
  });
  const body = await answer.json();
  result.textContent = answer.ok
    ? `${action} done: champion v${body.champion}, serving v${body.serving}${body.pinned ? ", pinned v" + body.pinned : ""}`
    : `${action} refused (${answer.status}): ${body.error || JSON.stringify(body.detail || body)}`;
  drawModels();
}

function gateText(g) {
  if (!g) return "-";
  const verdict = g.promoted ? "promoted" : g.passed ? "passed, waits" : "held back";
  return `${verdict}: ${fmt(g.candidate_accuracy, 3)} vs champion v${fmt(g.champion)} ${fmt(g.champion_accuracy, 3)} on ${fmt(g.events)} events`;
}

function short(value) {
  return value && Object.keys(value).length ? JSON.stringify(value) : "-";
}

function prunedText(v) {
  // a pruned version's meta.json has its parameter counts (pipeline/pruning.py); others are dense
  return v.sparsity === undefined ? "-" : `${fmt(v.sparsity * 100, 1)} % (${fmt(v.compression_ratio, 1)}x)`;
}

async function drawModels() {
  const data = await getJSON("/api/models", "models");
  if (!data) return;
  report("models", data.sources);
  const enabled = data.admin && Boolean(sessionStorage.getItem("adminToken"));
  document.getElementById("admin-note").textContent = adminNote(data);
  const cards = data.models.map((m) => {
    const served = m.name === data.served;
    const can = enabled && served;
    const button = (action, version, label) => el("button", { "data-action": action, "data-model": m.name, "data-version": version, disabled: !can, text: label, on: { click: () => act(m.name, action, version) } });
    const rows = m.versions.map((v) => el("tr", { id: `version-${m.name}-${v.version}` },
      el("td", { class: "num", text: `v${v.version}` }), el("td", { text: v.aliases.join(", ") || "-" }),
      el("td", { text: v.parent ? `v${v.parent}` : "-" }), el("td", { text: v.algorithm || "-" }), el("td", { class: "num", text: fmt(v.updates) }),
      el("td", {}, el("code", { text: short(v.offsets) })), el("td", {}, el("code", { text: short(v.metrics) })),
      el("td", { class: v.gate ? (v.gate.promoted ? "promoted" : v.gate.passed ? "" : "refused") : "", text: gateText(v.gate) }),
      el("td", { text: when(v.created_at) }), el("td", { class: "num", text: v.weights_bytes === null ? "-" : `${fmt(v.weights_bytes / 1024, 1)} KiB` }),
      el("td", { class: "num", title: v.active_parameters === undefined ? "" : `${fmt(v.active_parameters)} of ${fmt(v.total_parameters)} parameters active`, text: prunedText(v) }),
      el("td", {}, el("code", { title: v.sha256, text: v.sha256.slice(0, 12) + "…" })),
      el("td", {}, button("promote", v.version, "promote"), button("pin", v.version, "pin"))));
    return el("div", { class: "card" },
      el("h2", { text: `${m.name} (${m.features.length} features, classes ${m.classes.join(", ")})` }),
      el("p", { class: "note", text: `aliases: ${Object.entries(m.aliases).map(([a, v]) => `${a} v${v}`).join(", ") || "none"}${served ? "" : " (not served by this console's serving: no actions)"}` }),
      el("div", {}, button("rollback", null, "roll back champion"), button("unpin", null, "unpin")),
      el("div", { class: "scroll" }, el("table", {}, el("thead", {}, el("tr", {}, ...["version", "aliases", "parent", "algorithm", "updates", "offsets trained through", "metrics", "gate", "created", "weights", "pruned", "sha256", ""].map((h) => el("th", { text: h })))), el("tbody", {}, ...rows))));
  });
  document.getElementById("models-body").replaceChildren(...cards);
}

function Models() {
  const token = el("input", { id: "token", type: "password", placeholder: "admin token", autocomplete: "off", value: sessionStorage.getItem("adminToken") || "",
    on: { change: (event) => { sessionStorage.setItem("adminToken", event.target.value); drawModels(); } } });
  view.append(el("h1", { text: "Models" }), el("div", { class: "card" }, el("label", {}, "Admin token ", token), el("p", { class: "note", id: "admin-note" }), el("p", { id: "admin-result", role: "status" })), el("div", { id: "models-body" }));
  drawModels();
}

// ---------------------------------------------------------------------------------------------- Dead letters
let letters = [];

function drawLetters() {
  const stage = document.getElementById("stage").value, reason = document.getElementById("reason").value.toLowerCase();
  const shown = letters.filter((d) => (!stage || d.stage === stage) && (!reason || d.error.toLowerCase().includes(reason)));
  document.getElementById("letters-count").textContent = `${fmt(shown.length)} of the ${fmt(letters.length)} newest dead letters`;
  document.getElementById("letters").replaceChildren(...shown.map((d) => el("tr", { class: "letter" },
    el("td", { text: when(d.failed_at) }), el("td", { text: d.stage }), el("td", { text: d.error }), el("td", { text: d.where }),
    el("td", {}, el("code", { class: "raw", text: d.raw }), d.cut ? el("div", { class: "note", text: `… ${fmt(d.cut)} more characters not shown` }) : null,
      d.encoding !== "utf8" ? el("div", { class: "note", text: `(${d.encoding})` }) : null))));
}

async function loadLetters() {
  const data = await getJSON("/api/dead-letters", "dead-letters");
  if (!data) return;
  report("dead-letters", data.sources);
  letters = data.dead_letters;
  drawLetters();
}

function DeadLetters() {
  const stage = el("select", { id: "stage", on: { change: drawLetters } }, ...["", "produce", "predict", "train"].map((s) => el("option", { value: s, text: s || "every stage" })));
  const reason = el("input", { id: "reason", placeholder: "reason contains…", on: { input: drawLetters } });
  view.append(el("h1", { text: "Dead letters" }), el("div", { class: "card" }, stage, " ", reason, el("p", { class: "note", id: "letters-count" }),
    el("div", { class: "scroll" }, el("table", {}, el("thead", {}, el("tr", {}, ...["failed at", "stage", "reason", "where", "raw event"].map((h) => el("th", { text: h })))), el("tbody", { id: "letters" })))));
  loadLetters();
  setInterval(loadLetters, 5000);
}

// ---------------------------------------------------------------------------------------------- Try it
async function TryIt() {
  view.append(el("h1", { text: "Try it" }), el("div", { id: "try-body" }));
  const data = await getJSON("/api/models", "try");
  if (!data) return;
  report("try", data.sources);
  const model = data.models.find((m) => m.name === data.served);
  if (!model) {
    document.getElementById("try-body").append(el("p", { class: "note", text: `model ${data.served} is not in the registry yet` }));
    return;
  }
  const inputs = model.features.map((name) => el("input", { type: "number", step: "any", value: "0", "data-feature": name, required: true }));
  const form = el("form", { id: "try-form", class: "card" },
    el("p", { class: "note", text: `${model.name}: one event of its ${model.features.length} features, sent to serving at ${data.serving_url}` }),
    el("div", { class: "form-grid" }, ...inputs.map((input) => el("label", {}, input.dataset.feature, input))),
    el("button", { type: "submit", id: "try-send", text: "predict" }));
  const result = el("div", { id: "try-result", class: "card" });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const instance = Object.fromEntries(inputs.map((input) => [input.dataset.feature, Number(input.value)]));
    const answer = await fetch(`/api/predict/${encodeURIComponent(model.name)}`, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ instances: [instance] }) });
    const body = await answer.json();
    report("try", body.sources);
    const version = body.answer && body.answer.model_version;
    result.replaceChildren(
      el("p", { id: "try-status", text: body.status === null ? "serving did not answer" : `HTTP ${body.status}${version ? `, answered by version ${version}` : ""}` }),
      el("pre", { id: "try-answer", text: JSON.stringify(body.answer || body.detail || body, null, 2) }),
      el("p", { class: "note", text: "The same request with curl:" }),
      el("pre", { id: "try-curl", text: body.curl || "" }));
  });
  document.getElementById("try-body").append(form, result);
}

// ---------------------------------------------------------------------------------------------- routing
const PAGES = { "/pipeline": Pipeline, "/learning": Learning, "/models": Models, "/dead-letters": DeadLetters, "/try": TryIt };
for (const link of document.querySelectorAll("nav a")) if (link.getAttribute("href") === location.pathname) link.classList.add("here");
(PAGES[location.pathname] || Pipeline)();

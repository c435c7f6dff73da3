// CoGaLoRA Serve console: calls the service's own API and draws what it answers.
// Everything that comes from the service or the user is written with textContent, never as HTML.
"use strict";

const KEY_STORAGE = "cogalora-console-api-key";
const LIVE_EVERY_MS = 3000;
const MAX_RUNS = 4;
const TAU_DEBOUNCE_MS = 150;
// Short column titles for the module kinds of cogalora.ALL_MODULE_KINDS; another kind shows its own name.
const KIND_TITLES = {
  "attention.query": "q",
  "attention.key": "k",
  "attention.value": "v",
  "attention.output": "o",
  "ffn.up": "up",
  "ffn.down": "down",
};

const state = {
  adapters: new Map(), // name -> /adapters entry
  runs: [], // newest first: {adapter, tau, texts, answer, ms}
  live: null,
  classifying: 0,
  drawn: 0, // runs drawn so far: each run's section carries its number (data-seq)
  chosen: null, // the adapter whose τ the slider was last set to
};

// ---- small helpers ---------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function el(tag, options = {}, children = []) {
  const node = document.createElement(tag);
  if (options.class) node.className = options.class;
  if (options.text !== undefined) node.textContent = String(options.text);
  if (options.title) node.title = options.title;
  for (const [key, value] of Object.entries(options.data || {})) node.dataset[key] = value;
  for (const child of children) if (child) node.append(child);
  return node;
}

function show(node, message) {
  node.textContent = message || "";
  node.hidden = !message;
}

function si(value, unit = "") {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const steps = [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
  for (const [size, prefix] of steps) {
    if (Math.abs(value) >= size) return `${(value / size).toPrecision(3)} ${prefix}${unit}`;
  }
  return `${Number(value.toPrecision(3))} ${unit}`.trim();
}

function ms(value) {
  if (value === null || value === undefined) return "–";
  return value >= 100 ? `${Math.round(value)} ms` : `${value.toPrecision(2)} ms`;
}

function percent(value) {
  return value === null || value === undefined ? "–" : `${(value * 100).toFixed(1)} %`;
}

function fixed(value, digits = 2) {
  return value === null || value === undefined ? "–" : value.toFixed(digits);
}

// ---- the API ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, type) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

async function api(path, body) {
  const headers = {};
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers["X-API-Key"] = key;
  const init = { headers, cache: "no-store" };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    const reason = error instanceof TypeError && key ? " (or the API key holds characters a header cannot carry)" : "";
    throw new ApiError(0, `the service cannot be reached${reason}`, "network");
  }
  let answer = null;
  try {
    answer = await response.json();
  } catch (_) {
    answer = null;
  }
  if (!response.ok) {
    const message = answer && typeof answer.error === "string" ? answer.error : `HTTP ${response.status}`;
    throw new ApiError(response.status, message, answer && answer.error_type);
  }
  return answer;
}

// ---- API key -------------------------------------------------------------------------------

function askForKey(refusal) {
  $("app").hidden = true;
  $("key-panel").hidden = false;
  setStatus("API key needed", "wait");
  show($("key-error"), refusal ? `The service refused this key: ${refusal}` : "");
  $("key-input").focus();
}

// A 401: ask again, saying why when a key was sent; a refused key is not sent again.
function keyRefused(error) {
  const sent = Boolean(sessionStorage.getItem(KEY_STORAGE));
  sessionStorage.removeItem(KEY_STORAGE);
  askForKey(sent ? error.message : "");
}

function keyEntered(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("key-input").value = "";
  start();
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  askForKey();
}

function setStatus(text, kind) {
  const pill = $("status");
  pill.textContent = text;
  pill.className = `pill ${kind || ""}`;
}

// ---- start-up and the catalogue ----------------------------------------------------------------

async function start() {
  try {
    const catalogue = await api("adapters");
    $("key-panel").hidden = true;
    $("app").hidden = false;
    $("forget-key").hidden = !sessionStorage.getItem(KEY_STORAGE);
    showCatalogue(catalogue);
    refreshLive();
  } catch (error) {
    if (error.status === 401) {
      keyRefused(error);
    } else {
      setStatus(error.status === 503 ? "loading models…" : "unreachable", "wait");
      setTimeout(start, 2000);
    }
  }
}

// Called at start and with every live refresh: the picker and τ change only when the adapters do.
function showCatalogue(catalogue) {
  const select = $("adapter");
  const previous = select.value;
  const names = catalogue.adapters.map((adapter) => adapter.name);
  state.adapters = new Map(catalogue.adapters.map((adapter) => [adapter.name, adapter]));
  if (names.join("\n") !== [...select.options].map((option) => option.value).join("\n")) {
    select.replaceChildren(...names.map((name) => el("option", { text: name })));
    if (state.adapters.has(previous)) select.value = previous;
  }
  if (select.value !== state.chosen) adapterChosen();

  // Adapters of one base model share one encoder in memory: the catalogue groups them so.
  const bases = new Map();
  for (const adapter of catalogue.adapters) {
    if (!bases.has(adapter.base_model)) bases.set(adapter.base_model, []);
    bases.get(adapter.base_model).push(adapter);
  }
  $("adapter-list").replaceChildren(
    ...[...bases].map(([base, adapters]) =>
      el("div", { class: "base" }, [
        el("div", { class: "base-head" }, [
          el("span", { class: "base-name", text: base }),
          el("span", { text: adapters.length === 1 ? "1 adapter" : `${adapters.length} adapters, one encoder` }),
        ]),
        ...adapters.map(adapterEntry),
      ]),
    ),
  );
  const unavailable = Object.entries(catalogue.unavailable || {});
  $("unavailable").replaceChildren();
  if (unavailable.length) {
    $("unavailable").append(
      el("div", { class: "unavailable" }, [
        el("h3", { text: `Not servable (${unavailable.length})` }),
        ...unavailable.map(([name, reason]) => el("p", {}, [el("b", { text: name }), `: ${reason}`])),
      ]),
    );
  }
  $("catalogue-summary").textContent =
    `${catalogue.loaded} of ${catalogue.adapters.length} loaded · at most ${catalogue.max_loaded} in memory`;
  setStatus(`ready · ${catalogue.adapters.length} adapters`, "ok");
}

function adapterEntry(adapter) {
  const present = adapter.total_adapters - (adapter.dropped_sites || []).length;
  const accuracy = adapter.metrics && typeof adapter.metrics.accuracy === "number" ? adapter.metrics.accuracy : null;
  const facts = [
    `labels: ${adapter.labels.join(", ")}`,
    `τ ${fixed(adapter.tau)}`,
    `${present} of ${adapter.total_adapters} sites carry an adapter`,
    adapter.rank_set ? `rank ${adapter.rank}, routed from {${adapter.rank_set.join(", ")}}` : `rank ${adapter.rank ?? "–"}`,
    `max ${adapter.max_length} tokens`,
    accuracy === null ? null : `dev accuracy ${percent(accuracy)}`,
  ].filter(Boolean);
  return el("div", { class: "adapter", data: { adapter: adapter.name } }, [
    el("div", { class: "adapter-top" }, [
      el("span", { class: "adapter-name", text: adapter.name }),
      el("span", { class: "tag method", text: adapter.method }),
      el("span", { class: "spacer" }),
      el("span", { class: adapter.loaded ? "tag loaded" : "tag", text: adapter.loaded ? "loaded" : "loads on first use" }),
    ]),
    el("div", { class: "adapter-facts", text: facts.join(" · ") }),
  ]);
}

// ---- τ -------------------------------------------------------------------------------------------

function selectedAdapter() {
  return state.adapters.get($("adapter").value);
}

function adapterChosen() {
  const adapter = selectedAdapter();
  if (!adapter) return;
  state.chosen = adapter.name;
  $("tau").value = adapter.tau;
  // The range thumb is 16 px wide in Chromium: its centre runs from 8 px to (width - 8 px).
  $("tau-mark").style.left = `calc(8px + ${adapter.tau} * (100% - 16px))`;
  $("tau-mark").title = `${adapter.name}'s own τ: ${fixed(adapter.tau)}`;
  $("tau-default").textContent = fixed(adapter.tau);
  showTau();
}

function showTau() {
  $("tau-value").textContent = Number($("tau").value).toFixed(2);
}

let tauTimer = null;
function tauMoved() {
  showTau();
  clearTimeout(tauTimer);
  tauTimer = setTimeout(() => {
    const newest = state.runs[0];
    if (newest && newest.adapter === $("adapter").value) classify(newest.texts, true);
  }, TAU_DEBOUNCE_MS);
}

function tauReset() {
  adapterChosen();
  tauMoved();
}

// ---- classifying ---------------------------------------------------------------------------------

function inputTexts() {
  return $("inputs")
    .value.split("\n")
    .map((line) => line.trim())
    .filter((line) => line.length > 0);
}

async function classify(texts, replaceNewest) {
  const adapter = selectedAdapter();
  if (!adapter || !texts.length) return;
  const tau = Number($("tau").value);
  const body = { inputs: texts, adapter: adapter.name };
  // The adapter's own τ is sent as no threshold at all: exactly the default the adapter serves with.
  if (Math.abs(tau - adapter.tau) > 1e-9) body.threshold = tau;
  const ticket = ++state.classifying;
  $("classify").disabled = true;
  const began = performance.now();
  try {
    const answer = await api("classify", body);
    if (ticket !== state.classifying) return; // a newer request (the slider moved on) wins
    const run = { seq: ++state.drawn, adapter: adapter.name, tau, texts, answer, ms: performance.now() - began };
    if (replaceNewest) state.runs[0] = run;
    else state.runs = [run, ...state.runs].slice(0, MAX_RUNS);
    show($("error"), "");
    drawRuns();
  } catch (error) {
    if (ticket !== state.classifying) return;
    if (error.status === 401) keyRefused(error);
    else show($("error"), `${error.message}${error.type ? ` (${error.type})` : ""}`);
  } finally {
    if (ticket === state.classifying) $("classify").disabled = false;
  }
}

function classifySubmitted(event) {
  event.preventDefault();
  classify(inputTexts(), false);
}

function textareaKey(event) {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) classifySubmitted(event);
}

// ---- drawing results -----------------------------------------------------------------------------

function drawRuns() {
  $("runs").replaceChildren(...state.runs.map((run, index) => drawRun(run, index)));
}

function drawRun(run, index) {
  const adapter = state.adapters.get(run.adapter) || {};
  const own = Math.abs(run.tau - adapter.tau) < 1e-9;
  const head = el("div", { class: "run-head" }, [
    el("span", { class: "adapter-name", text: run.adapter }),
    el("span", { class: "tag method", text: adapter.method || "" }),
    el("span", { class: own ? "tag" : "tag warn", text: `τ ${run.tau.toFixed(2)}${own ? " (its own)" : ""}` }),
    el("span", { class: "tag", text: `${run.texts.length} input${run.texts.length === 1 ? "" : "s"} · ${Math.round(run.ms)} ms` }),
    el("span", { class: "spacer" }),
    index === 0 ? el("span", { class: "hint", text: "moving τ redraws this run" }) : el("span", { class: "hint", text: "earlier" }),
  ]);
  const rows = run.answer.results.map((result, i) => drawRow(run.texts[i], result, adapter));
  const data = { adapter: run.adapter, seq: String(run.seq) };
  return el("section", { class: index === 0 ? "card run" : "card run earlier", data }, [
    head,
    ...rows,
  ]);
}

function drawRow(text, result, adapter) {
  const scores = el("div", { class: "scores" });
  for (const [i, entry] of result.scores.entries()) {
    const top = i === 0 ? " top" : "";
    const fill = el("span", { class: `fill${top}` });
    fill.style.width = `${Math.max(0, Math.min(1, entry.score)) * 100}%`;
    scores.append(
      el("span", { class: `name${top}`, text: entry.label }),
      el("span", { class: "bar" }, [fill]),
      el("span", { class: "num", text: entry.score.toFixed(3) }),
    );
  }
  const tokens = result.truncated ? `${result.tokens} of ${result.input_tokens}` : String(result.tokens);
  const facts = el("div", { class: "facts" }, [
    fact("label", result.label, "row-label"),
    fact("sites", `${result.active_adapters} / ${result.total_adapters}`, "row-sites"),
    fact("rank", result.active_rank, "row-rank"),
    fact("tokens", tokens, "row-tokens"),
    result.truncated ? el("span", { class: "tag warn", text: "truncated" }) : null,
  ]);
  const used = result.flops.adapter;
  const saved = result.flops.adapter_saved;
  const usedBar = el("span", { class: "used" });
  usedBar.style.width = `${used + saved > 0 ? (100 * used) / (used + saved) : 0}%`;
  const flops = el("div", { class: "flops" }, [
    el("div", { class: "bar" }, [usedBar]),
    el("div", {
      class: "caption",
      text: `adapter FLOPs ${si(used)} used · ${si(saved)} saved (${percent(used + saved > 0 ? saved / (used + saved) : 0)}) · total ${si(result.flops.total)}`,
    }),
  ]);
  return el("div", { class: "row" }, [
    el("div", {}, [el("p", { class: "row-text", text }), scores, facts, flops]),
    drawGrid(result, adapter),
  ]);
}

function fact(name, value, cls) {
  return el("span", {}, [`${name} `, el("b", { class: cls, text: value })]);
}

// A site name is "layer.<n>.<kind>"; the grid is layers × kinds, in the order of the adapter's site list.
function gridShape(sites) {
  const layers = [];
  const kinds = [];
  const where = new Map();
  for (const site of sites) {
    const match = /^layer\.(\d+)\.(.+)$/.exec(site);
    const layer = match ? match[1] : "";
    const kind = match ? match[2] : site;
    if (!layers.includes(layer)) layers.push(layer);
    if (!kinds.includes(kind)) kinds.push(kind);
    where.set(`${layer}/${kind}`, site);
  }
  return { layers, kinds, where };
}

function drawGrid(result, adapter) {
  const sites = adapter.sites && adapter.sites.length ? adapter.sites : result.active_modules;
  const dropped = new Set(adapter.dropped_sites || []);
  const ranks = new Map(result.active_modules.map((site, i) => [site, result.active_ranks ? result.active_ranks[i] : null]));
  const routedRanks = Boolean(adapter.rank_set);
  const maxRank = adapter.rank || Math.max(1, ...ranks.values());
  const { layers, kinds, where } = gridShape(sites);

  const table = el("table", { class: "grid", data: { sites: String(sites.length) } });
  table.append(
    el("tr", {}, [el("th"), ...kinds.map((kind) => el("th", { text: KIND_TITLES[kind] || kind, title: kind }))]),
  );
  for (const layer of layers) {
    const row = el("tr", {}, [el("th", { class: "layer", text: layer === "" ? "" : `L${layer}` })]);
    for (const kind of kinds) {
      const site = where.get(`${layer}/${kind}`);
      const cell = el("td");
      if (site !== undefined) {
        cell.dataset.site = site;
        if (ranks.has(site)) {
          const rank = ranks.get(site);
          cell.classList.add("on");
          cell.title = `${site}: ran${rank ? ` at rank ${rank}` : ""}`;
          if (routedRanks && rank) {
            cell.classList.add("ranked");
            cell.textContent = String(rank);
            cell.style.setProperty("--level", String(rank / maxRank));
            if (rank / maxRank <= 0.25) cell.classList.add("light");
          }
        } else if (dropped.has(site)) {
          cell.classList.add("dropped");
          cell.title = `${site}: no adapter (pruned after training)`;
        } else {
          cell.classList.add("off");
          cell.title = `${site}: gate off`;
        }
      }
      row.append(cell);
    }
    table.append(row);
  }
  const legend = el("div", { class: "legend" }, [
    el("span", {}, [el("i", { class: "on" }), routedRanks ? "ran (number: rank)" : "ran"]),
    el("span", {}, [el("i", { class: "off" }), "gate off"]),
    dropped.size ? el("span", {}, [el("i", { class: "dropped" }), "no adapter"]) : null,
  ]);
  return el("div", { class: "grid-wrap" }, [table, legend]);
}

function savedShare(adapter) {
  const all = adapter.adapter_flops + adapter.adapter_flops_saved;
  return all > 0 ? adapter.adapter_flops_saved / all : null;
}

// ---- live ---------------------------------------------------------------------------------------

async function refreshLive() {
  if (document.hidden || $("app").hidden) return;
  try {
    const [stats, catalogue] = await Promise.all([api("console/stats"), api("adapters")]);
    drawLive(stats);
    showCatalogue(catalogue);
  } catch (error) {
    if (error.status === 401) keyRefused(error);
    else $("live-window").textContent = `stats unavailable: ${error.message}`;
  }
}

function drawLive(stats) {
  $("live-window").textContent = `last ${Math.round(stats.window_s)} s · refreshed every ${LIVE_EVERY_MS / 1000} s`;
  $("live-rate").textContent = stats.requests_per_s.toFixed(stats.requests_per_s >= 10 ? 0 : 1);
  $("live-p50").textContent = ms(stats.latency_p50_ms);
  $("live-p99").textContent = ms(stats.latency_p99_ms);
  $("live-requests").textContent = String(stats.requests_total);
  $("live-requests").title = `${stats.errors_total} answered with an error`;
  $("live-inflight").textContent = `${stats.inflight} · ${stats.queue_depth}`;
  $("live-loaded").textContent = `${stats.adapters_loaded} / ${stats.adapters_available}`;

  // [title, tooltip, value]
  const columns = [
    ["adapter", "", (name) => name],
    ["inputs", "inputs classified", (_, a) => String(a.inputs)],
    ["sites", "mean adapter sites that ran per input", (_, a) => fixed(a.mean_active_adapters, 1)],
    ["rank", "mean total LoRA rank per input", (_, a) => fixed(a.mean_active_rank, 1)],
    ["saved", "share of adapter FLOPs skipped by gates", (_, a) => percent(savedShare(a))],
  ];
  if (stats.shadow_fraction > 0) {
    columns.push([
      "shadow",
      "shadow dense checks whose label agreed with the routed one",
      (_, a) => (a.shadow_checks ? `${percent(a.shadow_agreement)} of ${a.shadow_checks}` : "–"),
    ]);
  }
  if (stats.drift_window > 0) {
    columns.push(["drift", "routing drift against the dev data (0: same routing)", (_, a) => fixed(a.routing_drift, 3)]);
  }
  const fidelity = [
    stats.shadow_fraction > 0 ? `shadow agreement (${percent(stats.shadow_fraction)} of rows checked)` : null,
    stats.drift_window > 0 ? `routing drift (over ${stats.drift_window} rows)` : null,
  ].filter(Boolean);
  $("live-fidelity").textContent = fidelity.length ? `, ${fidelity.join(", ")}` : "";
  $("live-head").replaceChildren(...columns.map(([title, tip]) => el("th", { text: title, title: tip })));
  const entries = Object.entries(stats.adapters);
  $("live-adapters").tBodies[0].replaceChildren(
    ...entries.map(([name, adapter]) =>
      el("tr", { data: { adapter: name } }, columns.map(([, , value]) => el("td", { text: value(name, adapter) }))),
    ),
  );
  $("live-adapters").hidden = entries.length === 0;
  $("live-empty").hidden = entries.length > 0;
}

// ---- wiring ---------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", keyEntered);
  $("forget-key").addEventListener("click", forgetKey);
  $("classify-form").addEventListener("submit", classifySubmitted);
  $("inputs").addEventListener("keydown", textareaKey);
  $("adapter").addEventListener("change", adapterChosen);
  $("tau").addEventListener("input", tauMoved);
  $("tau-reset").addEventListener("click", tauReset);
  setInterval(refreshLive, LIVE_EVERY_MS);
  start();
});

/*
 * app.js - the modelprep dashboard. Loads devices, models, residents and
 * jobs over the JSON API, then follows GET /v1/events (read with fetch, not
 * EventSource, so the bearer token can go in a header; resumed with
 * Last-Event-ID after a drop). A job opens in a detail view that replays
 * its own event stream (GET /v1/jobs/{id}/events) as a timeline. The job
 * form is built from the server's /openapi.json (Params_<type>), so it
 * offers every param the server takes. Everything the server sends is put
 * into the page as text, never as HTML.
 */
"use strict";
(function () {
  const TOKEN_KEY = "modelprep.token";
  const MAX_JOBS = 200;
  const CHART_POINTS = 120; /* one per second */
  const FINAL = new Set(["succeeded", "failed", "cancelled"]);
  const MAX_BARS = 24;     /* finished loads in the chart */
  const MAX_TIMELINE = 500;
  const st = {
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    jobs: new Map(),        /* id -> job object */
    residents: [],
    devices: [],
    lastEventId: 0,
    stream: null,           /* AbortController of the event stream */
    samples: [],            /* load throughput, bytes/s, one per second */
    lastLoad: null,         /* throughput of the last finished warm_load */
    loads: [],              /* finished warm_loads: {id, bps, bytes} oldest first */
    models: [],
    schemas: null,          /* components.schemas of /openapi.json */
    detail: null,           /* {id, ctrl, events, job} of the open job detail */
    dirty: new Set(),
    started: false,
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k === "width") e.style.width = v; /* CSSOM: allowed by the page's CSP */
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }

  function fmtBytes(n) {
    if (typeof n !== "number" || !isFinite(n)) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(n < 10 ? 2 : 1) : String(Math.round(n))) + " " + units[i];
  }

  function fmtRate(r, unit) {
    if (!r) return "";
    return unit === "bytes" ? fmtBytes(r) + "/s" : r.toFixed(1) + " " + (unit || "") + "/s";
  }

  function fmtDuration(sec) {
    if (typeof sec !== "number" || !isFinite(sec) || sec < 0) return "–";
    if (sec < 1) return Math.round(sec * 1000) + " ms";
    if (sec < 60) return sec.toFixed(1) + " s";
    if (sec < 3600) return Math.floor(sec / 60) + "m" + String(Math.floor(sec % 60)).padStart(2, "0") + "s";
    return Math.floor(sec / 3600) + "h" + String(Math.floor((sec % 3600) / 60)).padStart(2, "0") + "m";
  }

  function fmtTime(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return isNaN(d) ? "–" : d.toLocaleTimeString([], { hour12: false });
  }

  function jobSeconds(j) {
    if (!j.started_at) return null;
    const a = Date.parse(j.started_at);
    const b = j.finished_at ? Date.parse(j.finished_at) : Date.now();
    return isNaN(a) || isNaN(b) ? null : Math.max(0, (b - a) / 1000);
  }

  /* A job that ended badly: failed, or a verify that found a mismatch (it
   * succeeded as a job, but the check failed). */
  function isBad(j) {
    return j.state === "failed" || (j.type === "verify" && j.state === "succeeded" && j.result && j.result.ok === false);
  }

  function stateText(j) {
    return j.type === "verify" && j.state === "succeeded" && j.result && j.result.ok === false ? "mismatch" : j.state;
  }

  /* A cell for a long id or path: one line, cut with an ellipsis, the whole
   * text in the tooltip. */
  function clip(text, cls) {
    return el("span", { class: "clip" + (cls ? " " + cls : ""), title: text, text: text });
  }

  /* ---- API ---------------------------------------------------------------- */

  function authHeaders(extra) {
    const h = Object.assign({}, extra || {});
    if (st.token) h["Authorization"] = "Bearer " + st.token;
    return h;
  }

  class Unauthorized extends Error {}

  async function api(method, path, body) {
    const opts = { method, headers: authHeaders(body !== undefined ? { "Content-Type": "application/json" } : {}) };
    if (body !== undefined) opts.body = JSON.stringify(body);
    const r = await fetch(path, opts);
    const text = await r.text();
    let doc = null;
    try { doc = text ? JSON.parse(text) : null; } catch (e) { doc = { detail: text }; }
    if (r.status === 401) {
      askToken(st.token ? "The token was refused." : "");
      throw new Unauthorized("401");
    }
    return { status: r.status, doc };
  }

  function problemText(res) {
    const d = res.doc || {};
    let s = "HTTP " + res.status + (d.detail ? ": " + d.detail : d.title ? ": " + d.title : "");
    if (Array.isArray(d.errors) && d.errors.length)
      s += " (" + d.errors.map((e) => (e.field ? e.field + ": " : "") + (e.message || e.code)).join("; ") + ")";
    return s;
  }

  /* ---- token -------------------------------------------------------------- */

  function askToken(message) {
    stopStream();
    st.started = false;
    $("app").hidden = true;
    $("auth").hidden = false;
    $("forget-token").hidden = true;
    $("token-error").textContent = message || "";
    setConn("down", "token needed");
    $("token-input").focus();
  }

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    st.token = $("token-input").value.trim();
    sessionStorage.setItem(TOKEN_KEY, st.token);
    $("token-input").value = "";
    start();
  });

  $("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    st.token = "";
    askToken("");
  });

  /* ---- state updates ------------------------------------------------------ */

  const RANK = { queued: 0, running: 1, succeeded: 2, failed: 2, cancelled: 2 };

  /* Job objects reach us by several paths (a POST's answer, the list, the
   * stream) in no fixed order; never let an older one undo a newer one. */
  function upsertJob(doc) {
    if (!doc || !doc.id) return;
    const old = st.jobs.get(doc.id);
    if (old && (RANK[doc.state] || 0) < (RANK[old.state] || 0)) return;
    /* A state event is the whole job; keep a fresher progress we already have. */
    st.jobs.set(doc.id, Object.assign({}, old || {}, doc));
    if (doc.type === "warm_load" && doc.state === "succeeded" && doc.result &&
        typeof doc.result.throughput_bytes_per_s === "number") {
      st.lastLoad = doc.result.throughput_bytes_per_s;
      if (!st.loads.some((l) => l.id === doc.id)) {
        st.loads.push({ id: doc.id, bps: doc.result.throughput_bytes_per_s, bytes: doc.result.bytes || 0,
                        at: doc.finished_at || "" });
        st.loads.sort((a, b) => a.at.localeCompare(b.at));
        while (st.loads.length > MAX_BARS) st.loads.shift();
        drawChart();
      }
    }
    trimJobs();
    schedule("jobs");
    if (st.detail && st.detail.id === doc.id) schedule("detail");
  }

  function applyProgress(p) {
    const job = st.jobs.get(p.id);
    if (!job || FINAL.has(job.state)) return;
    job.progress = { done: p.done, total: p.total, unit: p.unit, rate: p.rate, message: p.message };
    schedule("jobs");
    if (st.detail && st.detail.id === p.id) schedule("detail");
  }

  function applySteps(doc) {
    const job = doc && st.jobs.get(doc.id);
    if (job && Array.isArray(doc.steps)) job.steps = doc.steps;
    if (st.detail && st.detail.id === doc.id) {
      if (st.detail.job) st.detail.job.steps = doc.steps;
      schedule("detail");
    }
  }

  function trimJobs() {
    if (st.jobs.size <= MAX_JOBS) return;
    const ended = sortedJobs().filter((j) => FINAL.has(j.state));
    while (st.jobs.size > MAX_JOBS && ended.length) st.jobs.delete(ended.pop().id);
  }

  function sortedJobs() {
    return Array.from(st.jobs.values()).sort((a, b) =>
      (b.created_at || "").localeCompare(a.created_at || "") || (b.id < a.id ? -1 : 1));
  }

  async function loadJobs() {
    const r = await api("GET", "/v1/jobs?limit=100");
    if (r.status !== 200) return;
    for (const j of r.doc.jobs || []) upsertJob(j);
  }

  async function loadResidents() {
    const r = await api("GET", "/v1/residents");
    if (r.status !== 200) return;
    st.residents = r.doc.residents || [];
    schedule("residents");
  }

  async function loadDevices() {
    const r = await api("GET", "/v1/devices");
    if (r.status !== 200) return;
    st.devices = r.doc.devices || [];
    schedule("devices");
  }

  async function loadVersion() {
    const r = await api("GET", "/v1/version");
    if (r.status === 200 && r.doc) {
      const cuda = r.doc.cuda ? " · CUDA " + r.doc.cuda.runtime : "";
      $("version").textContent = "v" + r.doc.version + " (" + r.doc.git + ")" + cuda;
    }
    return r.status;
  }

  async function loadModels() {
    const r = await api("GET", "/v1/models");
    if (r.status !== 200) return;
    st.models = (r.doc && r.doc.models) || [];
    schedule("models");
  }

  /* The contract: job types and each type's params (Params_<type>). Open,
   * like the page itself. */
  async function loadSchema() {
    const r = await fetch("/openapi.json");
    if (!r.ok) return;
    const doc = await r.json();
    st.schemas = (doc.components && doc.components.schemas) || {};
    const req = st.schemas.JobRequest;
    const types = req && req.properties && req.properties.type && req.properties.type.enum;
    if (Array.isArray(types) && types.length) {
      const sel = $("job-type");
      const cur = sel.value;
      sel.replaceChildren(...types.map((t) => el("option", { value: t, text: t })));
      if (types.includes(cur)) sel.value = cur;
    }
    renderFields();
  }

  function reloadAll() {
    return Promise.all([loadJobs(), loadResidents(), loadDevices(), loadModels()]).catch(ignoreAuth);
  }

  function ignoreAuth(e) {
    if (!(e instanceof Unauthorized)) console.warn(e);
  }

  /* ---- event stream ------------------------------------------------------- */

  function setConn(state, text) {
    const c = $("conn");
    c.dataset.state = state;
    c.textContent = text;
  }

  function stopStream() {
    if (st.stream) st.stream.abort();
    st.stream = null;
  }

  function handleEvent(kind, id, data) {
    if (id) st.lastEventId = id;
    let doc = null;
    try { doc = data ? JSON.parse(data) : null; } catch (e) { return; }
    switch (kind) {
      case "state":
        upsertJob(doc);
        if (doc && doc.type === "warm_load" && FINAL.has(doc.state)) { loadResidents().catch(ignoreAuth); loadDevices().catch(ignoreAuth); }
        /* A finished job may have made, changed or inspected a model. */
        if (doc && FINAL.has(doc.state) && doc.type !== "warm_load") loadModels().catch(ignoreAuth);
        break;
      case "progress":
        if (doc) applyProgress(doc);
        break;
      case "log": {
        const job = doc && st.jobs.get(doc.id);
        if (job) { job.lastLog = doc.level + ": " + doc.message; schedule("jobs"); }
        break;
      }
      case "resident":
        loadResidents().catch(ignoreAuth);
        schedule("models");
        loadDevices().catch(ignoreAuth);
        break;
      case "steps":
        if (doc) applySteps(doc);
        break;
      case "resync":
        /* The server could not replay everything we missed. */
        reloadAll();
        break;
    }
  }

  /* Splits a text/event-stream body into blocks, calling fn(kind, id, data). */
  async function readEvents(resp, fn) {
    const reader = resp.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        parseBlock(buf.slice(0, i), fn);
        buf = buf.slice(i + 2);
      }
    }
  }

  /* Parses text/event-stream blocks: "id:", "event:", "data:" lines. */
  function parseBlock(block, fn) {
    let kind = "message", id = 0;
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line[0] === ":") continue;
      const i = line.indexOf(":");
      const field = i < 0 ? line : line.slice(0, i);
      let value = i < 0 ? "" : line.slice(i + 1);
      if (value[0] === " ") value = value.slice(1);
      if (field === "event") kind = value;
      else if (field === "data") data.push(value);
      else if (field === "id" && /^\d+$/.test(value)) id = Number(value);
    }
    if (data.length || id) fn(kind, id, data.join("\n"));
  }

  async function runStream() {
    let first = true;
    while (st.started) {
      const ctrl = new AbortController();
      st.stream = ctrl;
      try {
        const h = authHeaders({ Accept: "text/event-stream" });
        if (st.lastEventId) h["Last-Event-ID"] = String(st.lastEventId);
        const r = await fetch("/v1/events", { headers: h, signal: ctrl.signal, cache: "no-store" });
        if (r.status === 401) { askToken("The token was refused."); return; }
        if (!r.ok || !r.body) throw new Error("HTTP " + r.status);
        setConn("live", "live");
        /* Lists are read after the stream is open, so no change falls between. */
        if (first) { first = false; reloadAll(); }
        await readEvents(r, handleEvent);
      } catch (e) {
        if (ctrl.signal.aborted) return;
      }
      if (!st.started) return;
      setConn("down", "reconnecting…");
      await new Promise((res) => setTimeout(res, 1000));
    }
  }

  /* ---- rendering ---------------------------------------------------------- */

  let frame = 0;
  function schedule(what) {
    st.dirty.add(what);
    if (!frame) frame = requestAnimationFrame(render);
  }

  function render() {
    frame = 0;
    if (st.dirty.has("jobs")) renderJobs();
    if (st.dirty.has("residents")) renderResidents();
    if (st.dirty.has("devices")) renderDevices();
    if (st.dirty.has("models") || st.dirty.has("residents")) renderModels();
    if (st.dirty.has("detail")) renderDetail();
    st.dirty.clear();
  }

  /* Job rows are kept per id and updated in place: progress arrives several
   * times a second, and a row rebuilt under the pointer would swallow a
   * click on its Cancel button. */
  const jobRows = new Map();

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function makeJobRow(id) {
    const r = {};
    r.state = el("span", { class: "state" });
    r.fill = el("div", { class: "fill" });
    r.plabel = el("span", { class: "label" });
    r.cancel = el("button", { type: "button", class: "danger cancel", onclick: () => cancelJob(id), text: "Cancel" });
    r.link = el("a", { class: "clip mono job-link", href: "#job=" + encodeURIComponent(id), title: id, text: id });
    r.model = clip("", "mono");
    r.cells = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9].map(() => el("td"));
    r.cells[0].append(r.link);
    r.cells[2].append(r.model);
    r.cells[4].className = "num started";
    r.cells[5].className = "num duration";
    r.cells[7].className = "rate";
    r.cells[8].className = "msg";
    r.cells[3].append(r.state);
    r.cells[6].append(el("div", { class: "bar" }, r.fill, r.plabel));
    r.cells[9].append(r.cancel);
    r.tr = el("tr", { "data-job-id": id }, ...r.cells);
    return r;
  }

  /* One line about a finished job's result where the state alone says too
   * little: a verify that only recorded hashes checked nothing yet. */
  function resultSummary(j) {
    const res = j.result;
    if (j.type !== "verify" || !res || !Array.isArray(res.files)) return "";
    return res.status === "recorded"
      ? "hashes recorded for " + res.files.length + " files (first run: nothing to compare yet)"
      : "verified " + res.files.length + " files";
  }

  function updateJobRow(r, j) {
    const p = j.progress || {};
    const frac = p.total ? Math.max(0, Math.min(1, p.done / p.total)) : j.state === "succeeded" ? 1 : 0;
    let plabel = p.total ? Math.floor(frac * 100) + "%" : j.state === "succeeded" ? "100%" : "";
    if (p.total && p.unit === "bytes") plabel += " of " + fmtBytes(p.total);
    const msg = j.error ? j.error.code + ": " + j.error.message
      : resultSummary(j) || j.lastLog || p.message || "";
    const live = !FINAL.has(j.state);
    const bad = isBad(j);
    if (r.tr.dataset.state !== j.state) r.tr.dataset.state = j.state;
    r.tr.classList.toggle("bad", bad);
    r.tr.title = "created " + (j.created_at || "");
    const model = j.model + (j.revision && j.revision !== "main" ? "@" + j.revision : "");
    setText(r.model, model);
    r.model.title = model;
    setText(r.cells[1], j.type);
    r.state.dataset.state = bad ? "failed" : j.state;
    setText(r.state, stateText(j));
    setText(r.cells[4], fmtTime(j.started_at));
    r.cells[4].title = j.started_at || "";
    setText(r.cells[5], fmtDuration(jobSeconds(j)));
    r.fill.style.width = (frac * 100).toFixed(1) + "%";
    r.fill.classList.toggle("bad", bad);
    setText(r.plabel, plabel);
    setText(r.cells[7], live ? fmtRate(p.rate, p.unit) : "");
    setText(r.cells[8], msg);
    r.cells[8].title = msg;
    r.cancel.hidden = !live;
  }

  function renderJobs() {
    const body = $("jobs").tBodies[0];
    const jobs = sortedJobs();
    const keep = new Set();
    let prev = null;
    for (const j of jobs) {
      keep.add(j.id);
      let r = jobRows.get(j.id);
      if (!r) { r = makeJobRow(j.id); jobRows.set(j.id, r); }
      updateJobRow(r, j);
      const next = prev ? prev.nextSibling : body.firstChild;
      if (next !== r.tr) body.insertBefore(r.tr, next);
      prev = r.tr;
    }
    for (const [id, r] of jobRows) if (!keep.has(id)) { r.tr.remove(); jobRows.delete(id); }
    $("jobs-empty").hidden = jobs.length > 0;
  }

  function renderResidents() {
    const body = $("residents").tBodies[0];
    const rows = st.residents.map((r) => el("tr", { "data-resident-id": r.id, "data-state": r.state },
      el("td", {}, clip(r.id, "mono")),
      el("td", {}, clip(r.model, "mono")),
      el("td", {}, el("span", { class: "state", "data-state": r.state, text: r.state })),
      el("td", { class: "num", text: fmtBytes(r.bytes) }),
      el("td", { class: "num", text: (r.devices || []).map((d) => "#" + d.index + " " + fmtBytes(d.bytes)).join(", ") }),
      el("td", {}, r.state === "resident"
        ? el("button", { type: "button", class: "danger unload", onclick: () => unload(r.id), text: "Unload" })
        : null)));
    body.replaceChildren(...rows);
    $("residents-empty").hidden = rows.length > 0;
  }

  function renderDevices() {
    const box = $("devices");
    if (!st.devices.length) { box.replaceChildren(el("p", { class: "muted", text: "no devices" })); return; }
    box.replaceChildren(...st.devices.map((d) => {
      const used = Math.max(0, d.total_bytes - d.free_bytes);
      const b = el("div", { class: "bar" },
        el("div", { class: "fill used", width: (d.total_bytes ? (100 * used / d.total_bytes).toFixed(1) : 0) + "%" }),
        el("div", { class: "fill res", width: (d.total_bytes ? (100 * d.resident_bytes / d.total_bytes).toFixed(1) : 0) + "%" }),
        el("span", { class: "label", text: fmtBytes(used) + " used · " + fmtBytes(d.resident_bytes) + " resident · " + fmtBytes(d.total_bytes) }));
      return el("div", { class: "device", "data-device": d.index },
        el("div", { class: "head" },
          el("strong", { text: "#" + d.index + " " + d.name }),
          el("span", { class: "muted", text: d.kind + (d.compute_capability ? " sm " + d.compute_capability : "") + " · " + fmtBytes(d.free_bytes) + " free" })),
        b);
    }));
  }


  /* ---- models ------------------------------------------------------------- */

  /* "LlamaForCausalLM · 1.24 B params · BF16 · no quantization", and bytes
   * per TP rank, from a stored inspection result. */
  function inspectionCells(insp) {
    const res = insp && insp.result;
    if (!res) return [el("span", { class: "muted", text: "not inspected" })];
    const params = res.params_total || 0;
    const ptxt = params >= 1e9 ? (params / 1e9).toFixed(2) + " B" : (params / 1e6).toFixed(2) + " M";
    const dtypes = Object.keys(res.tensors_by_dtype || {}).join("/") || "–";
    const q = res.quantization && res.quantization.method;
    const head = [res.architecture || res.model_type || "?", ptxt + " params", dtypes,
      q ? q + (res.quantization.bits ? " " + res.quantization.bits + "-bit" : "") : "no quantization"].join(" · ");
    const tp = (res.per_tp || []).map((e) => "tp" + e.tp + " " + (typeof e.bytes_per_rank === "number" ? fmtBytes(e.bytes_per_rank) : "✗")).join(" · ");
    return [el("div", { class: "insp", text: head }), el("div", { class: "muted small", text: "per rank: " + (tp || "–") })];
  }

  /* Where a model is resident: per device, its bytes there (summed over
   * its residents, with their count when there are several). */
  function residentPlaces(model) {
    const per = new Map();
    for (const r of st.residents) {
      if (r.model !== model || r.state !== "resident") continue;
      for (const d of r.devices || []) {
        const e = per.get(d.index) || { bytes: 0, n: 0 };
        e.bytes += d.bytes || 0;
        e.n++;
        per.set(d.index, e);
      }
    }
    return Array.from(per.entries()).sort((a, b) => a[0] - b[0])
      .map(([i, e]) => "#" + i + " " + fmtBytes(e.bytes) + (e.n > 1 ? " (" + e.n + "×)" : ""));
  }

  async function modelAction(m, type, btn) {
    const out = $("models-result");
    out.className = "status";
    const req = { type, model: m.model, params: {} };
    /* A shard output loads as sharded_state, one rank per device: its
     * folder is named <name>-tp<N>. */
    const tp = /-tp(\d+)$/.exec(m.model);
    if (type === "warm_load" && m.kind === "sharded" && tp)
      req.params = { load_format: "sharded_state", tp_size: Number(tp[1]) };
    if (m.kind === "hub" && m.revision && m.revision !== "main") req.revision = m.revision;
    btn.disabled = true;
    try {
      const r = await api("POST", "/v1/jobs", req);
      if (r.status === 202 || r.status === 200) {
        upsertJob(r.doc);
        out.classList.add("ok");
        out.textContent = type + " submitted: " + r.doc.id;
        out.dataset.jobId = r.doc.id;
      } else {
        out.classList.add("bad");
        out.textContent = type + ": " + problemText(r);
      }
    } catch (e) { ignoreAuth(e); } finally { btn.disabled = false; }
  }

  /* Delete asks twice (the button turns into "Confirm"), not with a modal
   * dialog. Only hub snapshots can be evicted through the API. */
  async function deleteModel(m, btn) {
    if (btn.dataset.armed !== "1") {
      btn.dataset.armed = "1";
      btn.textContent = "Confirm delete";
      setTimeout(() => { btn.dataset.armed = ""; btn.textContent = "Delete"; }, 4000);
      return;
    }
    const out = $("models-result");
    out.className = "status";
    const [org, name] = m.model.split("/");
    try {
      const r = await api("DELETE", "/v1/models/" + encodeURIComponent(org) + "/" + encodeURIComponent(name));
      out.classList.add(r.status === 200 ? "ok" : "bad");
      out.textContent = r.status === 200 ? "deleted " + m.model : "delete: " + problemText(r);
      await loadModels();
    } catch (e) { ignoreAuth(e); }
  }

  function renderModels() {
    const body = $("models").tBodies[0];
    const rows = st.models.map((m) => {
      const where = residentPlaces(m.model);
      /* A folder is named by its last component; the whole path is below. */
      const base = m.model.startsWith("/") ? m.model.replace(/\/+$/, "").split("/").pop() : m.model;
      const label = base + (m.kind === "hub" && m.revision && m.revision !== "main" ? "@" + m.revision : "");
      const act = (type, text) => el("button", { type: "button", class: "act-" + type, text,
        onclick: (ev) => modelAction(m, type, ev.currentTarget) });
      const actions = el("div", { class: "actions" }, act("inspect", "Inspect"), act("prepare", "Prepare"),
        act("warm_load", "Load"), act("verify", "Verify"),
        m.kind === "hub" ? el("button", { type: "button", class: "danger act-delete", text: "Delete",
          onclick: (ev) => deleteModel(m, ev.currentTarget) }) : null);
      const sizeCell = el("td", { class: "num", text: fmtBytes(m.size_bytes) });
      sizeCell.title = (m.files || 0) + " files · " + (m.formats || []).join(", ");
      return el("tr", { "data-model": m.model, "data-kind": m.kind },
        el("td", { title: m.model }, clip(label, "mono model-name"), el("div", {}, clip(m.path || m.model, "mono muted small path"))),
        el("td", {}, el("span", { class: "kind", "data-kind": m.kind, text: m.kind })),
        sizeCell,
        el("td", { class: "inspection" }, ...inspectionCells(m.inspection)),
        el("td", { class: "where" + (where.length ? " on" : ""), text: where.length ? where.join(", ") : "–" }),
        el("td", {}, actions));
    });
    body.replaceChildren(...rows);
    $("models-empty").hidden = rows.length > 0;
    const names = new Set(st.models.map((m) => m.model));
    $("model-names").replaceChildren(...Array.from(names).map((n) => el("option", { value: n })));
  }

  /* ---- the job form, from /openapi.json -------------------------------------- */

  function paramSchema(type) {
    const s = st.schemas && st.schemas["Params_" + type];
    return (s && s.properties) || {};
  }

  function renderFields() {
    const type = $("job-type").value;
    const props = paramSchema(type);
    const box = $("job-fields");
    const fields = Object.entries(props).map(([name, sch]) => {
      let input;
      const t = sch.type || "string";
      if (Array.isArray(sch.enum)) {
        input = el("select", {}, el("option", { value: "", text: "(default)" }),
          ...sch.enum.map((v) => el("option", { value: v, text: v })));
      } else if (t === "boolean") {
        input = el("select", {}, el("option", { value: "", text: "(default)" }),
          el("option", { value: "true", text: "true" }), el("option", { value: "false", text: "false" }));
      } else {
        input = el("input", { type: t === "integer" || t === "number" ? "number" : "text",
          placeholder: t === "array" ? "comma-separated " + ((sch.items && sch.items.type) || "") + "s"
            : t === "object" ? "JSON object" : t });
        if (t === "number") input.step = "any";
      }
      input.dataset.param = name;
      input.dataset.ptype = t;
      if (t === "array") input.dataset.itype = (sch.items && sch.items.type) || "string";
      return el("label", { class: "param", title: sch.description || name }, name, input);
    });
    box.replaceChildren(el("legend", { text: "Params (" + fields.length + ")" }), ...fields);
    box.hidden = fields.length === 0;
    $("job-hint").textContent = fields.length ? "empty fields keep the server's defaults" : type + " takes no params";
  }

  function typedValue(v, t, itype) {
    if (t === "integer") { if (!/^-?\d+$/.test(v)) throw new Error("not an integer"); return Number(v); }
    if (t === "number") { const n = Number(v); if (!isFinite(n)) throw new Error("not a number"); return n; }
    if (t === "boolean") return v === "true";
    if (t === "object") { const o = JSON.parse(v); if (typeof o !== "object" || o === null) throw new Error("not an object"); return o; }
    if (t === "array") {
      if (v.trim().startsWith("[")) return JSON.parse(v);
      return v.split(",").map((x) => x.trim()).filter((x) => x !== "").map((x) => typedValue(x, itype, "string"));
    }
    return v;
  }

  function collectFields(params) {
    for (const input of $("job-fields").querySelectorAll("[data-param]")) {
      const v = input.value.trim();
      if (v === "") continue;
      try { params[input.dataset.param] = typedValue(v, input.dataset.ptype, input.dataset.itype); }
      catch (e) { throw new Error(input.dataset.param + ": " + e.message); }
    }
    return params;
  }

  /* ---- job detail ----------------------------------------------------------- */

  function openDetail(id) {
    closeDetail(false);
    const d = { id, ctrl: new AbortController(), events: [], job: st.jobs.get(id) || null };
    st.detail = d;
    const card = $("job-detail");
    card.hidden = false;
    $("detail-timeline").replaceChildren();
    schedule("detail");
    api("GET", "/v1/jobs/" + encodeURIComponent(id)).then((r) => {
      if (st.detail !== d) return;
      if (r.status === 200) { d.job = r.doc; upsertJob(r.doc); }
      else { d.error = problemText(r); }
      schedule("detail");
    }).catch(ignoreAuth);
    followDetail(d);
    card.scrollIntoView({ block: "start" });
  }

  function closeDetail(clearHash) {
    if (st.detail) st.detail.ctrl.abort();
    st.detail = null;
    $("job-detail").hidden = true;
    if (clearHash && location.hash.startsWith("#job=")) history.replaceState(null, "", location.pathname);
  }

  /* The job's own stream: its history first (state changes, kept progress,
   * logs, steps), then live events until it ends. */
  async function followDetail(d) {
    try {
      const r = await fetch("/v1/jobs/" + encodeURIComponent(d.id) + "/events",
        { headers: authHeaders({ Accept: "text/event-stream" }), signal: d.ctrl.signal, cache: "no-store" });
      if (!r.ok || !r.body) return;
      await readEvents(r, (kind, _id, data) => {
        if (st.detail !== d) return;
        let doc = null;
        try { doc = JSON.parse(data); } catch (e) { return; }
        addTimeline(d, kind, doc);
        if (kind === "state") { d.job = doc; upsertJob(doc); }
        if (kind === "steps") applySteps(doc);
        schedule("detail");
      });
    } catch (e) { /* aborted, or the stream dropped: the job doc stays */ }
  }

  function timelineText(kind, doc) {
    if (kind === "state") {
      let t = "→ " + stateText(doc);
      if (doc.error) t += ": " + doc.error.code + ": " + doc.error.message;
      return t;
    }
    if (kind === "progress") {
      const pct = doc.total ? Math.floor(100 * doc.done / doc.total) + "% " : "";
      const amt = doc.unit === "bytes" ? fmtBytes(doc.done) + " of " + fmtBytes(doc.total) : doc.done + "/" + doc.total + " " + (doc.unit || "");
      return pct + amt + (doc.rate ? " · " + fmtRate(doc.rate, doc.unit) : "") + (doc.message ? " · " + doc.message : "");
    }
    if (kind === "log") return "[" + doc.level + "] " + doc.message;
    if (kind === "steps") return (doc.steps || []).map((x) => x.type + " " + x.state).join(", ");
    return kind + ": " + JSON.stringify(doc);
  }

  function timelineTime(kind, doc) {
    if (kind === "log") return doc.at;
    if (kind === "state") return doc.state === "queued" ? doc.created_at : doc.state === "running" ? doc.started_at : doc.finished_at;
    return null;
  }

  /* Progress comes several times a second: consecutive progress events
   * share one line, updated in place. */
  function addTimeline(d, kind, doc) {
    const list = $("detail-timeline");
    const last = d.events[d.events.length - 1];
    const text = timelineText(kind, doc);
    const bad = (kind === "state" && isBad(doc)) || (kind === "log" && doc.level === "error") ||
      (kind === "steps" && (doc.steps || []).some((x) => x.state === "failed"));
    if (kind === "progress" && last && last.kind === "progress") {
      setText(last.textNode, text);
      return;
    }
    if (d.events.length >= MAX_TIMELINE) { d.events.shift(); list.firstChild && list.firstChild.remove(); }
    const textNode = el("span", { class: "text", text });
    const at = timelineTime(kind, doc);
    const li = el("li", { "data-kind": kind, class: bad ? "bad" : "" },
      el("span", { class: "when mono", title: at || "", text: at ? fmtTime(at) + "." + at.slice(20, 23) : "" }),
      el("span", { class: "kind", text: kind }), textNode);
    if (kind === "state") li.dataset.state = bad ? "failed" : doc.state;
    list.append(li);
    d.events.push({ kind, textNode });
  }

  function fact(name, value) {
    return [el("dt", { text: name }), el("dd", {}, value)];
  }

  function renderDetail() {
    const d = st.detail;
    if (!d) return;
    /* The list's copy is the freshest (every stream feeds it); the detail's
     * own copy stands in when the list has dropped the job. */
    const j = st.jobs.get(d.id) || d.job;
    setText($("detail-id"), d.id);
    if (!j) { $("detail-facts").replaceChildren(...fact("error", d.error || "loading…")); return; }
    const bad = isBad(j);
    const stEl = $("detail-state");
    stEl.dataset.state = bad ? "failed" : j.state;
    setText(stEl, stateText(j));
    $("job-detail").dataset.state = j.state;
    $("job-detail").classList.toggle("bad", bad);
    const secs = jobSeconds(j);
    const res = j.result || {};
    const p = j.progress || {};
    let tput = typeof res.throughput_bytes_per_s === "number" ? res.throughput_bytes_per_s
      : secs && p.unit === "bytes" && p.done ? p.done / secs : null;
    const facts = [
      ...fact("type", j.type),
      ...fact("model", clip(j.model + (j.revision && j.revision !== "main" ? "@" + j.revision : ""), "mono")),
      ...fact("created", fmtTime(j.created_at)),
      ...fact("started", fmtTime(j.started_at)),
      ...fact("finished", fmtTime(j.finished_at)),
      ...fact("duration", fmtDuration(secs)),
      ...fact("throughput", tput ? fmtBytes(tput) + "/s" : "–"),
    ];
    if (j.parent) facts.push(...fact("step of", el("a", { class: "mono", href: "#job=" + encodeURIComponent(j.parent), text: j.parent })));
    if (res.timings) facts.push(...fact("timings", Object.entries(res.timings).map(([k, v]) => k + " " + fmtDuration(v)).join(" · ")));
    if (res.next_model) facts.push(...fact("next model", clip(res.next_model, "mono")));
    $("detail-facts").replaceChildren(...facts);
    const errBox = $("detail-error");
    if (j.error) {
      errBox.hidden = false;
      errBox.textContent = j.error.code + ": " + j.error.message;
    } else if (bad) {
      errBox.hidden = false;
      errBox.textContent = "verify: " + ((res.files || []).filter((f) => !f.ok).map((f) => f.name).join(", ") || "mismatch");
    } else {
      errBox.hidden = true;
    }
    setText($("detail-params"), JSON.stringify(j.params || {}, null, 2));
    setText($("detail-result"), j.result ? JSON.stringify(j.result, null, 2) : j.error ? "(failed)" : "(not yet)");
    const steps = Array.isArray(j.steps) ? j.steps : null;
    $("detail-steps-box").hidden = !steps;
    if (steps) {
      $("detail-steps").tBodies[0].replaceChildren(...steps.map((x) => el("tr", { "data-step": x.type, "data-state": x.state, class: x.state === "failed" ? "bad" : "" },
        el("td", { text: x.type }),
        el("td", {}, clip(x.model || "", "mono")),
        el("td", {}, el("span", { class: "state", "data-state": x.state, text: x.state })),
        el("td", {}, clip(x.reason || "")),
        el("td", {}, x.job ? el("a", { class: "mono clip step-link", href: "#job=" + encodeURIComponent(x.job), title: x.job, text: x.job }) : "–"))));
    }
  }

  function routeHash() {
    const m = /^#job=(.+)$/.exec(location.hash);
    if (m) {
      const id = decodeURIComponent(m[1]);
      if (!st.detail || st.detail.id !== id) openDetail(id);
    } else if (st.detail) {
      closeDetail(false);
    }
  }

  /* ---- throughput chart ----------------------------------------------------- */

  function sampleThroughput() {
    let sum = 0;
    for (const j of st.jobs.values())
      if (j.type === "warm_load" && j.state === "running" && j.progress && j.progress.unit === "bytes")
        sum += j.progress.rate || 0;
    st.samples.push(sum);
    if (st.samples.length > CHART_POINTS) st.samples.shift();
    drawChart();
  }

  /* The live rate of running loads as a line (sampled once a second), and
   * one bar per finished load with its own throughput: a load that takes
   * less than a second never shows in the samples, but always as a bar. */
  function drawChart() {
    const c = $("chart");
    /* Draw at the element's own size, so lines are crisp at any width. */
    const dpr = window.devicePixelRatio || 1;
    const cw = Math.max(100, Math.round(c.clientWidth * dpr)), chh = Math.round(150 * dpr);
    if (c.width !== cw || c.height !== chh) { c.width = cw; c.height = chh; }
    const ctx = c.getContext("2d");
    const w = c.width, h = c.height, pad = 4 * dpr, top = 16 * dpr;
    ctx.clearRect(0, 0, w, h);
    const liveMax = Math.max(1, ...st.samples);
    const max = Math.max(liveMax, ...st.loads.map((l) => l.bps));
    ctx.strokeStyle = "#e2e5ea";
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (let i = 1; i < 4; i++) { ctx.moveTo(0, (h * i) / 4); ctx.lineTo(w, (h * i) / 4); }
    ctx.stroke();
    const yOf = (v) => h - pad - (v / max) * (h - top - pad);
    ctx.font = 10 * dpr + "px system-ui, sans-serif";
    ctx.textAlign = "center";
    if (st.loads.length) {
      /* Few loads get wide bars; more share the width, up to MAX_BARS. */
      const slot = w / Math.max(8, st.loads.length);
      const bw = Math.max(4 * dpr, slot * 0.6);
      st.loads.forEach((l, i) => {
        const x = w - (st.loads.length - i) * slot + (slot - bw) / 2;
        const y = yOf(l.bps);
        ctx.fillStyle = "#c4b5fd";
        ctx.fillRect(x, y, bw, h - pad - y);
        ctx.fillStyle = "#4c1d95";
        ctx.fillText((l.bps / 1e9).toFixed(l.bps >= 1e10 ? 0 : l.bps >= 1e8 ? 1 : 2), x + bw / 2, Math.max(top - 2 * dpr, y - 2 * dpr));
      });
    }
    const live = st.samples.some((v) => v > 0);
    if (live) {
      ctx.strokeStyle = "#7c3aed";
      ctx.lineWidth = 2 * dpr;
      ctx.beginPath();
      st.samples.forEach((v, i) => {
        const x = w - (st.samples.length - 1 - i) * (w / (CHART_POINTS - 1));
        if (i === 0) ctx.moveTo(x, yOf(v)); else ctx.lineTo(x, yOf(v));
      });
      ctx.stroke();
    }
    ctx.textAlign = "left";
    ctx.fillStyle = "#6b7280";
    ctx.font = 11 * dpr + "px system-ui, sans-serif";
    ctx.fillText(max > 1 ? "max " + fmtBytes(max) + "/s" + (st.loads.length ? " · bars: GB/s per finished load" : "") : "0 B/s", 4 * dpr, 12 * dpr);
    if (!live && !st.loads.length) {
      ctx.textAlign = "center";
      ctx.fillText("no loads yet", w / 2, h / 2);
    }
    const now = st.samples.length ? st.samples[st.samples.length - 1] : 0;
    $("chart-legend").textContent = "now " + (now ? fmtBytes(now) + "/s" : "idle") +
      " · peak " + (liveMax > 1 ? fmtBytes(liveMax) + "/s" : "–") + " (last 2 min)" +
      (st.lastLoad !== null ? " · last load " + fmtBytes(st.lastLoad) + "/s" : "") +
      (st.loads.length ? " · " + st.loads.length + " finished load" + (st.loads.length > 1 ? "s" : "") : "");
  }

  /* ---- actions ------------------------------------------------------------ */

  async function cancelJob(id) {
    try {
      const r = await api("DELETE", "/v1/jobs/" + encodeURIComponent(id));
      if (r.status === 202 && r.doc) upsertJob(r.doc);
      else if (r.status !== 409) alert(problemText(r));
    } catch (e) { ignoreAuth(e); }
  }

  async function unload(id) {
    try {
      const r = await api("DELETE", "/v1/residents/" + encodeURIComponent(id));
      if (r.status !== 200 && r.status !== 409) alert(problemText(r));
      await Promise.all([loadResidents(), loadDevices()]);
    } catch (e) { ignoreAuth(e); }
  }

  $("job-type").addEventListener("change", renderFields);

  $("job-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const out = $("job-result");
    out.className = "";
    out.textContent = "";
    let params;
    try {
      params = JSON.parse($("job-params").value.trim() || "{}");
      if (typeof params !== "object" || params === null || Array.isArray(params)) throw new Error("not an object");
    } catch (e) {
      out.className = "bad";
      out.textContent = "params must be a JSON object";
      return;
    }
    try {
      collectFields(params);
    } catch (e) {
      out.className = "bad";
      out.textContent = e.message;
      return;
    }
    const req = { type: $("job-type").value, model: $("job-model").value.trim(), params };
    const rev = $("job-revision").value.trim();
    if (rev) req.revision = rev;
    $("job-submit").disabled = true;
    try {
      const r = await api("POST", "/v1/jobs", req);
      if (r.status === 202 || r.status === 200) {
        upsertJob(r.doc);
        out.className = "ok";
        out.textContent = "submitted " + r.doc.id;
        out.dataset.jobId = r.doc.id;
      } else {
        out.className = "bad";
        out.textContent = problemText(r);
      }
    } catch (e) {
      ignoreAuth(e);
    } finally {
      $("job-submit").disabled = false;
    }
  });

  /* ---- start -------------------------------------------------------------- */

  async function start() {
    let status;
    try {
      status = await loadVersion();
    } catch (e) {
      if (e instanceof Unauthorized) return;
      setConn("down", "server unreachable");
      setTimeout(start, 2000);
      return;
    }
    if (status !== 200) { setConn("down", "HTTP " + status); setTimeout(start, 2000); return; }
    $("auth").hidden = true;
    $("app").hidden = false;
    $("forget-token").hidden = !st.token;
    drawChart(); /* now that the canvas has a size */
    if (st.started) return;
    st.started = true;
    runStream();
    routeHash();
  }

  $("detail-close").addEventListener("click", () => closeDetail(true));
  window.addEventListener("hashchange", routeHash);
  loadSchema().catch((e) => console.warn(e));
  setInterval(() => { if (st.started) loadDevices().catch(ignoreAuth); }, 3000);
  setInterval(() => {
    if (!st.started) return;
    sampleThroughput();
    /* Durations of running jobs move on without events. */
    if (Array.from(st.jobs.values()).some((j) => j.state === "running")) schedule("jobs");
    if (st.detail) schedule("detail");
  }, 1000);
  window.addEventListener("resize", drawChart);
  start();
})();

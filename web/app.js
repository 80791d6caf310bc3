/*
 * app.js - the modelprep dashboard. Loads devices, residents and jobs over
 * the JSON API, then follows GET /v1/events (read with fetch, not
 * EventSource, so the bearer token can go in a header; resumed with
 * Last-Event-ID after a drop). Everything the server sends is put into the
 * page as text, never as HTML.
 */
"use strict";
(function () {
  const TOKEN_KEY = "modelprep.token";
  const MAX_JOBS = 200;
  const CHART_POINTS = 120; /* one per second */
  const FINAL = new Set(["succeeded", "failed", "cancelled"]);
  const HINTS = {
    download: "params: allow_patterns, ignore_patterns, load_format (auto|safetensors|pt|gguf|all), endpoint",
    convert: "params: dtype (keep|bf16|fp16|fp32), max_shard_bytes, output",
    inspect: "params: tp_sizes (default [1,2,4,8])",
    shard: "params: tp_size, max_part_bytes, output",
    warm_load: "params: load_format, devices, tp_size, dtype, decryption_key_file, dummy {low,high,seed}, keep_resident",
    verify: "no params: re-hashes the model's files; a mismatch fails the job (checksum_mismatch), a first run only records hashes",
  };

  const st = {
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    jobs: new Map(),        /* id -> job object */
    residents: [],
    devices: [],
    lastEventId: 0,
    stream: null,           /* AbortController of the event stream */
    samples: [],            /* load throughput, bytes/s, one per second */
    lastLoad: null,         /* throughput of the last finished warm_load */
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
        typeof doc.result.throughput_bytes_per_s === "number")
      st.lastLoad = doc.result.throughput_bytes_per_s;
    trimJobs();
    schedule("jobs");
  }

  function applyProgress(p) {
    const job = st.jobs.get(p.id);
    if (!job || FINAL.has(job.state)) return;
    job.progress = { done: p.done, total: p.total, unit: p.unit, rate: p.rate, message: p.message };
    schedule("jobs");
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

  function reloadAll() {
    return Promise.all([loadJobs(), loadResidents(), loadDevices()]).catch(ignoreAuth);
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
        loadDevices().catch(ignoreAuth);
        break;
      case "resync":
        /* The server could not replay everything we missed. */
        reloadAll();
        break;
    }
  }

  /* Parses text/event-stream blocks: "id:", "event:", "data:" lines. */
  function handleBlock(block) {
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
    if (data.length || id) handleEvent(kind, id, data.join("\n"));
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
        const reader = r.body.getReader();
        const dec = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
          let i;
          while ((i = buf.indexOf("\n\n")) >= 0) {
            handleBlock(buf.slice(0, i));
            buf = buf.slice(i + 2);
          }
        }
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
    r.cells = [0, 1, 2, 3, 4, 5, 6, 7].map(() => el("td"));
    r.cells[0].className = "mono";
    r.cells[2].className = "mono";
    r.cells[5].className = "rate";
    r.cells[6].className = "msg";
    r.cells[3].append(r.state);
    r.cells[4].append(el("div", { class: "bar" }, r.fill, r.plabel));
    r.cells[7].append(r.cancel);
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
    if (r.tr.dataset.state !== j.state) r.tr.dataset.state = j.state;
    setText(r.cells[0], j.id);
    r.cells[0].title = j.created_at || "";
    setText(r.cells[1], j.type);
    setText(r.cells[2], j.model + (j.revision && j.revision !== "main" ? "@" + j.revision : ""));
    r.state.dataset.state = j.state;
    setText(r.state, j.state);
    r.fill.style.width = (frac * 100).toFixed(1) + "%";
    setText(r.plabel, plabel);
    setText(r.cells[5], live ? fmtRate(p.rate, p.unit) : "");
    setText(r.cells[6], msg);
    r.cells[6].title = msg;
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
      el("td", { class: "mono", text: r.id }),
      el("td", { class: "mono", text: r.model }),
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

  function sampleThroughput() {
    let sum = 0;
    for (const j of st.jobs.values())
      if (j.type === "warm_load" && j.state === "running" && j.progress && j.progress.unit === "bytes")
        sum += j.progress.rate || 0;
    st.samples.push(sum);
    if (st.samples.length > CHART_POINTS) st.samples.shift();
    drawChart();
  }

  function drawChart() {
    const c = $("chart");
    /* Draw at the element's own size, so the line is crisp at any width. */
    const dpr = window.devicePixelRatio || 1;
    const cw = Math.max(100, Math.round(c.clientWidth * dpr)), chh = Math.round(150 * dpr);
    if (c.width !== cw || c.height !== chh) { c.width = cw; c.height = chh; }
    const ctx = c.getContext("2d");
    const w = c.width, h = c.height, pad = 4 * dpr;
    ctx.clearRect(0, 0, w, h);
    const max = Math.max(1, ...st.samples);
    ctx.strokeStyle = "#e2e5ea";
    ctx.beginPath();
    for (let i = 1; i < 4; i++) { ctx.moveTo(0, (h * i) / 4); ctx.lineTo(w, (h * i) / 4); }
    ctx.stroke();
    ctx.strokeStyle = "#7c3aed";
    ctx.lineWidth = 2 * dpr;
    ctx.beginPath();
    st.samples.forEach((v, i) => {
      const x = w - (st.samples.length - 1 - i) * (w / (CHART_POINTS - 1));
      const y = h - pad - (v / max) * (h - 2 * pad);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
    ctx.fillStyle = "#6b7280";
    ctx.font = 11 * dpr + "px system-ui, sans-serif";
    ctx.fillText(max > 1 ? fmtBytes(max) + "/s" : "0 B/s", 4 * dpr, 12 * dpr);
    const now = st.samples.length ? st.samples[st.samples.length - 1] : 0;
    $("chart-legend").textContent = "now " + (now ? fmtBytes(now) + "/s" : "idle") +
      " · peak " + (max > 1 ? fmtBytes(max) + "/s" : "–") + " (last 2 min)" +
      (st.lastLoad !== null ? " · last load " + fmtBytes(st.lastLoad) + "/s" : "");
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

  $("job-type").addEventListener("change", () => { $("job-hint").textContent = HINTS[$("job-type").value] || ""; });

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
  }

  $("job-hint").textContent = HINTS[$("job-type").value] || "";
  setInterval(() => { if (st.started) loadDevices().catch(ignoreAuth); }, 3000);
  setInterval(() => { if (st.started) sampleThroughput(); }, 1000);
  window.addEventListener("resize", drawChart);
  start();
})();

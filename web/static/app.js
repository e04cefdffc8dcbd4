/* stackwatch web view. Vanilla JS, no build step; charts by the vendored uPlot.
 * Data flow: catch up from the JSON API, then apply WebSocket events; on any disconnect show the
 * banner, reconnect with backoff and catch up again. */
"use strict";

(function () {
  const $ = (sel) => document.querySelector(sel);
  const state = {
    status: null,
    frames: new Map(),       // id -> record
    stacks: [],
    composites: [],
    masters: [],
    selected: null,          // {kind: "stack"|"composite", id}
    version: {},             // stack id -> version
    updates: {},             // stack id -> stack_updated events seen
    stretch: "linked",
    strength: 1,
    layer: "image",
    sort: { key: "id", dir: -1 },
    filter: "all",
    online: false,
    fresh: new Set(),
    previewInfo: null,       // histogram JSON of the current preview (source size etc.)
  };
  const charts = {};
  let histChart = null;
  let ws = null;
  let retryMs = 500;
  let catchingUp = null;
  const METRICS = ["fwhm_px", "eccentricity", "background", "stars", "scale", "weight"];

  // ------------------------------------------------------------------ helpers
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    if (attrs) for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("data-")) e.setAttribute(k, v);
      else e[k] = v;
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  function num(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (typeof v !== "number") return String(v);
    if (digits === "int") return String(Math.round(v));
    if (digits === "sig") return Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : v.toPrecision(3);
    return v.toFixed(digits);
  }
  function timeOf(rec) {
    const t = rec.time ? Date.parse(rec.time.endsWith("Z") || /[+-]\d\d:?\d\d$/.test(rec.time) ? rec.time : rec.time + "Z") : NaN;
    return Number.isFinite(t) ? t / 1000 : null;
  }
  function hhmm(rec) {
    const t = timeOf(rec);
    if (t === null) return "–";
    const d = new Date(t * 1000);
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }
  let toastTimer = null;
  function toast(msg, isError) {
    const t = $("#toast");
    t.textContent = msg;
    t.className = "toast" + (isError ? " error" : "");
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.hidden = true; }, 4000);
  }
  async function api(path) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), 10000);
    try {
      const r = await fetch(path, { signal: ctl.signal, cache: "no-store" });
      if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
      return await r.json();
    } finally { clearTimeout(timer); }
  }
  async function post(path, body) {
    const token = localStorage.getItem("stackwatch-token") || "";
    const r = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Stackwatch-Token": token },
      body: JSON.stringify(body || {}),
    });
    let data = {};
    try { data = await r.json(); } catch (e) { /* empty body */ }
    if (!r.ok) throw new Error(data.error || `HTTP ${r.status}`);
    return data;
  }
  function throttle(fn, ms) {
    let timer = null, again = false;
    return function run() {
      if (timer) { again = true; return; }
      fn();
      timer = setTimeout(() => { timer = null; if (again) { again = false; run(); } }, ms);
    };
  }
  function onFrame(fn) {
    let queued = false;
    return () => { if (!queued) { queued = true; requestAnimationFrame(() => { queued = false; fn(); }); } };
  }

  // ------------------------------------------------------------------ connection
  function setOnline(on) {
    state.online = on;
    $("#banner").hidden = on;
    const c = $("#conn");
    c.textContent = on ? "live" : "offline";
    c.className = "conn " + (on ? "online" : "offline");
    document.body.dataset.online = on ? "1" : "0";
  }
  function connect() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    try { ws = new WebSocket(`${proto}//${location.host}/ws`); } catch (e) { scheduleReconnect(); return; }
    ws.onopen = () => { retryMs = 500; };
    ws.onmessage = (msg) => {
      let ev;
      try { ev = JSON.parse(msg.data); } catch (e) { return; }
      handleEvent(ev);
    };
    ws.onclose = () => { ws = null; setOnline(false); scheduleReconnect(); };
    ws.onerror = () => { /* onclose follows */ };
  }
  function scheduleReconnect() {
    setTimeout(connect, retryMs);
    retryMs = Math.min(5000, retryMs * 1.6);
  }
  async function catchUp() {
    if (catchingUp) return catchingUp;
    catchingUp = (async () => {
      try {
        const [status, stacks, masters] = await Promise.all([api("/api/status"), api("/api/stacks"), api("/api/masters")]);
        const frames = new Map();
        for (let offset = 0; offset < 100000; offset += 1000) {
          const page = await api(`/api/frames?offset=${offset}&limit=1000`);
          for (const f of page.frames) frames.set(f.id, f);
          framesTotal = page.total;
          if (page.frames.length < 1000 || offset + 1000 >= page.total) break;
        }
        state.frames = frames;
        applyStatus(status);
        applyStacks(stacks.stacks, stacks.composites);
        state.masters = masters.masters;
        renderMasters();
        renderFrames();
        renderCharts();
        setOnline(true);
      } catch (e) {
        setOnline(false);
        if (ws) try { ws.close(); } catch (e2) { /* closing anyway */ }
      } finally { catchingUp = null; }
    })();
    return catchingUp;
  }

  // ------------------------------------------------------------------ events
  const refreshStatus = throttle(() => { api("/api/status").then(applyStatus).catch(() => {}); }, 1000);
  const refreshStacks = throttle(() => {
    api("/api/stacks").then((d) => applyStacks(d.stacks, d.composites)).catch(() => {});
  }, 1000);
  let framesTotal = 0;
  const refreshTail = throttle(async () => {
    // The newest records (the list is oldest first): re-read the last few and anything after.
    try {
      const offset = Math.max(0, framesTotal - 10);
      const page = await api(`/api/frames?offset=${offset}&limit=1000`);
      framesTotal = page.total;
      if (page.total > offset + page.frames.length) { catchUp(); return; }
      for (const f of page.frames) {
        if (!state.frames.has(f.id)) state.fresh.add(f.id);
        state.frames.set(f.id, f);
      }
      renderFramesSoon();
      renderChartsSoon();
    } catch (e) { /* the next event or reconnect retries */ }
  }, 500);
  const renderFramesSoon = onFrame(() => { renderFrames(); });
  const renderChartsSoon = throttle(onFrame(() => renderCharts()), 500);

  function handleEvent(ev) {
    const d = ev.data || {};
    switch (ev.type) {
      case "hello":
        catchUp();
        break;
      case "resync":
        catchUp();
        break;
      case "frame_received":
        refreshStatus();
        if (d.name) $("#activity").textContent = `received ${d.name}`;
        break;
      case "frame_processed":
        if (d.id !== undefined) {
          if (!state.frames.has(d.id)) state.fresh.add(d.id);
          // Events may carry the whole record or only the verdict: merge, then fetch the metrics.
          state.frames.set(d.id, Object.assign({}, state.frames.get(d.id) || {}, d));
          if (!("fwhm_px" in d)) refreshTail();
          renderFramesSoon();
          renderChartsSoon();
        }
        refreshStatus();
        break;
      case "stack_updated": {
        const s = state.stacks.find((x) => x.id === d.id);
        if (s) Object.assign(s, d);
        refreshStacks();  // exposure, reference and composites come with the list
        if (d.version !== undefined) state.version[d.id] = d.version;
        state.updates[d.id] = (state.updates[d.id] || 0) + 1;  // reloads even if no version is sent
        if (!state.selected) selectStack({ kind: "stack", id: d.id });
        else if (state.selected.kind === "stack" && state.selected.id === d.id) loadPreview();
        else if (state.selected.kind === "composite") loadPreview();
        renderStackList();
        refreshStatus();
        break;
      }
      case "master_updated":
        api("/api/masters").then((m) => { state.masters = m.masters; renderMasters(); }).catch(() => {});
        refreshStatus();
        break;
      case "warning":
        addWarning(d.message || JSON.stringify(d));
        break;
      case "status":
        applyStatus(Object.assign({}, state.status || {}, d));
        break;
      default:
        break;
    }
  }

  // ------------------------------------------------------------------ status and warnings
  function applyStatus(s) {
    if (!s) return;
    state.status = s;
    const f = s.frames || {};
    for (const dd of document.querySelectorAll("#counts dd")) {
      const k = dd.dataset.k;
      if (k === "lag") dd.textContent = s.queue && s.queue.lag_s !== null && s.queue.lag_s !== undefined ? `${num(s.queue.lag_s, 1)} s` : "–";
      else dd.textContent = f[k] !== undefined ? String(f[k]) : "–";
    }
    $("#activity").textContent = s.activity || "";
    const ul = $("#warnings");
    ul.replaceChildren(...(s.warnings || []).slice(-5).map((w) => el("li", { text: w })));
    const lib = s.library || {};
    const parts = Object.entries(lib).filter(([, v]) => typeof v === "number").map(([k, v]) => `${k} ${v}`);
    $("#library-summary").textContent = parts.length ? `(${parts.join(", ")})` : "";
    if (s.server) $("#reintegrate").disabled = !s.server.actions;
  }
  function addWarning(msg) {
    const ul = $("#warnings");
    ul.append(el("li", { text: msg }));
    while (ul.children.length > 5) ul.firstChild.remove();
  }

  // ------------------------------------------------------------------ stacks and preview
  function applyStacks(stacks, composites) {
    state.stacks = stacks || [];
    state.composites = composites || [];
    for (const s of state.stacks) if (s.version !== undefined) state.version[s.id] = s.version;
    if (!state.selected && state.stacks.length) {
      const withFrames = state.stacks.filter((s) => (s.ncombine || 0) > 0);
      const pick = (withFrames.length ? withFrames : state.stacks)[0];
      selectStack({ kind: "stack", id: pick.id });
    } else {
      loadPreview();
    }
    renderStackList();
  }
  function stackLabel(s) {
    const exp = s.exposure_s ? ` · ${(s.exposure_s / 60).toFixed(s.exposure_s >= 600 ? 0 : 1)} min` : "";
    return `${s.target || "?"} · ${s.filter || "–"} · ${s.ncombine || 0}×${exp}`;
  }
  function renderStackList() {
    const box = $("#stack-list");
    const sel = state.selected || {};
    const buttons = state.stacks.map((s) => el("button", {
      type: "button", text: stackLabel(s), "data-id": s.id,
      class: sel.kind === "stack" && sel.id === s.id ? "selected" : "",
      onclick: () => selectStack({ kind: "stack", id: s.id }),
    }));
    for (const c of state.composites) {
      buttons.push(el("button", {
        type: "button", text: `${c.target} · ${c.palette} colour`, "data-id": c.id,
        class: "composite" + (sel.kind === "composite" && sel.id === c.id ? " selected" : ""),
        onclick: () => selectStack({ kind: "composite", id: c.id }),
      }));
    }
    box.replaceChildren(...buttons);
    renderStackInfo();
  }
  function renderStackInfo() {
    const sel = state.selected;
    const info = $("#stack-info");
    const dl = $("#downloads");
    if (!sel) { info.replaceChildren(); dl.replaceChildren(); return; }
    if (sel.kind === "composite") {
      const c = state.composites.find((x) => x.id === sel.id);
      info.replaceChildren(el("p", { class: "hint", text: c ? `${c.palette} composite of ${c.members.join(", ")} (${c.channels.join(", ")})` : "" }));
      dl.replaceChildren();
      return;
    }
    const s = state.stacks.find((x) => x.id === sel.id) || {};
    const rows = [["target", s.target], ["filter", s.filter], ["frames", s.ncombine],
      ["exposure", s.exposure_s ? `${(s.exposure_s / 3600).toFixed(2)} h` : "–"], ["reference", s.reference],
      ["integration", s.exact === undefined ? undefined : s.exact ? "exact (the batch result)" : "live (exact pass pending)"], ["version", s.version]];
    info.replaceChildren(el("dl", null, ...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v === undefined || v === null ? "–" : String(v) })])));
    const base = `/api/stacks/${encodeURIComponent(s.id)}/fits`;
    dl.replaceChildren(
      el("a", { href: `${base}?product=image`, download: "", text: "⤓ stack FITS" }),
      el("a", { href: `${base}?product=rej_low`, download: "", text: "⤓ low rejection" }),
      el("a", { href: `${base}?product=rej_high`, download: "", text: "⤓ high rejection" }),
      el("a", { href: `${base}?product=coverage`, download: "", text: "⤓ coverage" }),
    );
  }
  function selectStack(sel) {
    state.selected = sel;
    $("#crop-box").hidden = true;
    resetView();
    renderStackList();
    loadPreview();
    if (state.filter === "stack") renderFrames();
  }
  function previewSize() {
    const w = $("#viewer").clientWidth || 800;
    const want = w * (window.devicePixelRatio || 1) * 1.5;
    return want > 1400 ? 2048 : want > 700 ? 1024 : 512;
  }
  function previewBase() {
    const sel = state.selected;
    if (!sel) return null;
    return sel.kind === "composite" ? `/api/composites/${encodeURIComponent(sel.id)}` : `/api/stacks/${encodeURIComponent(sel.id)}`;
  }
  function previewQuery() {
    const layer = state.selected && state.selected.kind === "composite" ? "image" : state.layer;
    const v = state.selected && state.selected.kind === "stack" ? (state.version[state.selected.id] || 0) :
      state.stacks.reduce((a, s) => a + (s.version || 0), 0);
    const u = Object.values(state.updates).reduce((a, b) => a + b, 0);
    return `size=${previewSize()}&stretch=${state.stretch}&strength=${state.strength}&layer=${layer}&v=${v}&u=${u}`;
  }
  let previewSeq = 0;
  function loadPreview() {
    const base = previewBase();
    if (!base) return;
    const url = `${base}/preview?${previewQuery()}`;
    const img = $("#preview");
    if (img.dataset.src === url) return;
    const seq = ++previewSeq;
    const pre = new Image();
    pre.onload = () => {
      if (seq !== previewSeq) return;
      img.src = url;
      img.dataset.src = url;
      img.dataset.version = String(state.selected && state.selected.kind === "stack" ? state.version[state.selected.id] || 0 : seq);
      $("#viewer-empty").hidden = true;
      loadHistogram(`${base}/histogram?${previewQuery()}`);
    };
    pre.onerror = () => {
      if (seq !== previewSeq) return;
      const empty = $("#viewer-empty");
      empty.textContent = state.layer !== "image" ? "This stack has no such map (yet)." : "Waiting for the first stacked frame…";
      empty.hidden = false;
      img.removeAttribute("src");
      delete img.dataset.src;
    };
    pre.src = url;
  }
  async function loadHistogram(url) {
    try {
      const h = await api(url);
      state.previewInfo = h;
      $("#viewer-caption").textContent = `${h.source_width}×${h.source_height} px, preview 1:${h.factor} · click for 1:1`;
      renderHistogram(h);
    } catch (e) { /* the next update retries */ }
  }
  function renderHistogram(h) {
    const box = $("#histogram");
    if (typeof uPlot === "undefined") return;
    const xs = Array.from({ length: 256 }, (_, i) => i / 255);
    const colours = h.histogram.length === 3 ? ["#ff6b6b", "#5fcf80", "#6cb6ff"] : ["#d8dee9"];
    const names = h.histogram.length === 3 ? ["R", "G", "B"] : ["L"];
    const data = [xs, ...h.histogram.map((c) => c.map((v) => v + 1))];
    const width = Math.max(200, box.clientWidth || 300);
    if (!histChart || histChart.series.length !== data.length) {
      if (histChart) histChart.destroy();
      histChart = new uPlot({
        width, height: 120, legend: { show: false }, cursor: { show: false },
        scales: { x: { time: false, range: [0, 1] }, y: { distr: 3 } },
        axes: [{ stroke: "#8a94a6", grid: { stroke: "#2a3342" }, size: 24 }, { show: false }],
        series: [{}, ...colours.map((c, i) => ({ label: names[i], stroke: c, width: 1, fill: c + "22", points: { show: false } }))],
      }, data, box);
    } else {
      histChart.setData(data);
    }
  }

  // pan / zoom / crop
  const view = { s: 1, tx: 0, ty: 0 };
  const pointers = new Map();
  let drag = null;
  function applyView() {
    const img = $("#preview");
    img.style.transform = `translate(${view.tx}px, ${view.ty}px) scale(${view.s})`;
    img.classList.toggle("pixelated", view.s > 3);
  }
  function resetView() { view.s = 1; view.tx = 0; view.ty = 0; applyView(); }
  function zoomAt(factor, cx, cy) {
    const s2 = Math.min(40, Math.max(1, view.s * factor));
    const k = s2 / view.s;
    view.tx = cx - k * (cx - view.tx);
    view.ty = cy - k * (cy - view.ty);
    view.s = s2;
    if (view.s === 1) { view.tx = 0; view.ty = 0; }
    applyView();
  }
  function setupViewer() {
    const v = $("#viewer");
    v.addEventListener("wheel", (e) => {
      e.preventDefault();
      const r = v.getBoundingClientRect();
      zoomAt(e.deltaY < 0 ? 1.25 : 0.8, e.clientX - r.left, e.clientY - r.top);
    }, { passive: false });
    v.addEventListener("pointerdown", (e) => {
      v.setPointerCapture(e.pointerId);
      pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
      drag = { x: e.clientX, y: e.clientY, moved: 0, pinch: pointers.size > 1 };
    });
    v.addEventListener("pointermove", (e) => {
      if (!pointers.has(e.pointerId) || !drag) return;
      const prev = pointers.get(e.pointerId);
      if (pointers.size === 2) {
        const [a, b] = [...pointers.values()];
        const d0 = Math.hypot(a.x - b.x, a.y - b.y);
        pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
        const [a2, b2] = [...pointers.values()];
        const d1 = Math.hypot(a2.x - b2.x, a2.y - b2.y);
        const r = v.getBoundingClientRect();
        if (d0 > 0) zoomAt(d1 / d0, (a2.x + b2.x) / 2 - r.left, (a2.y + b2.y) / 2 - r.top);
        drag.moved += 10;
        return;
      }
      const dx = e.clientX - prev.x, dy = e.clientY - prev.y;
      pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
      drag.moved += Math.abs(dx) + Math.abs(dy);
      if (view.s > 1) { view.tx += dx; view.ty += dy; applyView(); }
    });
    const end = (e) => {
      const wasClick = drag && drag.moved < 5 && !drag.pinch && pointers.size === 1 && e.type === "pointerup";
      pointers.delete(e.pointerId);
      if (wasClick) showCrop(e.clientX, e.clientY);
      if (pointers.size === 0) drag = null;
    };
    v.addEventListener("pointerup", end);
    v.addEventListener("pointercancel", end);
    $("#zoom-in").onclick = () => { const v2 = $("#viewer"); zoomAt(1.5, v2.clientWidth / 2, v2.clientHeight / 2); };
    $("#zoom-out").onclick = () => { const v2 = $("#viewer"); zoomAt(1 / 1.5, v2.clientWidth / 2, v2.clientHeight / 2); };
    $("#zoom-fit").onclick = resetView;
    v.addEventListener("keydown", (e) => {
      const cx = v.clientWidth / 2, cy = v.clientHeight / 2;
      if (e.key === "+" || e.key === "=") zoomAt(1.5, cx, cy);
      else if (e.key === "-") zoomAt(1 / 1.5, cx, cy);
      else if (e.key === "0") resetView();
      else if (e.key.startsWith("Arrow") && view.s > 1) {
        const step = 40;
        view.tx += e.key === "ArrowLeft" ? step : e.key === "ArrowRight" ? -step : 0;
        view.ty += e.key === "ArrowUp" ? step : e.key === "ArrowDown" ? -step : 0;
        applyView();
      } else return;
      e.preventDefault();
    });
  }
  async function showCrop(clientX, clientY) {
    const sel = state.selected;
    const info = state.previewInfo;
    if (!sel || sel.kind !== "stack" || !info || state.layer !== "image") return;
    const r = $("#preview").getBoundingClientRect();
    if (r.width <= 0) return;
    const fx = (clientX - r.left) / r.width, fy = (clientY - r.top) / r.height;
    if (fx < 0 || fy < 0 || fx > 1 || fy > 1) return;
    const W = info.source_width, H = info.source_height, size = 256;
    const x = Math.max(0, Math.min(W - 1, Math.round(fx * W - size / 2)));
    const y = Math.max(0, Math.min(H - 1, Math.round(fy * H - size / 2)));
    const url = `/api/stacks/${encodeURIComponent(sel.id)}/crop?x=${x}&y=${y}&w=${size}&h=${size}&stretch=${state.stretch}&strength=${state.strength}`;
    const img = $("#crop");
    img.onload = () => { $("#crop-box").hidden = false; };
    img.onerror = () => toast("crop not available", true);
    img.src = url;
    $("#crop-caption").textContent = `x ${x}–${Math.min(W, x + size)}, y ${y}–${Math.min(H, y + size)}`;
  }

  // ------------------------------------------------------------------ frame table
  const COLS = [
    ["id", (f) => String(f.id), "num"],
    ["time", hhmm, ""],
    ["target", (f) => f.target || "–", ""],
    ["filter", (f) => f.filter || "–", ""],
    ["exposure_s", (f) => num(f.exposure_s, "sig"), "num"],
    ["fwhm_px", (f) => num(f.fwhm_px, 2), "num"],
    ["fwhm_arcsec", (f) => num(f.fwhm_arcsec, 2), "num"],
    ["eccentricity", (f) => num(f.eccentricity, 2), "num"],
    ["stars", (f) => num(f.stars, "int"), "num"],
    ["background", (f) => num(f.background, "sig"), "num"],
    ["noise", (f) => num(f.noise, "sig"), "num"],
    ["weight", (f) => num(f.weight, 2), "num"],
    ["scale", (f) => num(f.scale, 3), "num"],
  ];
  function mastersText(m) {
    if (!m || typeof m !== "object") return "–";
    return Object.entries(m).map(([k, v]) => `${k}: ${String(v).split(" (")[0]}`).join(", ") || "–";
  }
  function isLight(f) { return f.kind === undefined || f.kind === null || f.kind === "light"; }
  function visibleFrames() {
    const flt = state.filter;
    let list = [...state.frames.values()].filter((f) => (flt === "calibration") !== isLight(f));
    if (flt === "calibration") { /* calibration files only */ } else if (flt === "stack") list = list.filter((f) => state.selected && f.stack_id === state.selected.id);
    else if (flt !== "all") list = list.filter((f) => f.status === flt);
    const { key, dir } = state.sort;
    const val = (f) => (key === "time" ? timeOf(f) : key === "masters" ? mastersText(f.masters) : f[key]);
    list.sort((a, b) => {
      const va = val(a), vb = val(b);
      const na = va === null || va === undefined, nb = vb === null || vb === undefined;
      if (na || nb) return na === nb ? a.id - b.id : na ? 1 : -1;
      if (va < vb) return -dir;
      if (va > vb) return dir;
      return (a.id - b.id) * dir;
    });
    return list;
  }
  function renderFrames() {
    const list = visibleFrames();
    const rows = list.map((f) => {
      const status = f.excluded ? "excluded" : (f.status || "pending");
      const tr = el("tr", { class: `${f.status || ""}${f.excluded ? " excluded" : ""}${state.fresh.has(f.id) ? " fresh" : ""}`, "data-id": String(f.id) });
      const cell = ([key, fmt, cls]) => el("td", { class: cls, text: fmt(f), "data-k": key });
      const st = el("td", { class: `status ${f.status || ""}` }, el("span", { text: status }));
      if (f.reason) st.append(el("div", { class: "reason", text: f.reason }));
      tr.append(...COLS.slice(0, 2).map(cell), st, ...COLS.slice(2).map(cell));
      tr.append(el("td", { class: "masters", text: mastersText(f.masters), title: f.masters ? Object.entries(f.masters).map(([k, v]) => `${k}: ${v}`).join("\n") : "" }));
      tr.onclick = () => showFrame(f.id);
      return tr;
    });
    $("#frame-table tbody").replaceChildren(...rows);
    state.fresh.clear();
    const lights = [...state.frames.values()].filter(isLight);
    const rejected = lights.filter((f) => f.status === "rejected").length;
    $("#frame-count").textContent = `(${list.length} shown, ${lights.length} lights, ${rejected} rejected)`;
    for (const th of document.querySelectorAll("#frame-table th")) {
      th.classList.toggle("sorted-asc", th.dataset.key === state.sort.key && state.sort.dir > 0);
      th.classList.toggle("sorted-desc", th.dataset.key === state.sort.key && state.sort.dir < 0);
    }
  }
  function setupTable() {
    for (const th of document.querySelectorAll("#frame-table th")) {
      th.onclick = () => {
        const key = th.dataset.key;
        state.sort = state.sort.key === key ? { key, dir: -state.sort.dir } : { key, dir: 1 };
        renderFrames();
      };
    }
    $("#frame-filter").onchange = (e) => { state.filter = e.target.value; renderFrames(); };
  }
  let dialogFrame = null;
  function showFrame(id) {
    const f = state.frames.get(id);
    if (!f) return;
    dialogFrame = id;
    $("#fd-title").textContent = `#${f.id} ${f.name || ""}`;
    const rows = [
      ["status", f.excluded ? `${f.status} (excluded by you)` : f.status],
      ["reason", f.reason || "–"],
      ["time", f.time || "–"], ["target", f.target], ["filter", f.filter], ["exposure", `${num(f.exposure_s, "sig")} s`],
      ["FWHM", `${num(f.fwhm_px, 2)} px · ${num(f.fwhm_arcsec, 2)}″`], ["eccentricity", num(f.eccentricity, 3)],
      ["stars", num(f.stars, "int")], ["background", num(f.background, "sig")], ["noise", num(f.noise, "sig")],
      ["weight", num(f.weight, 3)], ["scale", num(f.scale, 4)],
      ["transform", Array.isArray(f.transform) ? f.transform.map((r) => r.map((v) => num(v, 3)).join("  ")).join("  |  ") : "–"],
      ["stack", f.stack_id || "–"], ["path", f.path || "–"],
    ];
    const dl = el("dl", null, ...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v === undefined || v === null ? "–" : String(v), class: k === "reason" && f.reason ? "reason" : "" })]));
    const masters = f.masters && Object.keys(f.masters).length
      ? el("dl", null, ...Object.entries(f.masters).flatMap(([k, v]) => [el("dt", { text: `master ${k}` }), el("dd", { text: String(v) })]))
      : el("p", { class: "hint", text: "no masters used" });
    $("#fd-body").replaceChildren(dl, masters);
    $("#fd-exclude").textContent = f.excluded ? "Include again" : "Exclude from the stack";
    $("#fd-reference").disabled = f.status !== "stacked" || !f.stack_id;
    const d = $("#frame-dialog");
    if (!d.open) d.showModal();
  }
  function setupDialog() {
    $("#fd-close").onclick = () => $("#frame-dialog").close();
    $("#frame-dialog").addEventListener("click", (e) => { if (e.target === e.currentTarget) e.currentTarget.close(); });
    $("#fd-exclude").onclick = async () => {
      const f = state.frames.get(dialogFrame);
      if (!f) return;
      try {
        await post(`/api/frames/${f.id}/exclude`, { excluded: !f.excluded });
        f.excluded = !f.excluded;
        renderFrames();
        showFrame(f.id);
        toast(f.excluded ? `frame ${f.id} excluded` : `frame ${f.id} included`);
      } catch (e) { toast(e.message, true); }
    };
    $("#fd-reference").onclick = async () => {
      const f = state.frames.get(dialogFrame);
      if (!f) return;
      try {
        await post(`/api/stacks/${encodeURIComponent(f.stack_id)}/reference`, { frame_id: f.id });
        toast(`frame ${f.id} is the new reference`);
        refreshStacks();
      } catch (e) { toast(e.message, true); }
    };
  }

  // ------------------------------------------------------------------ charts
  function chartData(metric) {
    const list = [...state.frames.values()].filter((f) => isLight(f) && timeOf(f) !== null).sort((a, b) => timeOf(a) - timeOf(b));
    const xs = [], good = [], bad = [];
    for (const f of list) {
      const v = f[metric];
      if (v === null || v === undefined || Number.isNaN(v)) continue;
      xs.push(timeOf(f));
      const isBad = f.status === "rejected" || f.status === "failed" || f.excluded;
      good.push(isBad ? null : v);
      bad.push(isBad ? v : null);
    }
    return [xs, good, bad];
  }
  function renderCharts() {
    if (typeof uPlot === "undefined") return;
    for (const div of document.querySelectorAll(".chart")) {
      const metric = div.dataset.metric;
      const data = chartData(metric);
      const width = Math.max(200, div.clientWidth || 300);
      if (!charts[metric]) {
        charts[metric] = new uPlot({
          width, height: 150,
          legend: { show: false },
          scales: { x: { time: true } },
          axes: [
            { stroke: "#8a94a6", grid: { stroke: "#2a3342" }, ticks: { stroke: "#2a3342" }, size: 28 },
            { stroke: "#8a94a6", grid: { stroke: "#2a3342" }, ticks: { stroke: "#2a3342" }, size: 48 },
          ],
          series: [
            {},
            { label: "stacked", stroke: "#6cb6ff", width: 1.5, spanGaps: true, points: { show: true, size: 5, fill: "#6cb6ff" } },
            { label: "rejected", stroke: "#ff6b6b", width: 0, paths: () => null, points: { show: true, size: 7, fill: "#ff6b6b", stroke: "#ff6b6b" } },
          ],
        }, data, div);
      } else {
        charts[metric].setData(data);
      }
    }
  }
  function resizeCharts() {
    for (const div of document.querySelectorAll(".chart")) {
      const c = charts[div.dataset.metric];
      if (c && div.clientWidth) c.setSize({ width: div.clientWidth, height: 150 });
    }
    const hb = $("#histogram");
    if (histChart && hb.clientWidth) histChart.setSize({ width: hb.clientWidth, height: 120 });
  }

  // ------------------------------------------------------------------ library
  function masterKey(m) {
    const parts = [];
    if (m.filter) parts.push(`filter ${m.filter}`);
    if (m.exposure_s !== undefined && m.exposure_s !== null && m.kind !== "bias") parts.push(`${num(m.exposure_s, "sig")} s`);
    if (m.gain !== undefined && m.gain !== null) parts.push(`gain ${m.gain}`);
    if (m.offset !== undefined && m.offset !== null) parts.push(`offset ${m.offset}`);
    if (m.temperature_c !== undefined && m.temperature_c !== null) parts.push(`${num(m.temperature_c, 1)} °C`);
    if (m.binning) parts.push(`bin ${Array.isArray(m.binning) ? m.binning.join("×") : m.binning}`);
    if (!parts.length) {  // an unfamiliar record: show its other plain fields
      for (const [k, v] of Object.entries(m)) {
        if (["id", "kind", "name", "path", "camera", "ncombine", "age_days", "members"].includes(k)) continue;
        if (typeof v === "number" || (typeof v === "string" && v.length < 40)) parts.push(`${k} ${typeof v === "number" ? num(v, "sig") : v}`);
        if (parts.length >= 6) break;
      }
    }
    return parts.join(" · ") || "–";
  }
  function masterCount(m) {
    if (typeof m.ncombine === "number") return m.ncombine;
    if (typeof m.n === "number") return m.n;
    if (Array.isArray(m.members)) return m.members.length;
    return typeof m.members === "number" ? m.members : null;
  }
  function renderMasters() {
    const rows = state.masters.map((m) => el("tr", null,
      el("td", { text: m.kind || "–" }), el("td", { text: m.camera || "–" }), el("td", { text: masterKey(m) }),
      el("td", { class: "num", text: num(masterCount(m), "int") }),
      el("td", { class: "num", text: m.age_days === undefined || m.age_days === null ? "–" : `${num(m.age_days, 1)} d` }),
      el("td", { text: m.name || (m.path ? String(m.path).split("/").pop() : null) || m.id || "–" })));
    $("#masters tbody").replaceChildren(...rows);
  }

  // ------------------------------------------------------------------ settings
  function setupControls() {
    $("#stretch").onchange = (e) => { state.stretch = e.target.value; loadPreview(); };
    $("#layer").onchange = (e) => { state.layer = e.target.value; $("#crop-box").hidden = true; loadPreview(); };
    const strength = $("#strength");
    const apply = throttle(() => loadPreview(), 300);
    strength.oninput = () => {
      state.strength = Number(strength.value);
      $("#strength-out").textContent = state.strength.toFixed(2);
      apply();
    };
    // A link such as http://host:8080/#token=... (printed by the service) stores the token once.
    const m = /^#token=([^&]+)/.exec(location.hash);
    if (m) {
      localStorage.setItem("stackwatch-token", decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname + location.search);
      toast("token saved in this browser");
    }
    $("#token").value = localStorage.getItem("stackwatch-token") || "";
    $("#token-form").onsubmit = (e) => {
      e.preventDefault();
      localStorage.setItem("stackwatch-token", $("#token").value.trim());
      toast("token saved in this browser");
    };
    $("#reintegrate").onclick = async () => {
      const sel = state.selected;
      if (!sel || sel.kind !== "stack") { toast("select a stack first", true); return; }
      try { await post(`/api/stacks/${encodeURIComponent(sel.id)}/reintegrate`, {}); toast("exact re-integration queued"); }
      catch (e) { toast(e.message, true); }
    };
    $("#new-stack").onsubmit = async (e) => {
      e.preventDefault();
      try {
        const r = await post("/api/stacks", { target: $("#new-target").value.trim(), filter: $("#new-filter").value.trim() });
        toast(`new stack ${r.id || ""} started`);
        refreshStacks();
      } catch (err) { toast(err.message, true); }
    };
  }

  function start() {
    setupViewer();
    setupTable();
    setupDialog();
    setupControls();
    $("#conn").textContent = "connecting…";  // the banner waits for a real failure
    if (window.ResizeObserver) {
      const ro = new ResizeObserver(throttle(resizeCharts, 200));
      ro.observe(document.querySelector("main"));
    }
    connect();
    // Catch up right away too (the hello message triggers it again; requests are shared).
    catchUp();
  }
  window.stackwatch = { state, charts, catchUp };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();

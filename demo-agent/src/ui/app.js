// The demo agent's web view: polls GET /v1/agent/cache once a second and redraws. No
// framework, no build step; every text goes through textContent (keys are user data).
"use strict";

const POLL_MS = 1000;
const view = { type: "kv", prefix: "", sort: "key", order: "asc", offset: 0, limit: 100 };
let inFlight = false;
let again = false;
let timer = null;
let lastOk = null;
let lastTotal = 0;

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function fmtDuration(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return Math.round(ms) + "ms";
  let s = Math.floor(ms / 1000);
  if (s < 60) return (ms / 1000).toFixed(ms < 10000 ? 1 : 0) + "s";
  const d = Math.floor(s / 86400); s -= d * 86400;
  const h = Math.floor(s / 3600); s -= h * 3600;
  const m = Math.floor(s / 60); s -= m * 60;
  if (d) return d + "d " + h + "h";
  if (h) return h + "h " + m + "m";
  return m + "m " + s + "s";
}

function fmtRate(x) {
  if (!x) return "0";
  if (x >= 1000) return (x / 1000).toFixed(1) + "k";
  if (x >= 100) return Math.round(x).toString();
  return x.toFixed(x >= 10 ? 1 : 2).replace(/\.?0+$/, "");
}

function fmtInt(n) {
  return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US");
}

function fmtRatio(r) {
  return r === null || r === undefined ? "–" : (r * 100).toFixed(1) + "%";
}

function url() {
  const q = new URLSearchParams({
    type: view.type,
    sort: view.sort,
    order: view.order,
    offset: String(view.offset),
    limit: String(view.limit),
  });
  if (view.prefix) q.set("prefix", view.prefix);
  return "/v1/agent/cache?" + q.toString();
}

async function poll() {
  clearTimeout(timer);
  if (inFlight) {
    again = true;
    return;
  }
  inFlight = true;
  again = false;
  try {
    const response = await fetch(url(), { cache: "no-store", headers: { Accept: "application/json" } });
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    lastOk = Date.now();
    $("agent-down").hidden = true;
    render(data);
    $("poll-status").textContent = "updated " + new Date().toLocaleTimeString("en-GB");
  } catch (error) {
    $("poll-status").textContent = "poll failed: " + error.message;
    if (lastOk !== null) {
      $("agent-down").hidden = false;
      $("agent-down-since").textContent = fmtDuration(Date.now() - lastOk);
    }
  } finally {
    inFlight = false;
    timer = setTimeout(poll, again ? 0 : POLL_MS);
  }
}

function render(data) {
  renderUpstream(data.upstream);
  renderTypes(data.types);
  renderHistory(data.history);
  $("watches").textContent = fmtInt(data.watches);
  $("sse-streams").textContent = fmtInt(data.sse_streams);
  $("kv-mode").textContent = data.kv_cache;
  renderEntries(data.entries);
}

function renderUpstream(up) {
  const reachable = up.reachable === true ? "true" : up.reachable === false ? "false" : "unknown";
  const pill = $("upstream-pill");
  pill.dataset.reachable = reachable;
  pill.className = "pill " + (reachable === "true" ? "pill-ok" : reachable === "false" ? "pill-bad" : "pill-unknown");
  let label = "upstream " + up.kind + ": ";
  if (reachable === "true") label += "reachable";
  else if (reachable === "false") label += "unreachable" + (up.down_for_ms !== null ? " for " + fmtDuration(up.down_for_ms) : "");
  else label += "no contact yet";
  pill.textContent = label;

  $("up-kind").textContent = up.kind;
  const endpoints = up.endpoints.map((e) => (e === up.current_endpoint ? e + " (in use)" : e));
  $("up-endpoints").textContent = endpoints.join(", ");
  const status = $("up-status");
  status.dataset.reachable = reachable;
  status.textContent = reachable === "true" ? "reachable" : reachable === "false" ? "unreachable" : "unknown";
  if (up.last_error && reachable === "false") {
    status.title = up.last_error;
  } else {
    status.removeAttribute("title");
  }
  $("up-contact").textContent = up.last_contact_ms === null ? "never" : fmtDuration(up.last_contact_ms) + " ago";
  let outage = "none";
  if (up.down_for_ms !== null) {
    // Calls fail, but not yet for long enough to count as an outage.
    outage = (reachable === "false" ? "down for " : "calls failing for ") + fmtDuration(up.down_for_ms);
  }
  else if (up.last_outage_ms) outage = "none (" + up.outages + " so far, the last lasted " + fmtDuration(up.last_outage_ms) + ")";
  $("up-outage").textContent = outage;
  const f = up.faults;
  const faults = [];
  if (f.fail) faults.push("outage injected");
  if (f.fail_rate > 0) faults.push("fail rate " + f.fail_rate);
  if (f.latency && f.latency !== "0s") faults.push("latency " + f.latency);
  $("up-faults").textContent = faults.length ? faults.join(", ") : "none";
  const c = up.counters;
  $("up-blocking").textContent = c ? fmtInt(c.blocking_open) : "–";
  $("up-index").textContent = c ? fmtInt(c.index) : "–";
  $("up-keys").textContent = c ? fmtInt(c.keys) : "–";
}

function renderTypes(types) {
  const rows = document.createDocumentFragment();
  for (const t of types) {
    const tr = el("tr");
    tr.dataset.type = t.name;
    tr.append(
      el("td", "type-name", t.name),
      el("td", "num", fmtInt(t.entries)),
      el("td", "num", t.failing === null ? "–" : fmtInt(t.failing)),
      el("td", "num", fmtRate(t.per_second.hits)),
      el("td", "num", fmtRate(t.per_second.misses)),
      el("td", "num", fmtRate(t.per_second.fetches)),
      el("td", "num", fmtRate(t.per_second.errors)),
      el("td", "num", fmtRatio(t.hit_ratio_recent)),
      el("td", "num", fmtRatio(t.hit_ratio)),
      el("td", "num", fmtInt(t.watches)),
    );
    if (t.failing) tr.cells[2].append(el("span", "tag tag-bad", "!"));
    rows.append(tr);
  }
  $("types-body").replaceChildren(rows);
}

// Draws `series` (oldest first, one per second) right-aligned in a 300×40 chart; returns
// the peak it was scaled to.
function drawLine(id, series, peak) {
  const width = 300;
  const height = 40;
  const x0 = width - series.length;
  const y = (v) => (height - 1 - (v / peak) * (height - 4)).toFixed(1);
  $(id).setAttribute("points", series.map((v, i) => x0 + i + "," + y(v)).join(" "));
  return y;
}

function renderHistory(h) {
  const last = (xs) => (xs.length ? xs[xs.length - 1] : 0);
  const peakOf = (...all) => Math.max(1, ...all.flat());
  $("rate-hits").textContent = fmtRate(last(h.hits));
  $("rate-fetches").textContent = fmtRate(last(h.fetches));
  $("rate-errors").textContent = fmtRate(last(h.errors));
  const hitsPeak = peakOf(h.hits);
  $("peak-hits").textContent = fmtRate(hitsPeak);
  drawLine("spark-hits", h.hits, hitsPeak);
  const fetchPeak = peakOf(h.fetches, h.errors);
  $("peak-fetches").textContent = fmtRate(fetchPeak);
  const y = drawLine("spark-fetches", h.fetches, fetchPeak);
  let bars = "";
  const x0 = 300 - h.errors.length;
  for (let i = 0; i < h.errors.length; i++) {
    if (h.errors[i] > 0) bars += "M" + (x0 + i) + ",40V" + y(h.errors[i]) + "h1V40z";
  }
  $("spark-errors").setAttribute("d", bars);
}

function renderEntries(page) {
  lastTotal = page.total || 0;
  const rows = document.createDocumentFragment();
  for (const e of page.items) {
    const tr = el("tr");
    tr.dataset.key = e.key;
    if (e.error) tr.className = "failing";
    const key = el("td", "key", e.key);
    key.title = e.datacenter ? e.key + " (" + e.datacenter + ")" : e.key;
    const result = el("td");
    if (e.error) {
      result.append(el("span", "tag tag-bad", "error"));
      const msg = el("span", "err", e.error);
      msg.title = e.error + (e.failing_for_ms !== null ? " (failing for " + fmtDuration(e.failing_for_ms) + ")" : "");
      result.append(msg);
    } else if (e.fetching && !e.has_value) {
      result.append(el("span", "tag tag-idle", "fetching"));
    } else if (e.has_value) {
      result.append(el("span", "tag tag-ok", "ok"));
    } else {
      result.append(el("span", "tag tag-idle", "none"));
    }
    // The engine reports the backoff state until the retried fetch completes; a blocking
    // fetch that the upstream accepted is current, so only a chain that waits is shown.
    const backoff = el("td");
    if (e.in_backoff && !e.fetching) {
      backoff.append(el("span", "tag tag-warn", e.failing_for_ms !== null ? "failing " + fmtDuration(e.failing_for_ms) : "backoff"));
    } else if (e.in_backoff && e.error) {
      backoff.append(el("span", "tag tag-warn", "retrying"));
    } else {
      backoff.textContent = "–";
    }
    tr.append(
      key,
      el("td", "num", e.index ? fmtInt(e.index) : "–"),
      el("td", "num", fmtDuration(e.age_ms)),
      result,
      el("td", "num", fmtInt(e.watchers)),
      backoff,
      el("td", "num", e.ttl_left_ms === null ? "–" : fmtDuration(e.ttl_left_ms)),
    );
    rows.append(tr);
  }
  $("entries-body").replaceChildren(rows);
  const empty = $("entries-empty");
  empty.hidden = page.items.length > 0;
  empty.textContent = page.total === null ? "The engine does not list entries yet." : view.prefix ? "No entries under this prefix." : "No entries.";
  const from = page.items.length ? page.offset + 1 : 0;
  const to = page.offset + page.items.length;
  $("range").textContent = fmtInt(from) + "–" + fmtInt(to) + " of " + fmtInt(page.total);
  $("range").dataset.total = String(page.total);
  $("first").disabled = $("prev").disabled = view.offset === 0;
  $("next").disabled = $("last").disabled = to >= lastTotal;
  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.classList.toggle("sorted", th.dataset.sort === view.sort);
    th.classList.toggle("desc", th.dataset.sort === view.sort && view.order === "desc");
  }
}

function refresh() {
  // A change of view shows at once, not at the next tick.
  poll();
}

function setup() {
  for (const button of document.querySelectorAll("#type-tabs button")) {
    button.addEventListener("click", () => {
      view.type = button.dataset.type;
      view.offset = 0;
      for (const b of document.querySelectorAll("#type-tabs button")) b.classList.toggle("active", b === button);
      refresh();
    });
  }
  let debounce = null;
  $("prefix").addEventListener("input", (event) => {
    clearTimeout(debounce);
    debounce = setTimeout(() => {
      view.prefix = event.target.value;
      view.offset = 0;
      refresh();
    }, 200);
  });
  $("page-size").addEventListener("change", (event) => {
    view.limit = Number(event.target.value);
    view.offset = 0;
    refresh();
  });
  $("first").addEventListener("click", () => { view.offset = 0; refresh(); });
  $("prev").addEventListener("click", () => { view.offset = Math.max(0, view.offset - view.limit); refresh(); });
  $("next").addEventListener("click", () => { view.offset += view.limit; refresh(); });
  $("last").addEventListener("click", () => {
    view.offset = Math.max(0, Math.floor((lastTotal - 1) / view.limit) * view.limit);
    refresh();
  });
  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.addEventListener("click", () => {
      if (view.sort === th.dataset.sort) {
        view.order = view.order === "asc" ? "desc" : "asc";
      } else {
        view.sort = th.dataset.sort;
        // Newest, highest and shortest-lived first is what one looks for.
        view.order = view.sort === "key" ? "asc" : view.sort === "age" || view.sort === "ttl" ? "asc" : "desc";
      }
      view.offset = 0;
      refresh();
    });
  }
  poll();
}

setup();

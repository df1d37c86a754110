// OrderMesh live dashboard: polls /snapshot and /groups every second and renders them.
// No framework, no build step, no CDN. Every number shown sits in an element carrying
// data-metric="<path>" (a path into /snapshot, or into /groups with data-source="groups")
// and data-value="<the raw JSON value>", so a test can compare the page to the API.
// A path is dot-separated; a key that itself contains dots (a DLQ reason such as
// "DecodeError.json") is matched whole: at each level the longest key that prefixes
// the rest of the path wins (see resolve()).
"use strict";

(function () {
  const POLL_MS = 1000;
  const state = { snapshot: null, groups: null, paused: false, timer: null, failures: 0 };
  const charts = {};
  window.ordermeshCharts = charts;

  // --- paths and formatting -------------------------------------------------------------

  function resolve(obj, path) {
    let cur = obj;
    let rest = path;
    while (rest !== "") {
      if (cur === null || typeof cur !== "object") return undefined;
      if (Object.prototype.hasOwnProperty.call(cur, rest)) return cur[rest];
      let best = null;
      for (const key of Object.keys(cur)) {
        if (rest.startsWith(key + ".") && (best === null || key.length > best.length)) best = key;
      }
      if (best === null) return undefined;
      cur = cur[best];
      rest = rest.slice(best.length + 1);
    }
    return cur;
  }

  const intFmt = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  const fixed = (digits) =>
    new Intl.NumberFormat("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  const rateFmt = fixed(1);
  const pctFmt = fixed(1);
  const moneyFmt = fixed(2);
  const ms1 = fixed(1);
  const ms2 = fixed(2);

  function format(value, kind) {
    if (value === null || value === undefined) return "–";
    switch (kind) {
      case "int": return intFmt.format(value);
      case "rate": return rateFmt.format(value);
      case "money": return moneyFmt.format(value);
      case "pct": return pctFmt.format(value * 100); // a share (0..1) shown in percent
      case "ms": return Math.abs(value) < 10 ? ms2.format(value) : ms1.format(value);
      case "time": return new Date(value * 1000).toLocaleTimeString("en-GB");
      default: return String(value);
    }
  }

  function setMetric(el, value) {
    el.textContent = format(value, el.dataset.format);
    el.dataset.value = value === undefined ? "" : JSON.stringify(value);
  }

  function metric(path, kind, cls, source) {
    const el = document.createElement("span");
    el.dataset.metric = path;
    el.dataset.format = kind;
    if (source) el.dataset.source = source;
    if (cls) el.className = cls;
    return el;
  }

  function h(tag, cls, text) {
    const el = document.createElement(tag);
    if (cls) el.className = cls;
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function td(child, cls) {
    const cell = h("td", cls);
    if (typeof child === "string") cell.textContent = child;
    else if (child) cell.appendChild(child);
    return cell;
  }

  // --- dynamic sections -----------------------------------------------------------------

  function renderRejectReasons(snap) {
    const box = document.getElementById("rejected-reasons");
    box.replaceChildren();
    for (const reason of Object.keys(snap.totals.rejected)) {
      const row = h("div", "r");
      row.append(h("span", "muted", reason.toLowerCase().replaceAll("_", " ")));
      row.append(metric(`totals.rejected.${reason}`, "int"));
      box.append(row);
    }
  }

  function renderRevenue(snap) {
    const total = document.getElementById("revenue-total");
    const recent = document.getElementById("revenue-60s");
    total.replaceChildren();
    recent.replaceChildren();
    const currencies = Object.keys(snap.totals.revenue);
    if (currencies.length === 0) {
      total.textContent = "–";
      recent.append(h("span", "muted", "no reserved orders yet"));
      return;
    }
    const main = currencies.includes("USD") ? "USD" : currencies[0];
    total.append(metric(`totals.revenue.${main}`, "money"), h("span", "unit", main));
    recent.append(metric(`windows.60s.revenue.${main}`, "money"));
    recent.append(document.createTextNode(` ${main} in the last 60 s`));
    for (const cur of currencies) {
      if (cur === main) continue;
      recent.append(document.createTextNode(" · "), metric(`totals.revenue.${cur}`, "money"));
      recent.append(document.createTextNode(` ${cur}`));
    }
  }

  const WINDOW_ROWS = [
    ["placed / s", "placed_per_s", "rate"],
    ["decided / s", "decided_per_s", "rate"],
    ["reserved", "reserved", "int"],
    ["rejected", "rejected_total", "int"],
    ["cancelled", "cancelled", "int"],
    ["malformed", "malformed", "int"],
    ["dead-lettered / s", "dlq_per_s", "rate"],
    ["revenue (USD)", "revenue.USD", "money"],
    ["latency p50 (ms)", "latency_ms.p50", "ms"],
    ["latency p90 (ms)", "latency_ms.p90", "ms"],
    ["latency p99 (ms)", "latency_ms.p99", "ms"],
    ["latency max (ms)", "latency_ms.max", "ms"],
  ];

  function renderWindows(snap) {
    const body = document.getElementById("windows-body");
    if (body.childElementCount > 0) return; // static structure, values set by updateMetrics
    for (const [label, key, kind] of WINDOW_ROWS) {
      const tr = h("tr");
      tr.append(td(label));
      for (const w of Object.keys(snap.windows)) tr.append(td(metric(`windows.${w}.${key}`, kind)));
      body.append(tr);
    }
  }

  function renderSkus(snap, which, id) {
    const body = document.getElementById(id);
    body.replaceChildren();
    const rows = snap.top_skus[which];
    if (rows.length === 0) {
      const tr = h("tr");
      tr.append(td(h("span", "empty", "no reservations in this window")));
      body.append(tr);
      return;
    }
    const top = rows[0].quantity || 1;
    rows.forEach((row, i) => {
      const tr = h("tr");
      tr.append(td(String(i + 1), "rank"));
      tr.append(td(h("span", "mono", row.sku), "sku"));
      const track = h("div", "bar-track");
      const fill = h("div", "bar-fill");
      fill.style.width = `${Math.max(2, (100 * row.quantity) / top)}%`;
      track.append(fill);
      tr.append(td(track, "bar"));
      tr.append(td(metric(`top_skus.${which}.${i}.quantity`, "int")));
      body.append(tr);
    });
  }

  function renderDlq(snap) {
    const chips = document.getElementById("dlq-reasons");
    chips.replaceChildren();
    const reasons = Object.keys(snap.totals.dlq_by_reason);
    if (reasons.length === 0) chips.append(h("span", "empty", "no dead letters"));
    for (const reason of reasons) {
      const chip = h("span", "chip");
      chip.append(h("span", "mono", reason), metric(`totals.dlq_by_reason.${reason}`, "int", "n"));
      chips.append(chip);
    }
    const body = document.getElementById("dlq-recent");
    body.replaceChildren();
    if (snap.dlq_recent.length === 0) {
      const tr = h("tr");
      tr.append(td(h("span", "empty", "nothing dead-lettered")));
      body.append(tr);
    }
    snap.dlq_recent.forEach((e, i) => {
      const tr = h("tr");
      tr.append(td(metric(`dlq_recent.${i}.at`, "time", "mono")));
      tr.append(td(e.reason, "reason mono"));
      tr.append(td(e.source, "mono"));
      tr.append(td(e.order_id || "–", "mono"));
      const msg = td(e.message, "msg");
      msg.title = e.message;
      tr.append(msg);
      body.append(tr);
    });
    // the alert is the server's verdict (dead letters over a share of the orders records),
    // not "any dead letter": a load with malformed orders by design is not an incident
    const alert = document.getElementById("alert");
    const recent = snap.windows["60s"];
    alert.hidden = !snap.dlq_alert.firing;
    const list = document.getElementById("alert-reasons");
    list.textContent = Object.entries(recent.dlq_by_reason)
      .map(([r, n]) => `${r} × ${n}`)
      .join(" · ");
  }

  // --- the order's life (snapshot.lifecycle) ---------------------------------------------

  const label = (status) => status.toLowerCase().replaceAll("_", " ");

  function renderFunnel(snap) {
    const life = snap.lifecycle;
    const body = document.getElementById("funnel-body");
    body.replaceChildren();
    const steps = Object.keys(life.all.funnel);
    const top = life.all.funnel[steps[0]] || 1;
    steps.forEach((step, i) => {
      const tr = h("tr");
      tr.dataset.step = step;
      tr.append(td(label(step), "step"));
      const track = h("div", "bar-track");
      const fill = h("div", `bar-fill step-${i}`);
      fill.style.width = `${Math.max(1, (100 * life.all.funnel[step]) / top)}%`;
      track.append(fill);
      tr.append(td(track, "bar"));
      tr.append(td(metric(`lifecycle.all.funnel.${step}`, "int")));
      tr.append(td(i === 0 ? "" : pct(`lifecycle.all.conversion.${step}`)));
      tr.append(td(metric(`lifecycle.windows.60s.funnel.${step}`, "int")));
      tr.append(td(i === 0 ? "" : pct(`lifecycle.windows.60s.conversion.${step}`)));
      body.append(tr);
    });
    const chips = document.getElementById("by-status");
    chips.replaceChildren();
    for (const status of Object.keys(life.by_status)) {
      const chip = h("span", "chip status");
      chip.append(h("span", "", label(status)), metric(`lifecycle.by_status.${status}`, "int", "n"));
      chips.append(chip);
    }
  }

  function pct(path) {
    const box = h("span");
    box.append(metric(path, "pct"), h("span", "muted", "%"));
    return box;
  }

  const NO_CAUSES = { EXPIRED: "the reservation's deadline passed unpaid" };

  function renderDropoff(snap) {
    const life = snap.lifecycle;
    const body = document.getElementById("dropoff-body");
    body.replaceChildren();
    for (const [status, end] of Object.entries(life.all.ends)) {
      const head = h("tr", "end");
      head.dataset.end = status;
      head.append(td(label(status), "end-name"));
      head.append(td(metric(`lifecycle.all.ends.${status}.total`, "int", "warn")));
      head.append(td(metric(`lifecycle.windows.60s.ends.${status}.total`, "int")));
      body.append(head);
      const causes = Object.keys(end.causes);
      if (causes.length === 0) {
        const tr = h("tr", "cause");
        tr.append(td(h("span", "muted", NO_CAUSES[status] || "no cause recorded")), td(""), td(""));
        body.append(tr);
      }
      for (const cause of causes) {
        const tr = h("tr", "cause");
        tr.append(td(h("span", "mono", cause)));
        tr.append(td(metric(`lifecycle.all.ends.${status}.causes.${cause}`, "int")));
        tr.append(td(metric(`lifecycle.windows.60s.ends.${status}.causes.${cause}`, "int")));
        body.append(tr);
      }
    }
  }

  const LIFE_ROWS = [
    ["reserved", "funnel.RESERVED", "int"],
    ["paid", "funnel.PAID", "int"],
    ["shipped", "funnel.SHIPPED", "int"],
    ["payment failed", "ends.PAYMENT_FAILED.total", "int"],
    ["expired", "ends.EXPIRED.total", "int"],
    ["cancelled", "ends.CANCELLED.total", "int"],
    ["decline rate (%)", "decline_rate", "pct"],
    ["expiry rate (%)", "expiry_rate", "pct"],
    ["time to pay p50 (ms)", "time_to_pay_ms.p50", "ms"],
    ["time to pay p99 (ms)", "time_to_pay_ms.p99", "ms"],
    ["time to ship p50 (ms)", "time_to_ship_ms.p50", "ms"],
    ["time to ship p99 (ms)", "time_to_ship_ms.p99", "ms"],
  ];

  function renderLifeWindows(snap) {
    const body = document.getElementById("life-body");
    if (body.childElementCount > 0) return; // static structure, values set by updateMetrics
    const columns = Object.keys(snap.lifecycle.windows).map((w) => `lifecycle.windows.${w}`);
    columns.push("lifecycle.all");
    for (const [name, key, kind] of LIFE_ROWS) {
      const tr = h("tr");
      tr.append(td(name));
      for (const col of columns) tr.append(td(metric(`${col}.${key}`, kind)));
      body.append(tr);
    }
  }

  // the currency shown: USD when there is any, else the one with the most authorized
  function mainCurrency(money) {
    const all = new Set();
    for (const kind of Object.keys(money)) for (const cur of Object.keys(money[kind])) all.add(cur);
    if (all.size === 0) return [null, []];
    const byAmount = [...all].sort((a, b) => (money.authorized[b] || 0) - (money.authorized[a] || 0));
    const main = all.has("USD") ? "USD" : byAmount[0];
    return [main, byAmount.filter((c) => c !== main)];
  }

  const MONEY_ROWS = [
    ["authorized", "authorized"],
    ["captured", "captured"],
    ["voided", "voided"],
    ["refunded", "refunded"],
    ["net captured", "net_captured"],
  ];

  function renderMoney(snap) {
    const money = snap.lifecycle.all.money;
    const [main, others] = mainCurrency(money);
    const body = document.getElementById("money-body");
    const note = document.getElementById("money-note");
    const cur = document.getElementById("money-currency");
    const total = document.getElementById("captured-total");
    const recent = document.getElementById("captured-60s");
    const captionNote = document.getElementById("captured-note");
    body.replaceChildren();
    total.replaceChildren();
    recent.replaceChildren();
    captionNote.textContent = "";
    note.textContent = "";
    if (main === null) {
      cur.textContent = "";
      const tr = h("tr");
      tr.append(td(h("span", "empty", "no payments yet")));
      body.append(tr);
      total.textContent = "–";
      recent.append(h("span", "muted", "no captures yet"));
      return;
    }
    cur.textContent = `in ${main}`;
    for (const [name, kind] of MONEY_ROWS) {
      const tr = h("tr");
      tr.dataset.kind = kind;
      tr.append(td(name));
      tr.append(td(metric(`lifecycle.all.money.${kind}.${main}`, "money")));
      tr.append(td(metric(`lifecycle.windows.60s.money.${kind}.${main}`, "money")));
      body.append(tr);
    }
    total.append(metric(`lifecycle.all.money.net_captured.${main}`, "money"), h("span", "unit", main));
    recent.append(metric(`lifecycle.windows.60s.money.captured.${main}`, "money"));
    recent.append(document.createTextNode(` ${main} captured in the last 60 s`));
    captionNote.append(metric(`lifecycle.all.money.authorized.${main}`, "money"));
    captionNote.append(document.createTextNode(` ${main} authorized`));
    if (others.length > 0) {
      // no conversion between currencies: the others are listed, not added in
      note.append(document.createTextNode(`Shown in ${main}; also captured, not converted: `));
      others.forEach((c, i) => {
        if (i > 0) note.append(document.createTextNode(" · "));
        note.append(metric(`lifecycle.all.money.captured.${c}`, "money"), document.createTextNode(` ${c}`));
      });
    }
  }

  function renderGroups(groups) {
    const box = document.getElementById("groups");
    const err = document.getElementById("groups-error");
    box.replaceChildren();
    err.textContent = groups && groups.error ? `last refresh failed: ${groups.error}` : "";
    const entries = groups ? Object.entries(groups.groups || {}) : [];
    if (entries.length === 0) {
      box.append(h("div", "empty", "waiting for the first look at the consumer groups…"));
      return;
    }
    for (const [name, g] of entries) {
      const card = h("div", "group");
      const head = h("div", "group-head");
      head.append(h("span", "group-name", name));
      head.append(h("span", `badge ${g.state}`, g.state === "DEAD" ? "NOT RUNNING" : g.state));
      card.append(head);
      if (g.membership === "reader") {
        card.append(h("div", "note", "reads every partition without joining; lag from its commits"));
      }
      const meta = h("div", "meta");
      const members = h("span");
      members.append(metric(`groups.${name}.member_count`, "int", "", "groups"));
      members.append(document.createTextNode(" members"));
      meta.append(members);
      if (g.total_lag !== null) {
        const lag = h("span");
        lag.append(document.createTextNode("lag "), metric(`groups.${name}.total_lag`, "int", "", "groups"));
        meta.append(lag);
      }
      card.append(meta);
      if (g.error) card.append(h("div", "empty", g.error));
      const list = h("div", "members");
      for (const m of g.members) {
        const row = h("div", "member");
        const who = `${m.member_id.slice(0, 8)} ${m.host.replace(/^\//, "")}`;
        row.append(h("span", "mono", who));
        const parts = h("span", "parts", `${m.partitions.length} partitions`);
        parts.title = m.partitions.join(" ");
        row.append(parts);
        list.append(row);
      }
      card.append(list);
      const grid = h("div", "lagrid");
      g.partitions.forEach((p, i) => {
        const cell = h("div", p.lag === 0 ? "lag" : p.lag < 1000 ? "lag behind" : "lag far");
        cell.title = p.member ? `owned by ${p.member}` : "unassigned";
        cell.append(h("span", "tp mono", `${p.topic}[${p.partition}]`));
        cell.append(metric(`groups.${name}.partitions.${i}.lag`, "int", "", "groups"));
        grid.append(cell);
      });
      card.append(grid);
      box.append(card);
    }
  }

  function updateMetrics() {
    const docs = { snapshot: state.snapshot, groups: state.groups };
    for (const el of document.querySelectorAll("[data-metric]")) {
      const doc = docs[el.dataset.source || "snapshot"];
      if (!doc) continue;
      const value = resolve(doc, el.dataset.metric);
      setMetric(el, value === undefined ? null : value);
    }
  }

  // --- charts ---------------------------------------------------------------------------

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  function drawChart(canvas, name, series, start, yFmt) {
    const dpr = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
      canvas.width = Math.round(width * dpr);
      canvas.height = Math.round(height * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const pad = { l: 52, r: 12, t: 10, b: 24 };
    const w = width - pad.l - pad.r;
    const hgt = height - pad.t - pad.b;
    const n = series[0].values.length;
    let max = 0;
    for (const s of series) for (const v of s.values) if (v !== null && v > max) max = v;
    const top = niceMax(max);
    const x = (i) => pad.l + (n <= 1 ? 0 : (i * w) / (n - 1));
    const y = (v) => pad.t + hgt - (v / top) * hgt;

    ctx.font = "11px system-ui, sans-serif";
    ctx.lineWidth = 1;
    ctx.strokeStyle = "rgba(139, 149, 181, 0.16)";
    ctx.fillStyle = cssVar("--muted");
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let k = 0; k <= 4; k++) {
      const v = (top * k) / 4;
      const yy = Math.round(y(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(pad.l, yy);
      ctx.lineTo(pad.l + w, yy);
      ctx.stroke();
      ctx.fillText(yFmt(v), pad.l - 8, yy);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let i = 0; i < n; i += 60) {
      const ago = n - i;
      ctx.fillText(ago >= 60 ? `-${Math.round(ago / 60)} min` : `-${ago} s`, x(i), pad.t + hgt + 7);
    }
    ctx.fillText("now", x(n - 1) - 10, pad.t + hgt + 7);

    const last = {};
    series.forEach((s, idx) => {
      const color = cssVar(s.color);
      ctx.strokeStyle = color;
      ctx.lineWidth = 1.75;
      ctx.lineJoin = "round";
      ctx.beginPath();
      let open = false;
      let firstX = null;
      let lastX = null;
      s.values.forEach((v, i) => {
        if (v === null) {
          open = false;
          return;
        }
        if (!open) ctx.moveTo(x(i), y(v));
        else ctx.lineTo(x(i), y(v));
        if (firstX === null) firstX = x(i);
        lastX = x(i);
        open = true;
      });
      ctx.stroke();
      if (idx === 0 && s.fill && firstX !== null) {
        ctx.lineTo(lastX, y(0));
        ctx.lineTo(firstX, y(0));
        ctx.closePath();
        const grad = ctx.createLinearGradient(0, pad.t, 0, pad.t + hgt);
        grad.addColorStop(0, color + "40");
        grad.addColorStop(1, color + "00");
        ctx.fillStyle = grad;
        ctx.fill();
      }
      last[s.name] = s.values.length ? s.values[s.values.length - 1] : null;
    });
    charts[name] = { points: n, start: start, y_max: top, last: last, drawn_at: Date.now() / 1000 };
    canvas.dataset.last = JSON.stringify(last);
  }

  function renderCharts(snap) {
    const s = snap.series;
    drawChart(
      document.getElementById("chart-throughput"),
      "throughput",
      [
        { name: "placed", color: "--placed", values: s.placed, fill: true },
        { name: "decided", color: "--decided", values: s.decided },
        { name: "dlq", color: "--dlq", values: s.dlq },
      ],
      s.start,
      (v) => (v >= 1000 ? `${(v / 1000).toFixed(v >= 10000 ? 0 : 1)}k` : String(Math.round(v))),
    );
    drawChart(
      document.getElementById("chart-latency"),
      "latency",
      [
        { name: "p50", color: "--p50", values: s.p50_ms, fill: true },
        { name: "p99", color: "--p99", values: s.p99_ms },
      ],
      s.start,
      (v) => (v >= 1000 ? `${(v / 1000).toFixed(1)} s` : `${v < 10 ? v.toFixed(1) : Math.round(v)} ms`),
    );
  }

  // --- loop -----------------------------------------------------------------------------

  function render(snap, groups) {
    if (snap) {
      state.snapshot = snap;
      renderWindows(snap);
      renderRejectReasons(snap);
      renderRevenue(snap);
      renderSkus(snap, "last_60s", "skus-60s");
      renderSkus(snap, "all_time", "skus-all");
      renderDlq(snap);
      renderFunnel(snap);
      renderDropoff(snap);
      renderLifeWindows(snap);
      renderMoney(snap);
      renderCharts(snap);
    }
    if (groups) {
      state.groups = groups;
      renderGroups(groups);
    }
    updateMetrics();
  }

  function setStatus(kind, text) {
    const el = document.getElementById("status");
    el.className = `pill pill-${kind}`;
    el.textContent = text;
  }

  async function getJson(url) {
    const response = await fetch(url, { cache: "no-store" });
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response.json();
  }

  async function poll() {
    state.timer = null;
    if (state.paused) return;
    const [snap, groups] = await Promise.allSettled([getJson("/snapshot"), getJson("/groups")]);
    if (state.paused) return;
    if (snap.status === "fulfilled") {
      state.failures = 0;
      render(snap.value, groups.status === "fulfilled" ? groups.value : null);
      setStatus("live", "live");
    } else {
      state.failures += 1;
      setStatus(state.failures > 2 ? "down" : "wait", "analytics unreachable");
    }
    state.timer = setTimeout(poll, POLL_MS);
  }

  window.addEventListener("resize", () => {
    if (state.snapshot) renderCharts(state.snapshot);
  });

  // for tests and operators: freeze the page on one snapshot, render a given one
  window.ordermesh = {
    resolve: resolve,
    format: format,
    render: render,
    state: state,
    pause() {
      state.paused = true;
      if (state.timer !== null) clearTimeout(state.timer);
      state.timer = null;
      setStatus("paused", "paused");
    },
    resume() {
      if (!state.paused) return;
      state.paused = false;
      poll();
    },
  };

  poll();
})();

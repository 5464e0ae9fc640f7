// The saltpeter dashboard: plain JavaScript, no build step, served by sp-master itself.
// It reads the JSON API (/api/v1/overview, /api/v1/runs/<instance>/output, /api/v1/timeline)
// and acts through it (run now, kill a run or one machine). A run's output is fetched from the
// last UTF-16 position this page holds, so each poll carries only what is new, and rendered as a
// terminal would: "\r" returns to the start of the line, so progress bars overwrite themselves.
"use strict";

const $ = (sel) => document.querySelector(sel);
const POLL_JOBS_MS = 2000;
const POLL_RUN_MS = 700;
const POLL_TIMELINE_MS = 5000;
/** Lines kept on screen per machine; older ones are dropped so long outputs stay responsive. */
const MAX_LINES = 5000;

let overview = null;
let runView = null; // { instance, machines: Map<name, Term>, from: Map<name, pos>, data }
let timers = [];

// ---- HTTP -----------------------------------------------------------------------------------

// The API token is asked for once and kept for this tab only (sessionStorage): it is gone
// when the tab closes, and other tabs and sites never see it. It travels as a bearer header;
// the page holds no other copy.
const TOKEN_KEY = "sp_api_token";
// Versions before this one kept the token in localStorage, which outlives the tab.
try { localStorage.removeItem(TOKEN_KEY); } catch (_) { /* storage may be disabled */ }
let asking = null;   // the one open prompt, shared by every request refused meanwhile
let declined = false; // the user closed the prompt: do not ask again on every poll

function token() {
  try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch (_) { return ""; }
}

/** Asks for a token (once, however many requests were refused); true when one was given. */
function askToken(message) {
  if (declined) return Promise.resolve(false);
  if (!asking) {
    asking = new Promise((resolve) => {
      const t = (prompt(message) || "").trim();
      if (t) {
        try { sessionStorage.setItem(TOKEN_KEY, t); } catch (_) { /* kept nowhere, asked again */ }
      } else {
        declined = true;
        banner("This master needs an API token. Reload the page to enter one.", true);
      }
      resolve(!!t);
    }).finally(() => { asking = null; });
  }
  return asking;
}

async function api(method, path, retried) {
  const headers = { Accept: "application/json" };
  const sent = token();
  if (sent) headers.Authorization = "Bearer " + sent;
  const r = await fetch(path, { method, headers });
  if (r.status === 401 && !retried) {
    if (sent && token() === sent) {
      try { sessionStorage.removeItem(TOKEN_KEY); } catch (_) { /* nothing kept */ }
    }
    const message = sent ? "The master refused this token. API token:" : "This master requires an API token:";
    if (token() || await askToken(message)) return api(method, path, true);
  }
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  if (!r.ok) throw new Error((body && body.error) || ("HTTP " + r.status));
  return body;
}

function setConn(ok, text) {
  const el = $("#conn");
  el.textContent = text;
  el.className = "pill " + (ok ? "ok" : "fail");
}

function banner(text, isError) {
  const b = $("#banner");
  b.hidden = !text;
  b.textContent = text || "";
  b.className = "banner" + (isError ? " error" : "");
}

// ---- formatting -----------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  const secs = (d - Date.now()) / 1000;
  const abs = Math.abs(secs);
  let rel;
  if (abs < 60) rel = Math.round(abs) + " s";
  else if (abs < 3600) rel = Math.round(abs / 60) + " min";
  else if (abs < 86400 * 2) rel = (abs / 3600).toFixed(1) + " h";
  else rel = Math.round(abs / 86400) + " d";
  return secs >= 0 ? "in " + rel : rel + " ago";
}

function duration(secs) {
  if (secs === null || secs === undefined) return "—";
  if (secs < 60) return secs.toFixed(1) + " s";
  if (secs < 3600) return Math.floor(secs / 60) + " min " + Math.round(secs % 60) + " s";
  return (secs / 3600).toFixed(1) + " h";
}

function resultPill(job) {
  if (job.running.length) return el("span", { class: "pill run" }, "running");
  if (job.last_success === true) return el("span", { class: "pill ok" }, "ok");
  if (job.last_success === false) return el("span", { class: "pill fail" }, "failed");
  return el("span", { class: "pill" }, "never ran");
}

// ---- jobs -----------------------------------------------------------------------------------

async function refreshJobs() {
  try {
    overview = await api("GET", "/api/v1/overview");
    setConn(true, "live");
  } catch (e) {
    setConn(false, "offline");
    return;
  }
  $("#version").textContent = "sp-master " + overview.version;
  const m = overview.maintenance;
  if (m.global) banner("Global maintenance is on: no job will be started.");
  else if (m.machines.length) banner("Machines under maintenance: " + m.machines.join(", "));
  else banner("");
  renderJobs();
}

function renderJobs() {
  if (!overview) return;
  const filter = $("#filter").value.trim().toLowerCase();
  const body = $("#jobs tbody");
  body.replaceChildren();
  const jobs = overview.jobs.filter((j) =>
    !filter || j.name.toLowerCase().includes(filter) || j.group.toLowerCase().includes(filter));
  $("#no-jobs").hidden = overview.jobs.length > 0;
  for (const j of jobs) {
    const running = el("td", {});
    for (const i of j.running) running.append(el("a", { href: "#/run/" + encodeURIComponent(i) }, i), " ");
    const last = j.last_instance
      ? el("a", { href: "#/run/" + encodeURIComponent(j.last_instance) }, when(j.last_run))
      : document.createTextNode(when(j.last_run));
    const name = el("td", {}, el("b", {}, j.name));
    if (j.maintenance.length) name.append(" ", el("span", { class: "pill kill", title: j.maintenance.join(", ") }, "maintenance"));
    if (j.master) name.append(" ", el("span", { class: "pill", title: "The master that runs this job (several share the work)" }, "on " + j.master));
    if (j.overlap) name.append(" ", el("span", { class: "pill kill", title: "The last attempt was refused: a run was still going" }, "overlap"));
    const actions = el("td", {},
      el("button", { class: "btn small run", "data-job": j.name, onclick: () => runNow(j.name) }, "Run now"), " ");
    if (j.running.length) {
      actions.append(el("button", { class: "btn small danger", onclick: () => killRuns(j.name, j.running) }, "Kill"));
    }
    body.append(el("tr", { "data-job": j.name },
      name,
      el("td", {}, j.group),
      el("td", {}, j.schedule_text, el("div", { class: "cron" }, j.schedule + (j.timezone ? " " + j.timezone : ""))),
      el("td", { title: j.next_run || "" }, when(j.next_run)),
      el("td", { title: j.last_run || "" }, last),
      el("td", {}, resultPill(j)),
      running,
      actions));
  }
}

async function runNow(job) {
  if (!confirm("Run " + job + " now?")) return;
  try {
    const r = await api("POST", "/api/v1/jobs/" + encodeURIComponent(job) + "/run");
    location.hash = "#/run/" + encodeURIComponent(r.instance);
  } catch (e) {
    alert("Could not run " + job + ": " + e.message);
  }
}

async function killRuns(job, instances) {
  if (!confirm("Kill " + instances.join(", ") + " (" + job + ")? Every machine gets SIGTERM, then SIGKILL.")) return;
  for (const i of instances) {
    try { await api("POST", "/api/v1/runs/" + encodeURIComponent(i) + "/kill"); }
    catch (e) { alert("Could not kill " + i + ": " + e.message); }
  }
  refreshJobs();
}

// ---- a run ----------------------------------------------------------------------------------

/** A terminal-like view of one machine's output. */
class Term {
  constructor(pre) {
    this.pre = pre;
    this.cur = "";       // the line being written
    this.col = 0;        // the cursor's column in it
    this.lines = 0;      // completed lines on screen
    this.tailNode = document.createTextNode("");
    this.pre.append(this.tailNode);
  }

  write(text) {
    const atBottom = this.pre.scrollTop + this.pre.clientHeight >= this.pre.scrollHeight - 4;
    const done = [];
    for (const part of text.split(/(\r\n|\r|\n)/)) {
      if (part === "\n" || part === "\r\n") { done.push(this.cur); this.cur = ""; this.col = 0; }
      else if (part === "\r") { this.col = 0; }
      else if (part) {
        this.cur = this.cur.slice(0, this.col) + part + this.cur.slice(this.col + part.length);
        this.col += part.length;
      }
    }
    if (done.length) this.appendLines(done);
    this.tailNode.textContent = this.cur;
    if (atBottom) this.pre.scrollTop = this.pre.scrollHeight;
  }

  appendLines(lines) {
    const frag = document.createDocumentFragment();
    let plain = [];
    const flush = () => { if (plain.length) { frag.append(plain.join("\n") + "\n"); plain = []; } };
    for (const line of lines) {
      if (line.startsWith("[STDERR]") || line.startsWith("[SALTPETER ERROR")) {
        flush();
        frag.append(el("span", { class: line.startsWith("[STDERR]") ? "stderr" : "note" }, line + "\n"));
      } else plain.push(line);
    }
    flush();
    this.pre.insertBefore(frag, this.tailNode);
    this.lines += lines.length;
    while (this.lines > MAX_LINES && this.pre.firstChild !== this.tailNode) {
      const first = this.pre.firstChild;
      this.lines -= (first.textContent.match(/\n/g) || []).length;
      first.remove();
    }
  }

  note(text) {
    this.appendLines(["", text]);
  }
}

function statusPill(m) {
  if (m.status === "running") return el("span", { class: "pill run" }, "running");
  if (m.status === "pending") return el("span", { class: "pill" }, "pending");
  if (m.retcode === 0) return el("span", { class: "pill ok" }, "success");
  if (m.retcode === 143) return el("span", { class: "pill kill" }, "killed");
  return el("span", { class: "pill fail" }, "failed");
}

function openRun(instance) {
  runView = { instance, terms: new Map(), from: new Map(), cards: new Map(), data: null };
  $("#run-title").textContent = instance;
  $("#machines").replaceChildren();
  $("#run-meta").textContent = "";
  refreshRun();
}

async function refreshRun() {
  const view = runView;
  if (!view) return;
  const from = [...view.from].map(([m, p]) => encodeURIComponent(m) + ":" + p).join(",");
  let data;
  try {
    data = await api("GET", "/api/v1/runs/" + encodeURIComponent(view.instance) + "/output?from=" + from);
  } catch (e) {
    $("#run-meta").textContent = e.message;
    return;
  }
  if (view !== runView) return;
  view.data = data;
  const running = !data.ended;
  const state = $("#run-state");
  if (running) { state.textContent = data.killed ? "killing" : "running"; state.className = "pill run"; }
  else if (data.success) { state.textContent = "success"; state.className = "pill ok"; }
  else { state.textContent = data.killed ? "killed" : "failed"; state.className = "pill " + (data.killed ? "kill" : "fail"); }
  $("#kill-run").disabled = !running;
  $("#run-meta").textContent = "Job " + data.job + " · started " + new Date(data.started).toLocaleString() +
    (data.ended ? " · ended " + new Date(data.ended).toLocaleString() : "");
  const names = Object.keys(data.machines);
  if (!names.length) $("#run-meta").textContent += " · resolving targets…";
  for (const name of names) {
    const m = data.machines[name];
    let card = view.cards.get(name);
    if (!card) {
      const pre = el("pre", { class: "output", "data-machine": name });
      const head = el("div", { class: "head" });
      card = { root: el("div", { class: "machine" }, head, pre), head };
      view.cards.set(name, card);
      view.terms.set(name, new Term(pre));
      $("#machines").append(card.root);
    }
    const facts = el("span", { class: "facts" },
      el("span", {}, "exit ", el("b", { class: "retcode", "data-machine": name }, m.retcode === null ? "—" : String(m.retcode)),
        m.cause ? " (" + m.cause.replace(/_/g, " ") + ")" : ""),
      el("span", {}, "duration ", el("b", {}, duration(m.duration))),
      el("span", {}, "heartbeat ", el("b", {}, m.heartbeat_age === null ? "—" : duration(m.heartbeat_age) + " ago")),
      m.wrapper_version ? el("span", {}, "wrapper ", el("b", {}, m.wrapper_version)) : null,
      m.max_attempts ? el("span", {}, "attempt ", el("b", { class: "attempt", "data-machine": name }, m.attempt + "/" + m.max_attempts)) : null);
    const kill = el("button", {
      class: "btn small danger", disabled: m.endtime ? "" : null,
      onclick: () => killMachine(view.instance, name),
    }, "Kill machine");
    card.head.replaceChildren(el("span", { class: "name" }, name), statusPill(m), facts, el("span", { class: "grow" }), kill);
    const out = m.output;
    const term = view.terms.get(name);
    if (out.skipped > 0) term.note("[... " + out.skipped + " characters omitted; the full output is in the job log ...]");
    if (out.text) term.write(out.text);
    view.from.set(name, out.next);
  }
}

async function killMachine(instance, machine) {
  if (!confirm("Kill " + machine + " in " + instance + "?")) return;
  try { await api("POST", "/api/v1/runs/" + encodeURIComponent(instance) + "/machines/" + encodeURIComponent(machine) + "/kill"); }
  catch (e) { alert("Could not kill " + machine + ": " + e.message); }
  refreshRun();
}

$("#kill-run").addEventListener("click", async () => {
  const view = runView;
  if (!view || !confirm("Kill " + view.instance + "? Every machine gets SIGTERM, then SIGKILL.")) return;
  try { await api("POST", "/api/v1/runs/" + encodeURIComponent(view.instance) + "/kill"); }
  catch (e) { alert("Could not kill: " + e.message); }
  refreshRun();
});

$("#run-again").addEventListener("click", () => {
  if (runView && runView.data) runNow(runView.data.job);
});

// ---- timeline -------------------------------------------------------------------------------

function barClass(r) {
  if (r.msg_type === "missed") return "missed";
  if (!r.end) return "run";
  if (r.success) return "ok";
  return r.ret_code === 143 ? "kill" : "fail";
}

async function drawTimeline(svg, hours) {
  let data;
  try { data = await api("GET", "/api/v1/timeline?start_date=now-" + hours + "h&end_date=now"); }
  catch (e) { return; }
  const runs = data.content;
  const end = Date.now();
  const start = end - hours * 3600 * 1000;
  const jobs = [...new Set(runs.map((r) => r.cron))].sort();
  const labelW = 160, rowH = 22, top = 22, width = Math.max(svg.clientWidth || 900, 600);
  const plotW = width - labelW - 12;
  const height = top + Math.max(jobs.length, 1) * rowH + 6;
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  svg.setAttribute("height", height);
  const ns = "http://www.w3.org/2000/svg";
  const node = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    return n;
  };
  const x = (t) => labelW + ((t - start) / (end - start)) * plotW;
  svg.replaceChildren();
  for (let i = 0; i <= 6; i++) {
    const t = start + (i / 6) * (end - start);
    svg.append(node("line", { class: "grid", x1: x(t), x2: x(t), y1: top - 4, y2: height }));
    const d = new Date(t);
    const label = hours > 48 ? d.toLocaleDateString([], { month: "short", day: "numeric" }) + " " + d.toTimeString().slice(0, 5) : d.toTimeString().slice(0, 5);
    const anchor = i === 0 ? "start" : i === 6 ? "end" : "middle";
    svg.append(node("text", { x: x(t), y: 12, "text-anchor": anchor }, label));
  }
  if (!jobs.length) {
    svg.append(node("text", { x: labelW, y: top + 14 }, "No runs in this window."));
    return;
  }
  jobs.forEach((job, row) => {
    const y = top + row * rowH;
    svg.append(node("text", { class: "job", x: 4, y: y + 15 }, job.length > 22 ? job.slice(0, 21) + "…" : job));
    for (const r of runs.filter((r) => r.cron === job)) {
      const s = Math.max(new Date(r.timestamp).getTime(), start);
      const e = r.end ? new Date(r.end).getTime() : end;
      const bar = node("rect", {
        class: "bar " + barClass(r), x: x(s), y: y + 3, rx: 2, height: rowH - 8,
        width: Math.max(x(e) - x(s), 3),
      });
      const what = r.msg_type === "missed" ? "missed (" + String(r.missed).replace(/_/g, " ") + ")"
        : r.end ? (r.success ? "success" : "exit " + r.ret_code) : "running";
      bar.append(node("title", {}, r.job_instance + "\n" + new Date(r.timestamp).toLocaleString() +
        "\n" + what + " · " + r.machines + " machine(s), " + r.failed + " failed" +
        (r.end ? "\n" + duration((new Date(r.end) - new Date(r.timestamp)) / 1000) : "")));
      if (r.msg_type !== "missed") bar.addEventListener("click", () => { location.hash = "#/run/" + encodeURIComponent(r.job_instance); });
      svg.append(bar);
    }
  });
}

// ---- routing --------------------------------------------------------------------------------

function every(ms, f) { f(); timers.push(setInterval(f, ms)); }

function route() {
  for (const t of timers) clearInterval(t);
  timers = [];
  runView = null;
  const hash = location.hash || "#/";
  $("#jobs-view").hidden = true;
  $("#timeline-view").hidden = true;
  $("#run-view").hidden = true;
  if (hash.startsWith("#/run/")) {
    $("#run-view").hidden = false;
    openRun(decodeURIComponent(hash.slice("#/run/".length)));
    timers.push(setInterval(refreshRun, POLL_RUN_MS));
    every(POLL_JOBS_MS * 5, refreshJobs);
  } else if (hash === "#/timeline") {
    $("#timeline-view").hidden = false;
    every(POLL_TIMELINE_MS, () => drawTimeline($("#timeline"), Number($("#window").value)));
    every(POLL_JOBS_MS * 5, refreshJobs);
  } else {
    $("#jobs-view").hidden = false;
    every(POLL_JOBS_MS, refreshJobs);
    every(POLL_TIMELINE_MS, () => drawTimeline($("#mini-timeline"), 6));
  }
}

$("#filter").addEventListener("input", renderJobs);
$("#window").addEventListener("change", () => drawTimeline($("#timeline"), Number($("#window").value)));
window.addEventListener("hashchange", route);
route();

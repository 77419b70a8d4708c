// The worker's local page: polls /api/state and draws it; pause and resume post to the API.
// Everything a peer or a job controls is put in the page as text, never as markup.
"use strict";

const token = document.querySelector('meta[name="cf-token"]').content;
const POLL_MS = 2000;
const LIVE_SAMPLES = 300; // ten minutes of polls
const live = [];

const REASONS = {
  user_active: "someone is using this machine",
  on_battery: "the machine runs on its battery",
  outside_window: "outside the hours set for work",
  paused_by_user: "paused by user",
  cpu_busy: "other programs keep the CPU busy",
  too_hot: "the machine is too hot",
};

function $(id) { return document.getElementById(id); }

function short(id) { return String(id).slice(0, 12); }

function duration(ms) {
  const s = Math.floor(ms / 1000);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

// A unit's reported progress, [done, total]: a share when it gave a total.
function progress(p) {
  if (!p) return "";
  const [done, total] = p;
  if (total > 0) return Math.round(100 * Math.min(done, total) / total) + " %";
  return done + " done";
}

function hours(secs) { return (secs / 3600).toFixed(secs < 360 ? 2 : 1) + " CPU h"; }

function clock(ms) { return new Date(ms).toLocaleString(); }

async function api(method, path) {
  const response = await fetch(path, {
    method,
    headers: { Authorization: "Bearer " + token },
    cache: "no-store",
    credentials: "same-origin",
  });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function rows(tbody, items, cells) {
  tbody.replaceChildren(...items.map((item) => {
    const tr = document.createElement("tr");
    for (const value of cells(item)) {
      const td = document.createElement("td");
      td.textContent = value;
      tr.appendChild(td);
    }
    return tr;
  }));
}

function svg(name, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

function drawState(status) {
  const state = $("state");
  const work = status.work;
  $("peer-id").textContent = status.id;
  $("listen").textContent = "listening on " + status.listen;
  // A peer that donates nothing (a submitter with no cores) has no units or gifts to show.
  $("units-box").hidden = !work;
  $("given-box").hidden = !work;
  if (!work) {
    state.dataset.state = "no-work";
    state.textContent = "not donating";
    $("reason").textContent = "this peer donates no cores";
    $("controls").hidden = true;
    $("slots").textContent = "";
    rows($("units").tBodies[0], [], () => []);
    return;
  }
  $("controls").hidden = false;
  const paused = work.suspended.includes("paused_by_user");
  $("pause").disabled = paused;
  $("resume").disabled = !paused;
  if (work.suspended.length > 0) {
    state.dataset.state = "suspended";
    state.textContent = "suspended";
    let why = work.suspended.map((r) => REASONS[r] || r).join("; ");
    if (work.suspended_since_ms) why += " — since " + clock(work.suspended_since_ms);
    if (paused) {
      why += work.pause_until_ms ? "; the pause ends " + clock(work.pause_until_ms) : "; until resumed";
    }
    $("reason").textContent = why;
  } else if (work.running > 0) {
    state.dataset.state = "working";
    state.textContent = "working";
    $("reason").textContent = work.running + " of " + work.slots + " slots running units";
  } else {
    state.dataset.state = "waiting";
    state.textContent = "waiting for work";
    $("reason").textContent = "ready: " + work.slots + " slots free, no submitter has sent units";
  }
  $("slots").textContent = work.running + " running, " + work.queued + " queued, " +
    work.completed + " run since start, " + work.handed_back + " handed back" +
    (work.idle_source ? "; idle time read from: " + work.idle_source : "");
  rows($("units").tBodies[0], work.units, (u) =>
    [short(u.submitter), u.job_name ? u.job_name + " (" + short(u.job) + ")" : short(u.job),
     String(u.unit), short(u.module), duration(u.running_ms), progress(u.progress)]);
}

function drawGiven(given, work) {
  if (!given) {
    $("given-today").textContent = "no record of what this peer gave";
    return;
  }
  const line = (t) => hours(t.unit_secs) + ", " + t.units_run + " units run, " +
    t.accepted + " accepted, " + t.rejected + " rejected";
  $("given-today").textContent = "Today: " + line(given.today);
  $("given-total").textContent = "In all: " + line(given.total);
  const chart = $("chart-days");
  const days = given.days.slice(-30);
  $("chart-span").textContent = String(days.length);
  const most = Math.max(1e-9, ...days.map(([, t]) => t.unit_secs));
  const width = 600 / Math.max(days.length, 1);
  if (days.length === 0) {
    const empty = svg("text", { x: 300, y: 75, "text-anchor": "middle", class: "empty" });
    empty.textContent = "nothing given yet";
    chart.replaceChildren(empty);
  } else chart.replaceChildren(...days.map(([day, t], i) => {
    const h = Math.max(1, (t.unit_secs / most) * 130);
    const bar = svg("rect", { class: "bar", x: i * width + 1, y: 140 - h, width: Math.max(width - 2, 1), height: h });
    const title = svg("title", {});
    title.textContent = day + ": " + hours(t.unit_secs) + ", " + t.units_run + " units";
    bar.appendChild(title);
    return bar;
  }));
  live.push(work ? work.running : 0);
  if (live.length > LIVE_SAMPLES) live.shift();
  const top = Math.max(1, ...live);
  const step = 600 / (LIVE_SAMPLES - 1);
  const points = live.map((v, i) => (i * step).toFixed(1) + "," + (78 - (v / top) * 74).toFixed(1)).join(" ");
  $("chart-live").replaceChildren(svg("polyline", { class: "line", points }));
}

function drawJob(job) {
  $("job-box").hidden = !job;
  if (!job) return;
  $("job-name").textContent = job.name + " (" + short(job.id) + ")";
  const done = job.accepted + job.failed;
  $("job-bar").max = Math.max(job.units, 1);
  $("job-bar").value = done;
  const secs = job.elapsed_ms / 1000;
  const rate = secs > 0 ? job.decided_now / secs : 0;
  const left = job.units - done;
  const eta = rate > 0 && left > 0 ? ", about " + duration((left / rate) * 1000) + " left" : "";
  $("job-line").textContent = done + " of " + job.units + " units decided: " + job.accepted +
    " accepted, " + job.failed + " failed, " + job.running + " running; " + job.peers +
    " peers have answered; " + rate.toFixed(1) + " units/s" + eta + (job.finished ? " — finished" : "");
  $("job-warning").textContent = !job.finished && done < job.units && job.hosts < job.quorum
    ? "only " + job.hosts + " distinct hosts have offered room; a unit needs " + job.quorum
    : "";
}

function drawPeers(peers, total) {
  $("peers-count").textContent = total + " known" + (peers.length < total ? ", " + peers.length + " listed" : "");
  rows($("peers").tBodies[0], peers, (p) => [
    short(p.id),
    p.addrs.length ? String(p.addrs[0]) : "(not reachable)",
    p.cores_free + " / " + p.cores_donated,
    p.connected ? "yes" : "no",
    p.job ? short(p.job) : "",
  ]);
}

async function poll() {
  try {
    const state = await api("GET", "/api/state");
    drawState(state.status);
    drawGiven(state.given, state.status.work);
    drawJob(state.job);
    drawPeers(state.status.peers, state.peers_total);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    $("state").dataset.state = "offline";
    $("state").textContent = "not answering";
    $("reason").textContent = String(err.message || err);
  }
}

async function change(path) {
  $("message").textContent = "";
  try {
    drawState(await api("POST", path));
  } catch (err) {
    $("message").textContent = String(err.message || err);
  }
}

$("pause").addEventListener("click", () => {
  const secs = $("pause-for").value;
  change("/api/pause" + (secs ? "?secs=" + secs : ""));
});
$("resume").addEventListener("click", () => change("/api/resume"));

poll();
setInterval(poll, POLL_MS);

// The Session Broker console: plain JavaScript, no build step, nothing loaded from elsewhere.
//
// Signing in sends the API key once (POST /console/session, Authorization: Bearer) and forgets
// it: the server answers with an HttpOnly cookie the page cannot read and a CSRF token kept in
// memory only (re-read from GET /console/session after a reload). Every data call is the tenant
// API itself (/v1/...), authenticated by that cookie; calls that change something carry the
// CSRF token in X-CSRF-Token.

import {
  ERROR_EXPLAINED, EventStreamSource, STATUS_RANK, TERMINAL, TERMINATION_REASONS, WAITING_FOR,
  buildTimeline, formatDuration,
} from "./timeline.js";
import { webhookViews } from "./webhooks.js";

const $ = (id) => document.getElementById(id);
const VIEWS = ["signin", "sessions", "new", "session", "usage", "webhooks", "webhook"];
const SAFE = new Set(["GET", "HEAD"]);

let csrfToken = null; // the console session's CSRF token (never the API key)
let signedInAs = null;
let stopRefresh = () => {}; // stops whatever the current view polls

// ---- the API -------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body, headers) {
    const error = (body && body.error) || {};
    super(error.message || `The broker answered HTTP ${status}.`);
    this.status = status;
    this.code = error.code || "http_error";
    this.field = error.field || null;
    this.error = error;
    this.headers = headers;
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (!SAFE.has(method) && csrfToken) headers["X-CSRF-Token"] = csrfToken;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, credentials: "same-origin", cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new ApiError(response.status, data, response.headers);
    if (response.status === 401 || error.code === "tenant_disabled") signedOut(error.message);
    throw error;
  }
  return { data, status: response.status, headers: response.headers };
}

// Why the browser gave up on an event stream (an EventSource tells nothing): the same GET with
// fetch, its error answer read; null when it answers 200 (then the request is dropped at once).
async function probeStream(path) {
  const controller = new AbortController();
  const response = await fetch(path, {
    headers: { Accept: "text/event-stream" }, credentials: "same-origin", cache: "no-store",
    signal: controller.signal,
  });
  if (response.ok) {
    controller.abort();
    return null;
  }
  const data = await response.json().catch(() => null);
  const error = new ApiError(response.status, data, response.headers);
  if (response.status === 401 || error.code === "tenant_disabled") signedOut(error.message);
  return error;
}

// ---- small DOM helpers ---------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function statusBadge(status) {
  return el("span", { class: `status status-${status}` }, status);
}

function localTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

// "14:03:07" today, "2026-11-23 14:03" another day (the list's columns)
function shortTime(iso) {
  if (!iso) return "";
  const when = new Date(iso);
  const pad = (n) => String(n).padStart(2, "0");
  const clock = `${pad(when.getHours())}:${pad(when.getMinutes())}`;
  if (when.toDateString() === new Date().toDateString()) return `${clock}:${pad(when.getSeconds())}`;
  return `${when.getFullYear()}-${pad(when.getMonth() + 1)}-${pad(when.getDate())} ${clock}`;
}

// "14:03:07.123": the timeline's moments, to the millisecond the session object records
function preciseTime(ms) {
  const when = new Date(ms);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(when.getHours())}:${pad(when.getMinutes())}:${pad(when.getSeconds())}.${pad(when.getMilliseconds(), 3)}`;
}

function announce(text) {
  $("announce").textContent = text;
}

function showBanner(node, text) {
  node.textContent = text;
  node.hidden = !text;
}

function show(view) {
  $("loading").hidden = true;
  for (const name of VIEWS) $(`view-${name}`).hidden = name !== view;
  $("nav").hidden = view === "signin";
  for (const link of document.querySelectorAll("nav a")) {
    const parent = { session: "#/sessions", webhook: "#/webhooks" }[view];
    const here = link.getAttribute("href") === `#/${view}` || link.getAttribute("href") === parent;
    if (here) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

// ---- signing in and out --------------------------------------------------------------------

function signedIn(session) {
  csrfToken = session.csrf_token;
  signedInAs = session.tenant;
  $("who").textContent = `${session.tenant.name} (${session.tenant.id})`;
}

function signedOut(message) {
  stopRefresh();
  csrfToken = null;
  signedInAs = null;
  show("signin");
  $("signin-error").textContent = message || "";
}

$("signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("api-key");
  const error = $("signin-error");
  error.textContent = "";
  if (!input.value.trim()) {
    error.textContent = "Enter one of your tenant's API keys (sbk_...).";
    input.focus();
    return;
  }
  const authorization = `Bearer ${input.value.trim()}`;
  input.value = ""; // the key leaves the page with this one request
  let response;
  try {
    response = await fetch("/console/session", {
      method: "POST", headers: { Authorization: authorization, Accept: "application/json" },
      credentials: "same-origin", cache: "no-store",
    });
  } catch {
    error.textContent = "The broker could not be reached.";
    return;
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    error.textContent = new ApiError(response.status, body).message;
    input.focus();
    return;
  }
  signedIn(body);
  announce(`Signed in as ${body.tenant.name}.`);
  if (!location.hash || location.hash === "#/signin") location.hash = "#/sessions";
  else route();
});

$("sign-out").addEventListener("click", async () => {
  try {
    await api("DELETE", "/console/session");
  } catch {
    // signed out either way
  }
  signedOut("");
  announce("Signed out.");
});

// ---- sessions list -------------------------------------------------------------------------

const listState = { cursor: null, previous: [] };

function showSessions() {
  show("sessions");
  let timer = null;
  let stopped = false;
  const refresh = async () => {
    const status = $("status-filter").value;
    const params = new URLSearchParams({ limit: "25" });
    if (status) params.set("status", status);
    if (listState.cursor) params.set("cursor", listState.cursor);
    try {
      const { data } = await api("GET", `/v1/sessions?${params}`);
      if (stopped) return;
      renderSessions(data);
      showBanner($("sessions-error"), "");
      $("sessions-refreshed").textContent = `refreshed ${shortTime(new Date().toISOString())}`;
    } catch (error) {
      if (!stopped) showBanner($("sessions-error"), error.message);
    }
    if (!stopped) timer = setTimeout(refresh, 2000);
  };
  stopRefresh = () => { stopped = true; clearTimeout(timer); };
  refresh();
}

function renderSessions(page) {
  const body = $("sessions-body");
  body.replaceChildren(...page.data.map((s) => el("tr", {},
    el("td", {}, el("a", { href: `#/sessions/${encodeURIComponent(s.id)}` }, el("code", {}, s.id))),
    el("td", {}, statusBadge(s.status)),
    el("td", {}, s.end_user || ""),
    el("td", {}, shortTime(s.created_at)),
    el("td", {}, shortTime(s.ready_at)),
    el("td", {}, shortTime(s.expires_at)),
  )));
  $("sessions-empty").hidden = page.data.length > 0;
  $("sessions-next").hidden = !page.next_cursor;
  $("sessions-next").dataset.cursor = page.next_cursor || "";
  $("sessions-first").hidden = !listState.cursor;
}

function restartList(cursor) {
  listState.cursor = cursor;
  stopRefresh();
  showSessions();
}

$("status-filter").addEventListener("change", () => restartList(null));
$("sessions-next").addEventListener("click", () => restartList($("sessions-next").dataset.cursor || null));
$("sessions-first").addEventListener("click", () => restartList(null));

// ---- create --------------------------------------------------------------------------------

const FIELD_INPUTS = { ttl_seconds: "ttl", end_user: "end-user", session: "override" };

function fieldFor(name) {
  if (!name) return null;
  const top = name.split(".")[0];
  return FIELD_INPUTS[top] || null;
}

function clearCreateErrors() {
  for (const id of Object.values(FIELD_INPUTS)) {
    $(id).removeAttribute("aria-invalid");
    $(`${id}-error`).textContent = "";
  }
  $("create-error").replaceChildren();
  $("create-error").hidden = true;
}

function fieldError(id, message) {
  $(id).setAttribute("aria-invalid", "true");
  $(`${id}-error`).textContent = message;
  $(id).focus();
}

const BUDGETS_EXPLAINED = {
  session_seconds_per_month: "your tenant's session seconds for this UTC month",
  session_seconds_per_end_user_per_month: "this end user's session seconds for this UTC month",
};

// "2027-01-01 00:00 UTC (your time: ...)": when a budget's month ends and it renews
function renewal(iso) {
  const when = new Date(iso);
  const utc = `${when.toISOString().slice(0, 10)} ${when.toISOString().slice(11, 16)} UTC`;
  return `${utc} (your time ${when.toLocaleString()}, in ${formatDuration(Math.max(0, when - Date.now()))})`;
}

function budgetRefusal(e) {
  // 402 budget_exhausted: which budget, what it holds, when it renews
  const meaning = BUDGETS_EXPLAINED[e.budget] || "a session-second budget";
  const committed = e.used + e.reserved;
  return [
    el("p", {}, "Budget ", el("code", {}, e.budget), ` (${meaning}) is used up: `,
       `used ${e.used} s + reserved by live sessions ${e.reserved} s = ${committed} s of ${e.limit} s.`),
    el("p", {}, `A session needs at least 10 s of it; less is left. It renews on ${renewal(e.period_end)}. `,
       "Stopping a live session gives back the rest of its reservation at once; ",
       "an operator can raise the budget (PATCH /admin/v1/tenants/{id})."),
  ];
}

function refusal(error) {
  // 429 (a quota), 402 (a budget) and every other refusal: what the API said, and the numbers it gave
  const lines = [el("p", {}, el("strong", {}, error.code), " ", error.message)];
  if (error.code === "budget_exhausted" && error.error.budget) {
    lines.push(...budgetRefusal(error.error));
  } else if (error.error.limit !== undefined) {
    lines.push(el("p", {}, `Limit ${error.error.limit}, in use ${error.error.current ?? "?"}.`));
  }
  const retry = error.headers && error.headers.get("Retry-After");
  if (retry) {
    const long = Number(retry) >= 60 ? ` (${formatDuration(Number(retry) * 1000)})` : ""; // a budget: weeks
    lines.push(el("p", {}, `Retry after ${retry} s${long}.`));
  }
  const box = $("create-error");
  box.replaceChildren(...lines);
  box.hidden = false;
}

function showNew() {
  show("new");
  clearCreateErrors();
}

$("create-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  clearCreateErrors();
  const body = {};
  const ttl = $("ttl").value.trim();
  if (ttl) body.ttl_seconds = Number(ttl);
  const endUser = $("end-user").value;
  if (endUser) body.end_user = endUser;
  const override = $("override").value.trim();
  if (override) {
    try {
      body.session = JSON.parse(override); // syntax only: the API applies the rules
    } catch (error) {
      fieldError("override", `This is not valid JSON: ${error.message}`);
      return;
    }
  }
  const button = event.submitter || $("create-form").querySelector("button");
  button.disabled = true;
  try {
    const { data } = await api("POST", "/v1/sessions", body);
    announce(`Session ${data.id} created: ${data.status}.`);
    location.hash = `#/sessions/${encodeURIComponent(data.id)}`;
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    const input = error.status === 400 ? fieldFor(error.field) : null;
    if (input) fieldError(input, error.message);
    else if (error.status !== 401) refusal(error);
  } finally {
    button.disabled = false;
  }
});

// ---- one session ---------------------------------------------------------------------------

function sdkSnippet(token) {
  return [
    'import { AvaturnHead } from "@avaturn-live/web-sdk";',
    "",
    "// in your frontend; the token comes from your backend (the session's avaturn.token)",
    'const avatar = new AvaturnHead(document.querySelector("#avaturn-video"), {',
    `  sessionToken: ${JSON.stringify(token)},`,
    "  audioSource: true, // the user's microphone",
    "});",
    "await avatar.init();",
  ].join("\n");
}

function renderTimeline(session, seen) {
  const rows = buildTimeline(session, seen, Date.now());
  $("s-timeline").replaceChildren(...rows.map((row) => {
    const when = row.at === null
      ? "time not recorded"
      : `${row.source === "seen" ? "≈ " : ""}${preciseTime(row.at)}`;
    let spent = "";
    if (row.spent !== null) {
      spent = `for ${formatDuration(row.spent)}${row.current ? " so far" : ""}`;
      if (row.until) spent += ` (until ${row.until})`;
    }
    return el("li", { class: row.current ? "current" : "" },
      statusBadge(row.status), el("span", { class: "when" }, when), el("span", { class: "spent" }, spent));
  }));
  const current = rows.find((r) => r.current);
  $("s-since").textContent = current && current.spent !== null ? `for ${formatDuration(current.spent)}` : "";
}

// token: the frontend token fetched once at ready (events withhold it), shown while the session
// is ready or terminating.
function renderSession(session, seen, token) {
  $("s-id").textContent = session.id;
  const badge = $("s-status");
  badge.textContent = session.status;
  badge.className = `status status-${session.status}`;
  let waiting = WAITING_FOR[session.status] || "";
  if (session.termination_reason && TERMINAL.has(session.status)) {
    waiting += ` Reason: ${session.termination_reason}: ${TERMINATION_REASONS[session.termination_reason] || ""}.`;
  }
  if (session.status === "ready" && session.expires_at) {
    const left = Date.parse(session.expires_at) - Date.now();
    waiting += ` Expires at ${localTime(session.expires_at)} (in ${formatDuration(Math.max(0, left))}).`;
  }
  $("s-waiting").textContent = waiting;
  const cut = session.ttl_limited_by === "budget";
  $("s-ttl-limited").hidden = !cut;
  if (cut) {
    // expires_at = ready_at + the (cut) TTL
    const granted = session.ready_at && session.expires_at
      ? ` to ${Math.round((Date.parse(session.expires_at) - Date.parse(session.ready_at)) / 1000)} s` : "";
    const expiry = session.expires_at ? `it expires at ${localTime(session.expires_at)}` : "its expiry is set when it is ready";
    $("s-ttl-limited").textContent = "TTL cut by a budget (ttl_limited_by: budget): less than the TTL asked for "
      + `was left of a session-second budget of this month, so the session was admitted with its TTL cut${granted}; `
      + `${expiry}. The Usage page shows what is left.`;
  }
  const error = session.error;
  $("s-error").hidden = !error;
  if (error) {
    $("s-error-code").textContent = error.code;
    $("s-error-message").textContent = error.message;
    const meaning = ERROR_EXPLAINED[error.code];
    $("s-error-explained").textContent = meaning ? `What it means: ${meaning}` : "";
  }
  renderTimeline(session, seen);
  const live = session.status === "ready" || session.status === "terminating";
  const shown = live ? (session.avaturn && session.avaturn.token) || token : null;
  $("s-token-box").hidden = !shown;
  if (shown && $("s-token").value !== shown) {
    $("s-token").value = shown;
    $("s-snippet").value = sdkSnippet(shown);
  }
  $("s-stop").hidden = TERMINAL.has(session.status);
  $("s-stop").disabled = session.status === "terminating";
  $("s-json").textContent = JSON.stringify(session, null, 2);
}

const STREAM_STATES = {
  connecting: "Connecting to the session's event stream…",
  live: "Live: following the session's event stream.",
  reconnecting: "Connection to the event stream lost: reconnecting (it resumes after the last event seen).",
  ended: "The session has ended: its event stream is closed.",
  stopped: "Not following the session: the event stream was refused (see above).",
};

function showSession(id) {
  show("session");
  $("s-id").textContent = id;
  $("s-timeline").replaceChildren();
  $("s-token").value = "";
  $("s-stop-error").textContent = "";
  showBanner($("s-fetch-error"), "");
  const seen = {}; // status -> when this page first saw it (client clock)
  let last = null;
  let token = null; // the frontend token: GET once when session.ready arrives (events withhold it)
  let tokenAsked = false;
  let noReplay = null;
  const path = `/v1/sessions/${encodeURIComponent(id)}`;
  const source = new EventStreamSource(`${path}/events`, { probe: () => probeStream(`${path}/events`) });
  const onSession = (session) => {
    if (last && STATUS_RANK[session.status] < STATUS_RANK[last.status]) return; // older than shown
    if (seen[session.status] === undefined) {
      seen[session.status] = Date.now();
      if (last) announce(`Session is now ${session.status}.`);
    }
    last = session;
    renderSession(session, seen, token);
  };
  const readSession = async () => {
    tokenAsked = true;
    try {
      const { data } = await api("GET", path);
      token = (data.avaturn && data.avaturn.token) || null;
      if (last && STATUS_RANK[data.status] < STATUS_RANK[last.status]) renderSession(last, seen, token);
      else onSession(data);
    } catch (error) {
      showBanner($("s-fetch-error"), `The session could not be read: ${error.message}`);
    }
  };
  source.start({
    onEvent: (event) => {
      const session = event.data && event.data.session;
      if (session) onSession(session);
      if (session && event.type === "session.expiring" && session.expires_at) {
        announce(`Session expires at ${localTime(session.expires_at)}.`);
      }
      if (session && event.type === "session.ready" && !tokenAsked) readSession();
    },
    onState: (state) => {
      $("s-live").textContent = STREAM_STATES[state] || "";
      $("s-live").dataset.state = state;
      if (state === "live") {
        showBanner($("s-fetch-error"), "");
        // The replay comes at once; none at all means the session's events are gone (kept
        // 7 days): show the session as it is now, once.
        clearTimeout(noReplay);
        if (last === null) noReplay = setTimeout(() => { if (last === null && !tokenAsked) readSession(); }, 2000);
      }
    },
    onError: (error) => showBanner($("s-fetch-error"), error.message),
  });
  const ticker = setInterval(() => { if (last) renderTimeline(last, seen); }, 1000); // time spent, ticking
  $("s-stop").onclick = async () => {
    $("s-stop-error").textContent = "";
    try {
      const { data } = await api("DELETE", path);
      onSession(data); // terminating (or terminated): the stream brings session.terminated
    } catch (error) {
      $("s-stop-error").textContent = error.message;
    }
  };
  stopRefresh = () => { source.stop(); clearInterval(ticker); clearTimeout(noReplay); };
}

$("s-copy").addEventListener("click", async () => {
  const token = $("s-token").value;
  try {
    await navigator.clipboard.writeText(token);
  } catch {
    $("s-token").select(); // no clipboard permission (plain http): select it for Ctrl+C
    $("s-copied").textContent = "Selected: press Ctrl+C to copy.";
    return;
  }
  $("s-copied").textContent = "Copied.";
});

// ---- usage ---------------------------------------------------------------------------------

function bar(label, quota, note) {
  const full = quota.limit > 0 && quota.used >= quota.limit;
  return el("div", {},
    el("div", { class: "bar-label" }, el("span", {}, label), el("span", {}, `${quota.used} / ${quota.limit}`)),
    el("progress", { max: String(quota.limit || 1), value: String(Math.min(quota.used, quota.limit)),
                     "aria-label": `${label}: ${quota.used} of ${quota.limit}`, class: full ? "full" : "" }),
    el("p", { class: "muted" }, note));
}

function segment(kind, width) {
  const node = el("span", { class: kind });
  node.style.width = width; // through the CSSOM: the CSP forbids style attributes
  return node;
}

function budgetBar(name, b) {
  const label = BUDGETS_EXPLAINED[name] || name;
  const title = el("span", {}, el("code", {}, name));
  if (b.limit === null) {
    return el("div", { class: "budget", "data-budget": name },
      el("div", { class: "bar-label" }, title, el("span", {}, "no budget")),
      el("p", { class: "muted" }, `No ceiling on ${label}; counted anyway: used ${b.used} s, reserved ${b.reserved} s.`));
  }
  const committed = b.used + b.reserved;
  const share = (n) => `${Math.min(100, (100 * n) / b.limit)}%`;
  return el("div", { class: "budget", "data-budget": name },
    el("div", { class: "bar-label" }, title, el("span", {}, `${committed} / ${b.limit} s`)),
    el("div", { class: `stack${b.remaining === 0 ? " full" : ""}`, role: "meter", "aria-valuemin": "0",
                "aria-valuemax": String(b.limit), "aria-valuenow": String(Math.min(committed, b.limit)),
                "aria-label": `${name}: used ${b.used} s and reserved ${b.reserved} s of ${b.limit} s` },
       segment("used", share(b.used)),
       segment("reserved", share(Math.max(0, Math.min(b.reserved, b.limit - b.used))))),
    el("p", { class: "muted" },
       el("span", { class: "legend-used" }), ` used ${b.used} s (sessions that ended) · `,
       el("span", { class: "legend-reserved" }), ` reserved ${b.reserved} s (live sessions) · `,
       `remaining ${b.remaining} s · renews on ${renewal(b.period_end)}`));
}

function renderBudgets(data, endUser) {
  const rows = [];
  for (const name of ["session_seconds_per_month", "session_seconds_per_end_user_per_month"]) {
    if (data.budgets[name]) rows.push(budgetBar(name, data.budgets[name]));
  }
  if (!endUser) {
    const limit = data.quotas.session_seconds_per_end_user_per_month;
    const name = "session_seconds_per_end_user_per_month";
    rows.push(el("div", { class: "budget", "data-budget": name },
      el("div", { class: "bar-label" }, el("span", {}, el("code", {}, name)),
         el("span", {}, limit === null ? "no budget" : `${limit} s per end user`)),
      el("p", { class: "muted" }, limit === null
        ? "No ceiling on each end user's session seconds."
        : "Name an end user above to see theirs.")));
  }
  $("usage-budgets").replaceChildren(...rows);
}

function pairs(node, entries) {
  node.replaceChildren(...entries.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]));
}

function showUsage() {
  show("usage");
  let timer = null;
  let stopped = false;
  let generation = 0; // a refresh asked for by the form supersedes the one in flight
  const refresh = async () => {
    const mine = ++generation;
    const current = () => !stopped && mine === generation;
    try {
      const endUser = $("usage-end-user").value;
      const query = endUser ? `?${new URLSearchParams({ end_user: endUser })}` : "";
      const { data, headers } = await api("GET", `/v1/usage${query}`);
      if (!current()) return;
      const u = data.usage;
      const midnight = new Date(Date.now() + u.day.reset_s * 1000);
      $("usage-bars").replaceChildren(
        bar("Concurrent sessions", u.concurrency, "Queued, provisioning, ready or terminating; a slot frees when its session ends."),
        bar("Sessions in the last minute", u.minute,
            u.minute.reset_s ? `One more fits in ${u.minute.reset_s} s (the oldest leaves the 60 s window).` : "Sliding 60 s window: nothing to wait for."),
        bar("Sessions today (UTC)", u.day, `Resets at ${midnight.toLocaleString()} (UTC midnight, in ${formatDuration(u.day.reset_s * 1000)}).`),
        ...(u.end_user ? [bar(`Live sessions of ${endUser}`, u.end_user, "max_sessions_per_end_user: a slot frees when one of them ends.")] : []),
      );
      renderBudgets(data, endUser);
      pairs($("usage-ratelimit"), [
        ["RateLimit-Policy", headers.get("RateLimit-Policy") || "(none)"],
        ["RateLimit", headers.get("RateLimit") || "(none)"],
      ]);
      pairs($("usage-quotas"), Object.entries(data.quotas).map(([k, v]) => [k, String(v)]));
      $("usage-refreshed").textContent = `refreshed ${shortTime(new Date().toISOString())}`;
      showBanner($("usage-error"), "");
    } catch (error) {
      if (!current()) return;
      showBanner($("usage-error"), error.message);
    }
    timer = setTimeout(refresh, 5000);
  };
  stopRefresh = () => { stopped = true; clearTimeout(timer); };
  $("usage-form").onsubmit = (event) => {
    event.preventDefault();
    clearTimeout(timer);
    refresh();
  };
  refresh();
}

// ---- webhooks (webhooks.js) ---------------------------------------------------------------

const webhooks = webhookViews({
  api, ApiError, $, el, announce, showBanner, show, shortTime,
  setStop: (stop) => { stopRefresh = stop; },
});

// ---- routing -------------------------------------------------------------------------------

function focusTitle(view) {
  const title = document.querySelector(`#view-${view} h1`);
  if (title) title.focus();
}

function route() {
  stopRefresh();
  stopRefresh = () => {};
  webhooks.hideSecret(); // a signing secret is shown once, on the page it was made on
  if (!signedInAs) {
    show("signin");
    $("api-key").focus();
    return;
  }
  const hash = location.hash || "#/sessions";
  if (hash === "#/new") {
    showNew();
    focusTitle("new");
  } else if (hash.startsWith("#/sessions/")) {
    showSession(decodeURIComponent(hash.slice("#/sessions/".length)));
    focusTitle("session");
  } else if (hash === "#/usage") {
    showUsage();
    focusTitle("usage");
  } else if (hash === "#/webhooks") {
    webhooks.showList();
    focusTitle("webhooks");
  } else if (hash.startsWith("#/webhooks/")) {
    webhooks.showEndpoint(decodeURIComponent(hash.slice("#/webhooks/".length)));
    focusTitle("webhook");
  } else {
    showSessions();
    focusTitle("sessions");
  }
}

window.addEventListener("hashchange", route);

async function start() {
  try {
    const response = await fetch("/console/session", { credentials: "same-origin", cache: "no-store" });
    if (response.ok) signedIn(await response.json());
  } catch {
    // not reachable: the sign-in form says so when used
  }
  route();
}

start();

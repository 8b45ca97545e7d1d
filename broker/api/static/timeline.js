// A session's timeline, and where the page gets the session's updates from: the session's
// event stream (contract section 11), GET /v1/sessions/{id}/events, read with an EventSource.
//
// The stream replays the session's earlier events, then follows it; every event carries
// data.session (the session object as of that event, its frontend token withheld) and
// data.sequence (1, 2, 3... per session). The console's cookie authenticates it (same origin).
// When the connection drops, the browser reconnects by itself and sends Last-Event-ID, so the
// stream resumes after the last event seen. The server ends the stream after the terminal event;
// the source closes its EventSource then (otherwise the browser would reconnect forever).

export const TERMINAL = new Set(["terminated", "failed"]);
export const SESSION_EVENTS = [
  "session.created", "session.ready", "session.failed", "session.expiring", "session.terminated",
];
export const TERMINAL_EVENTS = new Set(["session.failed", "session.terminated"]);

// How far along a status is: a session object further behind than the one shown is stale
// (an answer that raced an event) and is not shown over it.
export const STATUS_RANK = { queued: 0, provisioning: 1, ready: 2, terminating: 3, terminated: 4, failed: 4 };

export class EventStreamSource {
  // url: the session's event stream. probe(): called when the browser gave up on the stream (it
  // does for an HTTP error answer: 401, 404, 429...); a promise of the API's error (an object
  // with status, message and headers) or null when the stream answers again.
  constructor(url, { probe, retryMs = 3000 } = {}) {
    this.url = url;
    this.probe = probe;
    this.retryMs = retryMs;
    this.source = null;
    this.timer = null;
    this.sequence = 0; // the last event's data.sequence: a replay after a new EventSource is skipped
    this.stopped = true;
  }

  // onEvent(event): each new event, once, in order. onState(state): "connecting", "live",
  // "reconnecting", "ended" (terminal event seen, stream closed), "stopped" (given up: onError said why).
  start({ onEvent, onState = () => {}, onError = () => {} }) {
    Object.assign(this, { onEvent, onState, onError, stopped: false });
    this.open();
  }

  open() {
    const source = new EventSource(this.url);
    this.source = source;
    this.onState("connecting");
    const mine = () => !this.stopped && source === this.source;
    source.onopen = () => { if (mine()) this.onState("live"); };
    source.onerror = () => {
      if (!mine()) return;
      if (source.readyState === EventSource.CONNECTING) {
        this.onState("reconnecting"); // the browser retries, with Last-Event-ID
        return;
      }
      source.close(); // CLOSED: refused (not a 200 text/event-stream): ask why
      this.diagnose();
    };
    for (const type of SESSION_EVENTS) {
      source.addEventListener(type, (message) => {
        if (!mine()) return;
        let event;
        try {
          event = JSON.parse(message.data);
        } catch {
          return;
        }
        const sequence = (event.data && event.data.sequence) || 0;
        if (sequence && sequence <= this.sequence) return; // seen before this EventSource
        this.sequence = Math.max(this.sequence, sequence);
        this.onEvent(event);
        if (TERMINAL_EVENTS.has(type)) {
          this.stop();
          this.onState("ended");
        }
      });
    }
  }

  async diagnose() {
    let error = null;
    try {
      error = await this.probe();
    } catch {
      error = null; // not reachable at all: try again later
    }
    if (this.stopped) return;
    if (error === null) {
      this.retry(this.retryMs);
      return;
    }
    this.onError(error);
    const retryAfter = Number(error.headers && error.headers.get("Retry-After"));
    if (error.status === 429 || error.status >= 500) {
      this.retry(retryAfter > 0 ? retryAfter * 1000 : this.retryMs);
    } else {
      this.stop(); // 401, 403, 404: asking again changes nothing
      this.onState("stopped");
    }
  }

  retry(ms) {
    this.onState("reconnecting");
    clearTimeout(this.timer);
    this.timer = setTimeout(() => { if (!this.stopped) this.open(); }, ms);
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.source) this.source.close();
  }
}

// The moments the session object records, by status. The object has no time for
// "provisioning" and "terminating": for those the page uses when it first saw them.
function recordedAt(session, status) {
  const field = { queued: "created_at", ready: "ready_at", terminated: "terminated_at", failed: "terminated_at" }[status];
  return field && session[field] ? Date.parse(session[field]) : null;
}

// Rows of the timeline: each status the session passed, in order, with
//   at:     when it entered that status (ms since the epoch) or null when nothing says,
//   source: "record" (the session object's own timestamp) or "seen" (first seen by this page),
//   spent:  ms spent there (up to now for the current status), or null when unknown,
//   until:  the status the spent time runs to when the next status's start is unknown,
//   current: whether it is the session's status now.
// `seen` maps a status to when this page first saw it (client clock).
export function buildTimeline(session, seen, now) {
  const current = session.status;
  const end = TERMINAL.has(current) ? current : null;
  const passed = (status) => {
    if (status === current || seen[status] !== undefined) return true;
    if (status === "queued") return true;
    if (status === "provisioning") return Boolean(session.ready_at);
    if (status === "ready") return Boolean(session.ready_at);
    return false;
  };
  const order = ["queued", "provisioning", "ready", "terminating", ...(end ? [end] : [])];
  const rows = order.filter(passed).map((status) => {
    const recorded = recordedAt(session, status);
    const at = recorded ?? seen[status] ?? null;
    const source = recorded !== null ? "record" : seen[status] !== undefined ? "seen" : null;
    return { status, at, source, spent: null, until: null, current: status === current };
  });
  // A status first seen after a later status's recorded start (a stop answered "terminating"
  // when the worker had already finished) was entered at some unknown moment before that.
  rows.forEach((row, i) => {
    if (row.source === "seen" && rows.slice(i + 1).some((r) => r.source === "record" && r.at < row.at)) {
      row.at = null;
      row.source = null;
    }
  });
  rows.forEach((row, i) => {
    if (row.at === null) return;
    if (row.current) {
      row.spent = TERMINAL.has(row.status) ? null : Math.max(0, now - row.at);
      return;
    }
    const next = rows.slice(i + 1).find((r) => r.at !== null);
    if (next) {
      row.spent = Math.max(0, next.at - row.at);
      if (next !== rows[i + 1]) row.until = next.status;
    }
  });
  return rows;
}

export function formatDuration(ms) {
  if (ms === null || ms === undefined) return "";
  const s = ms / 1000;
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 120) return `${Math.round(s)} s`;
  const m = Math.floor(s / 60);
  if (m < 120) return `${m} min ${Math.round(s - m * 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

// What a session in each status is waiting for (the question a stuck page never answers).
export const WAITING_FOR = {
  queued: "Waiting for a worker to take it: the tenant's OpenAI mint pacing (openai_requests_per_minute) and the sessions queued before it decide when.",
  provisioning: "A worker is minting the OpenAI Realtime client secret and creating the Avaturn session.",
  ready: "Live: hand the frontend token to the Avaturn Web SDK. The broker ends it at expires_at, or when you stop it.",
  terminating: "A worker is ending the upstream Avaturn session (DELETE); the status becomes terminated when it is done.",
  terminated: "Ended; its concurrency slot is free again.",
  failed: "Provisioning failed; the error below says why.",
};

export const TERMINATION_REASONS = {
  expired: "it reached expires_at (its TTL)",
  requested: "it was stopped (DELETE /v1/sessions/{id})",
  replaced: "a newer session of the same end user replaced it (end_user_policy replace_oldest)",
  tenant_disabled: "the tenant was disabled",
  upstream_failed: "an upstream (OpenAI or Avaturn) refused or failed it",
  reaped: "the broker ended it after a worker lost it or its provisioning deadline passed",
};

// Plain words for the error codes a session can fail with (the message from the API is shown too).
export const ERROR_EXPLAINED = {
  provision_deadline_exceeded: "It could not be made ready before the provisioning deadline: the workers or an upstream were too slow. Create a new one.",
  tenant_not_found: "The tenant was deleted while the session was queued.",
  tenant_disabled: "The tenant was disabled while the session was queued.",
  credential_decrypt_failed: "The stored upstream keys cannot be decrypted with the broker's BROKER_SECRET_KEY: the operator must fix the key list.",
  upstream_not_configured: "Neither the tenant nor the platform has an API key for one of the upstreams: ask the operator.",
  openai_invalid_api_key: "OpenAI refused the tenant's OpenAI API key.",
  openai_permission_denied: "OpenAI refused this request for the tenant's OpenAI key (project or model access).",
  openai_not_found: "OpenAI does not know something the session asked for, most often the model name.",
  openai_insufficient_quota: "The OpenAI account behind the key is out of credit.",
  openai_bad_request: "OpenAI refused the session configuration; the message names the field.",
  openai_rejected: "OpenAI refused the request.",
  avaturn_invalid_api_key: "Avaturn refused the tenant's Avaturn API key.",
  avaturn_avatar_gone: "The tenant's avatar_id no longer exists at Avaturn.",
  avaturn_rejected: "Avaturn refused the request.",
  upstream_rate_limited: "An upstream kept answering 429 (rate limited) until the provisioning deadline.",
  upstream_unavailable: "An upstream stayed unreachable or answered 5xx until the provisioning deadline.",
  upstream_timeout: "An upstream did not answer in time until the provisioning deadline.",
  upstream_bad_response: "An upstream answered something the broker could not read.",
};

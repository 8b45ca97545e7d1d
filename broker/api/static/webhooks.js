// The console's webhook pages: the tenant's endpoints (list, add, edit, enable/disable, rotate
// the secret, send a test event, delete) and one endpoint's delivery attempts (with resend).
// Every call is the tenant API's (contract section 11): /v1/webhook_endpoints... and
// /v1/events/{id}/resend, through console.js's api() (the cookie, the CSRF token).
//
// A signing secret is in two answers only (the create and the rotation): the page shows it in
// the secret box once, and clears it from the page when it is dismissed or the view changes.

export const EVENT_TYPES = [
  "session.created", "session.ready", "session.failed", "session.expiring", "session.terminated",
  "usage.threshold_reached", "webhook_endpoint.disabled", "test.ping",
];

const DISABLED_REASONS = {
  gone: "the endpoint answered 410 Gone",
  failing: "its deliveries kept failing for 5 days",
  tenant: "you disabled it",
};

// ctx: { api, ApiError, $, el, announce, showBanner, show, shortTime, setStop }
export function webhookViews(ctx) {
  const { api, ApiError, $, el, announce, showBanner, show, shortTime, setStop } = ctx;
  const enc = encodeURIComponent;

  // ---- the events filter (a fieldset of checkboxes) ----------------------------------------

  function buildEvents(prefix) {
    const box = $(`${prefix}-events`);
    if (box.querySelector("input")) return;
    const all = el("input", { type: "checkbox", id: `${prefix}-events-all`, checked: "" });
    const types = EVENT_TYPES.map((type) => el("input", {
      type: "checkbox", id: `${prefix}-ev-${type.replace(/\./g, "-")}`, value: type, "data-type": type,
    }));
    const sync = () => { for (const t of types) t.disabled = all.checked; };
    all.addEventListener("change", sync);
    box.insertBefore(el("label", { class: "check" }, all, " All event types (also types added later)"),
                     $(`${prefix}-events-error`));
    const list = el("div", { class: "checks" },
      ...types.map((t) => el("label", { class: "check" }, t, " ", el("code", {}, t.value))));
    box.insertBefore(list, $(`${prefix}-events-error`));
    sync();
  }

  function readEvents(prefix) {
    if ($(`${prefix}-events-all`).checked) return null;
    return [...$(`${prefix}-events`).querySelectorAll("input[data-type]")].filter((t) => t.checked).map((t) => t.value);
  }

  function writeEvents(prefix, events) {
    $(`${prefix}-events-all`).checked = events === null;
    for (const t of $(`${prefix}-events`).querySelectorAll("input[data-type]")) {
      t.checked = events !== null && events.includes(t.value);
      t.disabled = events === null;
    }
  }

  // ---- a form's errors: a 400 next to the field it names, anything else in the banner -------

  const FIELDS = ["url", "description", "events"];

  function clearErrors(prefix, banner) {
    for (const name of FIELDS) {
      const input = $(`${prefix}-${name}`);
      input.removeAttribute("aria-invalid");
      $(`${prefix}-${name}-error`).textContent = "";
    }
    showBanner($(banner), "");
  }

  function showError(prefix, banner, error) {
    const field = error.field ? error.field.split(/[.[]/)[0] : null;
    if (error.status === 400 && FIELDS.includes(field)) {
      const input = $(`${prefix}-${field}`);
      input.setAttribute("aria-invalid", "true");
      $(`${prefix}-${field}-error`).textContent = `${error.message} (${error.code})`;
      (field === "events" ? input.querySelector("input") : input).focus();
    } else if (error.status !== 401) {
      const limit = error.error && error.error.limit !== undefined ? ` Limit ${error.error.limit}.` : "";
      showBanner($(banner), `${error.code}: ${error.message}${limit}`);
    }
  }

  function formBody(prefix) {
    const body = { url: $(`${prefix}-url`).value.trim(), events: readEvents(prefix) };
    const description = $(`${prefix}-description`).value;
    body.description = description === "" ? null : description;
    return body;
  }

  // ---- the secret, shown once ------------------------------------------------------------------

  function showSecret(endpoint, rotated) {
    $("wh-secret-endpoint").textContent = endpoint.id;
    $("wh-secret").value = endpoint.secret;
    $("wh-secret-copied").textContent = "";
    $("wh-secret-rotated").hidden = !rotated;
    $("wh-secret-box").hidden = false;
    $("wh-secret-title").focus();
  }

  function hideSecret() {
    $("wh-secret").value = "";
    $("wh-secret-box").hidden = true;
  }

  $("wh-secret-done").addEventListener("click", () => {
    hideSecret();
    announce("Secret hidden.");
  });

  $("wh-secret-copy").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText($("wh-secret").value);
    } catch {
      $("wh-secret").select(); // no clipboard permission (plain http): select it for Ctrl+C
      $("wh-secret-copied").textContent = "Selected: press Ctrl+C to copy.";
      return;
    }
    $("wh-secret-copied").textContent = "Copied.";
  });

  // ---- the list, and adding an endpoint --------------------------------------------------------

  function describeEvents(events) {
    return events === null ? "all" : events.join(", ");
  }

  function stateText(endpoint) {
    if (!endpoint.disabled) return "enabled";
    const why = DISABLED_REASONS[endpoint.disabled_reason] || endpoint.disabled_reason || "";
    return why ? `disabled: ${why}` : "disabled";
  }

  function renderList(endpoints) {
    $("webhooks-body").replaceChildren(...endpoints.map((e) => el("tr", {},
      el("td", {}, el("a", { href: `#/webhooks/${enc(e.id)}` }, el("code", {}, e.id)),
         e.description ? el("div", { class: "muted" }, e.description) : ""),
      el("td", { class: "url" }, e.url),
      el("td", {}, describeEvents(e.events)),
      el("td", {}, el("span", { class: `status ${e.disabled ? "status-failed" : "status-ready"}` }, stateText(e))),
      el("td", {}, shortTime(e.created_at)),
    )));
    $("webhooks-empty").hidden = endpoints.length > 0;
  }

  function showList() {
    show("webhooks");
    buildEvents("wh");
    clearErrors("wh", "webhook-create-error");
    let timer = null;
    let stopped = false;
    const refresh = async () => {
      clearTimeout(timer);
      try {
        const { data } = await api("GET", "/v1/webhook_endpoints");
        if (stopped) return;
        renderList(data.data);
        showBanner($("webhooks-error"), "");
      } catch (error) {
        if (!stopped) showBanner($("webhooks-error"), error.message);
      }
      if (!stopped) timer = setTimeout(refresh, 5000);
    };
    setStop(() => { stopped = true; clearTimeout(timer); });
    $("webhook-form").onsubmit = async (event) => {
      event.preventDefault();
      clearErrors("wh", "webhook-create-error");
      const button = event.submitter || $("webhook-form").querySelector("button[type=submit]");
      button.disabled = true;
      try {
        const { data } = await api("POST", "/v1/webhook_endpoints", formBody("wh"));
        $("webhook-form").reset();
        writeEvents("wh", null);
        announce(`Endpoint ${data.id} added.`);
        showSecret(data, false);
        refresh();
      } catch (error) {
        if (!(error instanceof ApiError)) throw error;
        showError("wh", "webhook-create-error", error);
      } finally {
        button.disabled = false;
      }
    };
    refresh();
  }

  // ---- one endpoint ----------------------------------------------------------------------------

  // the HTTP status (or why none came), and the start of what the receiver answered
  function attemptResult(a) {
    const answered = a.response ? el("div", { class: "muted response" }, a.response.slice(0, 200)) : "";
    if (a.status !== null) {
      const ok = a.status >= 200 && a.status < 300;
      return el("div", {}, el("span", { class: `status ${ok ? "status-ready" : "status-failed"}` }, `HTTP ${a.status}`),
        a.error ? ` ${a.error}` : "", answered);
    }
    return el("div", {}, el("span", { class: "status status-failed" }, "no answer"), ` ${a.error || ""}`, answered);
  }

  function showEndpoint(id) {
    show("webhook");
    buildEvents("whe");
    clearErrors("whe", "webhook-edit-error");
    $("wh-id").textContent = id;
    $("wh-details").replaceChildren();
    $("wh-attempts-body").replaceChildren();
    $("wh-action-result").textContent = "";
    $("wh-action-error").textContent = "";
    showBanner($("webhook-error"), "");
    const path = `/v1/webhook_endpoints/${enc(id)}`;
    let endpoint = null;
    let cursor = null; // the attempts page shown (null: the newest)
    let timer = null;
    let stopped = false;
    setConfirming(false);

    const fillForm = (e) => {
      $("whe-url").value = e.url;
      $("whe-description").value = e.description || "";
      writeEvents("whe", e.events);
    };
    const render = (e) => {
      endpoint = e;
      $("wh-details").replaceChildren(...[
        ["URL", e.url], ["Description", e.description || "(none)"], ["Events", describeEvents(e.events)],
        ["State", stateText(e)], ["Created", e.created_at ? new Date(e.created_at).toLocaleString() : ""],
      ].flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
      const note = $("wh-disabled-note");
      note.hidden = !e.disabled;
      if (e.disabled) {
        note.textContent = `Disabled${e.disabled_at ? ` since ${new Date(e.disabled_at).toLocaleString()}` : ""}: `
          + `${DISABLED_REASONS[e.disabled_reason] || e.disabled_reason || "no reason given"}. `
          + "Nothing is delivered to it, tests and resends are refused; enable it to deliver again.";
      }
      $("wh-toggle").textContent = e.disabled ? "Enable endpoint" : "Disable endpoint";
    };
    const renderAttempts = (page) => {
      $("wh-attempts-body").replaceChildren(...page.data.map((a) => {
        const resend = el("button", { type: "button", "aria-label": `Resend ${a.event_id}` }, "Resend");
        resend.addEventListener("click", () => act(async () => {
          const { data } = await api("POST", `/v1/events/${enc(a.event_id)}/resend`, { endpoint_id: id });
          return data.endpoint_ids.length
            ? `Resend of ${a.event_id} queued.`
            : `${a.event_id} is already queued for this endpoint.`;
        }));
        return el("tr", {},
          el("td", { title: a.attempted_at || "" }, shortTime(a.attempted_at)),
          el("td", {}, el("code", {}, a.event_id), " ", el("span", { class: "muted" }, a.event_type)),
          el("td", {}, `#${a.attempt}`),
          el("td", {}, attemptResult(a)),
          el("td", {}, `${a.latency_ms} ms`),
          el("td", {}, resend));
      }));
      $("wh-attempts-empty").hidden = page.data.length > 0;
      $("wh-attempts-next").hidden = !page.next_cursor;
      $("wh-attempts-next").dataset.cursor = page.next_cursor || "";
      $("wh-attempts-first").hidden = !cursor;
    };
    const refresh = async () => {
      clearTimeout(timer);
      try {
        const params = new URLSearchParams({ limit: "20" });
        if (cursor) params.set("cursor", cursor);
        const [{ data: e }, { data: page }] = await Promise.all([
          api("GET", path), api("GET", `${path}/attempts?${params}`)]);
        if (stopped) return;
        if (endpoint === null) fillForm(e);
        render(e);
        renderAttempts(page);
        showBanner($("webhook-error"), "");
      } catch (error) {
        if (stopped) return;
        showBanner($("webhook-error"), error.message);
        if (error.status === 404) return; // a wrong or deleted id stays so
      }
      if (!stopped) timer = setTimeout(refresh, 3000);
    };
    // one action at a time: its result (or the API's refusal) under the buttons, then a refresh
    const act = async (call) => {
      $("wh-action-result").textContent = "";
      $("wh-action-error").textContent = "";
      try {
        const message = await call();
        if (message) {
          $("wh-action-result").textContent = message;
          announce(message);
        }
      } catch (error) {
        if (!(error instanceof ApiError)) throw error;
        $("wh-action-error").textContent = `${error.code}: ${error.message}`;
      }
      if (!stopped) refresh();
    };

    $("wh-test").onclick = () => act(async () => {
      const { data } = await api("POST", `${path}/test`);
      return `Test event ${data.id} (test.ping) queued: its delivery attempt appears below.`;
    });
    $("wh-toggle").onclick = () => act(async () => {
      const disable = !endpoint || !endpoint.disabled;
      const { data } = await api("PATCH", path, { disabled: disable });
      render(data);
      return disable ? "Endpoint disabled." : "Endpoint enabled.";
    });
    $("wh-rotate").onclick = () => act(async () => {
      const { data } = await api("POST", `${path}/rotate_secret`);
      showSecret(data, true);
      return "Secret rotated.";
    });
    $("wh-delete").onclick = () => {
      setConfirming(true);
      $("wh-delete-confirm").focus();
    };
    $("wh-delete-cancel").onclick = () => {
      setConfirming(false);
      $("wh-delete").focus();
    };
    $("wh-delete-confirm").onclick = () => act(async () => {
      await api("DELETE", path);
      setConfirming(false);
      announce(`Endpoint ${id} deleted.`);
      location.hash = "#/webhooks";
      return "";
    });
    $("wh-attempts-next").onclick = () => { cursor = $("wh-attempts-next").dataset.cursor || null; refresh(); };
    $("wh-attempts-first").onclick = () => { cursor = null; refresh(); };
    $("webhook-edit").onsubmit = async (event) => {
      event.preventDefault();
      clearErrors("whe", "webhook-edit-error");
      try {
        const { data } = await api("PATCH", path, formBody("whe"));
        render(data);
        fillForm(data);
        $("wh-action-result").textContent = "Changes saved.";
        announce("Changes saved.");
      } catch (error) {
        if (!(error instanceof ApiError)) throw error;
        showError("whe", "webhook-edit-error", error);
      }
    };
    setStop(() => { stopped = true; clearTimeout(timer); });
    refresh();
  }

  function setConfirming(on) {
    $("wh-delete").hidden = on;
    $("wh-delete-confirm").hidden = !on;
    $("wh-delete-cancel").hidden = !on;
  }

  return { showList, showEndpoint, hideSecret };
}

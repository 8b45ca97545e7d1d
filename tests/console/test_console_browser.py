"""The console in a real browser (Debian's Chromium through Playwright) against a real API,
worker and sandbox: sign in, create, watch ready, stop, watch terminated; refusals explained;
a wrong or revoked key refused on the page; nothing of the key kept by the browser; CSRF;
accessibility basics. Each page is screenshotted into .artifacts/console/."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
from playwright.sync_api import Page, expect

from tenants.scope import TenantScope
from tests.fixtures.stack import Admin, ApiServer, tenant_client, wait_status
from workers.sandbox import SandboxServer
from tests.security.support import unknown_key

from .conftest import screenshot
from .cut_proxy import CutProxy

STATUS_WORDS = {"queued", "provisioning", "ready", "terminating", "terminated", "failed"}
SLOW = 20_000  # ms: provisioning through the sandbox takes well under a second; this is a ceiling


def _sign_in(page: Page, url: str, key: str) -> None:
    page.goto(f"{url}/console")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Sessions", exact=True)).to_be_visible()


def _status(page: Page) -> Any:
    return page.locator("#s-status")


def test_sign_in_create_watch_ready_stop_watch_terminated(page: Page, stack: tuple[ApiServer, Admin]) -> None:
    """Invariant: a tenant's engineer signs in with the key, creates a session with the form, sees
    it reach ``ready`` with its timeline and frontend token (the session's own), stops it and sees
    ``terminated``; the live list and the usage page show it, all without reloading the page."""
    api, admin = stack
    tenant, key = admin.tenant("acme")
    _sign_in(page, api.url, key)
    expect(page.get_by_text("No sessions here.")).to_be_visible()
    page.get_by_role("link", name="New session").click()
    page.get_by_label("TTL (seconds)").fill("120")
    page.get_by_label("End user").fill("u_42")
    page.get_by_label("Session override (JSON)").fill('{"instructions": "Be brief."}')
    screenshot(page, "create")
    page.get_by_role("button", name="Create session").click()

    expect(_status(page)).to_have_text(re.compile(r"^(queued|provisioning|ready)$"))
    expect(_status(page)).to_have_text("ready", timeout=SLOW)
    sid = page.locator("#s-id").inner_text()
    with tenant_client(api.url, key) as tenant_api:
        record = tenant_api.get(f"/v1/sessions/{sid}").json()
    assert record["status"] == "ready" and record["end_user"] == "u_42"
    token = record["avaturn"]["token"]
    expect(page.get_by_label("Avaturn session token")).to_have_value(token)
    expect(page.get_by_label("Avaturn Web SDK snippet")).to_have_value(re.compile(re.escape(f'"{token}"')))
    timeline = page.locator("#s-timeline li")
    expect(timeline.first).to_contain_text("queued")
    expect(timeline.last).to_contain_text("ready")
    expect(timeline.last).to_contain_text("so far")
    expect(page.locator("#s-waiting")).to_contain_text("Avaturn Web SDK")
    screenshot(page, "session-ready")

    page.get_by_role("button", name="Stop session").click()
    expect(_status(page)).to_have_text("terminated", timeout=SLOW)
    expect(page.locator("#s-waiting")).to_contain_text("requested")
    expect(timeline.last).to_contain_text("terminated")
    expect(page.get_by_label("Avaturn session token")).to_be_hidden()  # withheld once terminated
    screenshot(page, "session-terminated")

    page.get_by_role("link", name="Sessions", exact=True).click()
    row = page.locator("#sessions-body tr", has_text=sid)
    expect(row).to_contain_text("terminated")
    with tenant_client(api.url, key) as tenant_api:  # created elsewhere: the list shows it live
        other = tenant_api.post("/v1/sessions", json={"ttl_seconds": 60}).json()["id"]
    expect(page.locator("#sessions-body tr", has_text=other)).to_be_visible(timeout=10_000)
    expect(page.locator("#sessions-body tr", has_text=other)).to_contain_text("ready", timeout=SLOW)
    page.get_by_label("Status").select_option("terminated")
    expect(page.locator("#sessions-body tr")).to_have_count(1)
    expect(row).to_be_visible()
    page.get_by_label("Status").select_option("")
    expect(page.locator("#sessions-body tr")).to_have_count(2)
    for badge in page.locator("#sessions-body .status").all_inner_texts():
        assert badge in STATUS_WORDS
    screenshot(page, "sessions")

    page.get_by_role("link", name="Usage").click()
    expect(page.get_by_text("Sessions today (UTC)")).to_be_visible()
    expect(page.locator("#usage-bars")).to_contain_text("2 / 1000")
    expect(page.locator("#usage-bars")).to_contain_text("1 / 10")  # one live session of 10
    expect(page.locator("#usage-ratelimit")).to_contain_text(re.compile(r"RateLimit-Policy\s*\S+;"))
    expect(page.locator("#usage-bars")).to_contain_text("Resets at")
    screenshot(page, "usage")
    assert tenant["id"] in page.locator("#who").inner_text()


def test_refusals_are_explained_where_they_belong(page: Page, stack: tuple[ApiServer, Admin]) -> None:
    """Invariant: a 400 is shown next to the field it names (TTL, session override: the API's own
    rules and message) and marks it invalid; a quota refusal (max_concurrent_sessions 1) shows
    its code, message, limit, usage and Retry-After; nothing is created by a refused form."""
    api, admin = stack
    _, key = admin.tenant("small", quotas={"max_concurrent_sessions": 1, "max_session_seconds": 300})
    with tenant_client(api.url, key) as tenant_api:
        assert tenant_api.post("/v1/sessions", json={"ttl_seconds": 60}).status_code == 202
    _sign_in(page, api.url, key)
    page.get_by_role("link", name="New session").click()
    ttl = page.get_by_label("TTL (seconds)")
    ttl.fill("5")
    page.get_by_role("button", name="Create session").click()
    expect(page.locator("#ttl-error")).to_contain_text("ttl_seconds")
    expect(ttl).to_have_attribute("aria-invalid", "true")

    ttl.fill("60")
    override = page.get_by_label("Session override (JSON)")
    override.fill('{"temperature": 0.7}')
    page.get_by_role("button", name="Create session").click()
    expect(page.locator("#override-error")).to_contain_text("temperature")
    expect(override).to_have_attribute("aria-invalid", "true")
    expect(ttl).not_to_have_attribute("aria-invalid", "true")
    override.fill("{not json")
    page.get_by_role("button", name="Create session").click()
    expect(page.locator("#override-error")).to_contain_text("not valid JSON")

    override.fill("")
    page.get_by_role("button", name="Create session").click()
    refusal = page.get_by_role("alert").filter(has_text="concurrency_limit")
    expect(refusal).to_be_visible()
    expect(refusal).to_contain_text("Limit 1, in use 1.")
    expect(refusal).to_contain_text(re.compile(r"Retry after \d+ s\."))
    screenshot(page, "create-refused")
    with tenant_client(api.url, key) as tenant_api:
        assert len(tenant_api.get("/v1/sessions").json()["data"]) == 1


def test_a_wrong_or_revoked_key_is_refused_on_the_page(page: Page, stack: tuple[ApiServer, Admin]) -> None:
    """Invariant: a malformed or unknown key is refused with the API's message on the sign-in
    page; a key revoked while its console is open sends the page back to sign-in with the
    reason (the console session ended with the key)."""
    api, admin = stack
    tenant, key = admin.tenant("acme")
    page.goto(f"{api.url}/console")
    expect(page.get_by_role("button", name="Sign out")).to_be_hidden()  # nothing but the sign-in before it
    expect(page.get_by_role("navigation")).to_be_hidden()
    field = page.get_by_label("API key")
    field.fill("sbk_not-a-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_have_text(re.compile("The API key is malformed"))
    field.fill(unknown_key())
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_have_text("The API key is invalid, revoked or expired.")
    expect(field).to_have_value("")
    screenshot(page, "signin-refused")

    _sign_in(page, api.url, key)
    keys = admin.http.get(f"/admin/v1/tenants/{tenant['id']}/keys").json()["data"]
    assert admin.http.delete(f"/admin/v1/tenants/{tenant['id']}/keys/{keys[0]['id']}").status_code == 200
    expect(page.locator("#signin-error")).to_have_text("The API key is invalid, revoked or expired.",
                                                       timeout=10_000)
    expect(page.get_by_label("API key")).to_be_visible()
    page.reload()  # the cookie is gone for good
    expect(page.get_by_label("API key")).to_be_visible()


def test_the_browser_keeps_nothing_of_the_key(page: Page, stack: tuple[ApiServer, Admin]) -> None:
    """Invariant: after sign-in the key is in no storage, no readable cookie, no form field and no
    global variable; the only cookie is HttpOnly, SameSite=Strict, at most 12 h, not the key;
    a reload stays signed in through that cookie alone."""
    api, admin = stack
    _, key = admin.tenant("acme")
    _sign_in(page, api.url, key)
    kept = page.evaluate("""() => ({
        local: JSON.stringify({...localStorage}), session: JSON.stringify({...sessionStorage}),
        cookie: document.cookie, fields: [...document.querySelectorAll('input, textarea')].map(e => e.value),
    })""")
    assert kept["cookie"] == "", kept
    assert key not in kept["local"] and key not in kept["session"] and key not in "".join(kept["fields"])
    assert kept["local"] == "{}" and kept["session"] == "{}"
    in_globals = page.evaluate("""(key) => Object.keys(window).filter((name) => {
        try { const v = window[name]; return typeof v === 'string' ? v.includes(key)
              : JSON.stringify(v)?.includes(key); } catch { return false; } })""", key)
    assert in_globals == []
    cookies = page.context.cookies()
    assert [c["name"] for c in cookies] == ["sb_console"]
    cookie = cookies[0]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != key
    assert 0 < cookie["expires"] - time.time() <= 12 * 3600 + 5
    page.reload()
    expect(page.get_by_role("heading", name="Sessions", exact=True)).to_be_visible()
    screenshot(page, "signed-in")


def test_state_changing_calls_without_the_csrf_token_are_refused(page: Page, stack: tuple[ApiServer, Admin]) -> None:
    """Invariant: from the signed-in page itself, a create, a stop and a sign-out sent with the
    cookie but without the CSRF token (or with a wrong one) are refused 403 and change nothing."""
    api, admin = stack
    _, key = admin.tenant("acme")
    with tenant_client(api.url, key) as tenant_api:
        sid = tenant_api.post("/v1/sessions", json={"ttl_seconds": 60}).json()["id"]
    _sign_in(page, api.url, key)
    answers = page.evaluate("""async (sid) => {
        const call = async (method, path, headers = {}) => {
            const r = await fetch(path, {method, headers: {'Content-Type': 'application/json', ...headers},
                                         body: method === 'POST' ? '{}' : undefined});
            return [r.status, (await r.json()).error?.code];
        };
        return [await call('POST', '/v1/sessions'), await call('DELETE', '/v1/sessions/' + sid),
                await call('DELETE', '/console/session'),
                await call('POST', '/v1/sessions', {'X-CSRF-Token': 'forged'})];
    }""", sid)
    assert answers == [[403, "csrf_token_invalid"]] * 4
    with tenant_client(api.url, key) as tenant_api:
        listed = tenant_api.get("/v1/sessions").json()["data"]
    assert [s["id"] for s in listed] == [sid] and listed[0]["status"] in ("queued", "provisioning", "ready")
    page.reload()
    expect(page.get_by_role("heading", name="Sessions", exact=True)).to_be_visible()  # still signed in
    page.get_by_role("button", name="Sign out").click()  # with its token: signed out for good
    expect(page.get_by_label("API key")).to_be_visible()
    assert _until_no_cookie(page)
    page.reload()
    expect(page.get_by_label("API key")).to_be_visible()


def _until_no_cookie(page: Page, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while page.context.cookies():
        if time.monotonic() > deadline:
            return False
        page.wait_for_timeout(20)
    return True


def test_a_failed_session_shows_its_error_explained(
    page: Page, stack: tuple[ApiServer, Admin], sandbox: SandboxServer
) -> None:
    """Invariant: a session that fails (the sandbox's OpenAI answers 429 insufficient_quota)
    shows ``failed``, the error code, the API's message and what the code means."""
    api, admin = stack
    _, key = admin.tenant("acme")
    sandbox.configure({"mint": {"fail": [{"status": 429, "code": "insufficient_quota"}]}})
    with tenant_client(api.url, key) as tenant_api:
        sid = tenant_api.post("/v1/sessions", json={"ttl_seconds": 60}).json()["id"]
    _sign_in(page, api.url, key)
    page.locator("#sessions-body a", has_text=sid).click()
    expect(_status(page)).to_have_text("failed", timeout=SLOW)
    with tenant_client(api.url, key) as tenant_api:
        error = tenant_api.get(f"/v1/sessions/{sid}").json()["error"]
    box = page.locator("#s-error")
    expect(box).to_contain_text("openai_insufficient_quota")
    expect(box).to_contain_text(error["message"])
    expect(box).to_contain_text("out of credit")
    expect(page.locator("#s-waiting")).to_contain_text("upstream_failed")
    expect(page.get_by_role("button", name="Stop session")).to_be_hidden()
    screenshot(page, "session-failed")


def _unlabelled(page: Page) -> list[str]:
    return page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                       && !e.getAttribute('aria-labelledby'))
        .map((e) => e.id || e.outerHTML)""")


def _tab_to(page: Page, matches: str, limit: int = 40) -> None:
    """Press Tab until the focused element satisfies the JS predicate ``matches`` (on ``e``)."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate(f"() => {{ const e = document.activeElement; return Boolean({matches}); }}"):
            return
    raise AssertionError(f"Tab never reached {matches}")


def test_every_input_is_labelled_and_the_create_flow_works_with_the_keyboard(
    page: Page, stack: tuple[ApiServer, Admin]
) -> None:
    """Invariant: every input, select and textarea of the console has a label; signing in,
    opening the form, filling it and creating a session work with the keyboard alone, and the
    session's page then shows one of the six status words and reaches ready."""
    api, admin = stack
    _, key = admin.tenant("acme")
    page.goto(f"{api.url}/console")
    assert _unlabelled(page) == []
    expect(page.get_by_label("API key")).to_be_focused()
    page.keyboard.type(key)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Sessions", exact=True)).to_be_visible()
    _tab_to(page, "e.tagName === 'A' && e.textContent === 'New session'")
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Create a session")).to_be_visible()
    _tab_to(page, "e.id === 'ttl'")
    page.keyboard.type("90")
    _tab_to(page, "e.id === 'end-user'")
    page.keyboard.type("keyboard-user")
    _tab_to(page, "e.id === 'override'")
    page.keyboard.type('{"instructions": "Hello"}')
    _tab_to(page, "e.tagName === 'BUTTON' && e.textContent === 'Create session'")
    page.keyboard.press("Enter")
    expect(_status(page)).to_have_text(re.compile("^(" + "|".join(sorted(STATUS_WORDS)) + ")$"))
    expect(_status(page)).to_have_text("ready", timeout=SLOW)
    assert _unlabelled(page) == []
    _tab_to(page, "e.tagName === 'BUTTON' && e.textContent === 'Copy token'")
    page.keyboard.press("Enter")
    expect(page.locator("#s-copied")).not_to_be_empty()
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {key}"}) as tenant_api:
        created = tenant_api.get("/v1/sessions").json()["data"]
    assert len(created) == 1 and created[0]["end_user"] == "keyboard-user"


def test_the_timeline_is_built_from_the_session_objects_timestamps(page: Page, stack: tuple[ApiServer, Admin]) -> None:
    """Invariant: the timeline's times and durations come from the session object's own
    timestamps; a status the object has no time for shows when the page first saw it, or no time
    when that sighting came after a later status's recorded start (a stop answered after the
    worker had finished); the current status counts up to now."""
    api, _ = stack
    page.goto(f"{api.url}/console")
    rows = page.evaluate("""async () => {
        const { buildTimeline } = await import('/console/assets/timeline.js');
        const t = Date.parse('2026-12-01T10:00:00.000Z');
        const base = { created_at: '2026-12-01T10:00:00.000Z', ready_at: null, terminated_at: null };
        const brief = (rows) => rows.map((r) => [r.status, r.at === null ? null : r.at - t, r.source, r.spent,
                                                r.until, r.current]);
        return {
            ready: brief(buildTimeline({ ...base, status: 'ready', ready_at: '2026-12-01T10:00:02.500Z' },
                                       { queued: t + 40, ready: t + 2600 }, t + 10000)),
            raced: brief(buildTimeline({ ...base, status: 'terminated', ready_at: '2026-12-01T10:00:01.000Z',
                                         terminated_at: '2026-12-01T10:00:05.000Z' },
                                       { provisioning: t + 300, terminating: t + 5003, terminated: t + 5010 }, t + 9000)),
            failed: brief(buildTimeline({ ...base, status: 'failed', terminated_at: '2026-12-01T10:00:20.000Z' },
                                        {}, t + 30000)),
        };
    }""")
    assert rows["ready"] == [
        ["queued", 0, "record", 2500, "ready", False],
        ["provisioning", None, None, None, None, False],
        ["ready", 2500, "record", 7500, None, True],
    ]
    assert rows["raced"] == [
        ["queued", 0, "record", 300, None, False],
        ["provisioning", 300, "seen", 700, None, False],
        ["ready", 1000, "record", 4000, "terminated", False],
        ["terminating", None, None, None, None, False],
        ["terminated", 5000, "record", None, None, True],
    ]
    assert rows["failed"] == [["queued", 0, "record", 20000, None, False], ["failed", 20000, "record", None, None, True]]


def _until_status(client: httpx.Client, sid: str, status: str, timeout: float = 20.0) -> dict[str, Any]:
    """The session object once it has ``status`` (polled with a deadline)."""
    return wait_status(client, sid, {status}, timeout)


def _next_month_utc() -> str:
    """'YYYY-MM-01 00:00 UTC' of the next UTC month: when this month's budgets renew."""
    now = datetime.now(UTC)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return f"{year:04d}-{month:02d}-01 00:00 UTC"


def test_the_usage_page_shows_the_budget_after_one_session(page: Page, stack: tuple[ApiServer, Admin]) -> None:
    """Invariant: with ``session_seconds_per_month`` set, the usage page shows the budget as a bar
    with the API's numbers: while a session lives its TTL is reserved; once it ended its billable
    seconds are used and its reservation is back; remaining = limit - used - reserved, and the
    renewal is the first of next month (UTC). The unset per-end-user budget reads "no budget"."""
    api, admin = stack
    _, key = admin.tenant("metered", quotas={"session_seconds_per_month": 600})
    _sign_in(page, api.url, key)
    with tenant_client(api.url, key) as tenant_api:
        sid = tenant_api.post("/v1/sessions", json={"ttl_seconds": 60}).json()["id"]
        _until_status(tenant_api, sid, "ready")
        page.get_by_role("link", name="Usage").click()
        budget = page.locator('#usage-budgets [data-budget="session_seconds_per_month"]')
        expect(budget).to_contain_text("60 / 600 s")
        expect(budget).to_contain_text("used 0 s")
        expect(budget).to_contain_text("reserved 60 s")
        expect(budget).to_contain_text("remaining 540 s")
        expect(budget).to_contain_text(f"renews on {_next_month_utc()}")
        meter = budget.get_by_role("meter")
        expect(meter).to_have_attribute("aria-valuenow", "60")
        expect(meter).to_have_attribute("aria-valuemax", "600")
        per_user = page.locator('#usage-budgets [data-budget="session_seconds_per_end_user_per_month"]')
        expect(per_user).to_contain_text("no budget")

        assert tenant_api.delete(f"/v1/sessions/{sid}").status_code in (200, 202)
        billable = _until_status(tenant_api, sid, "terminated")["billable_seconds"]
        answer = tenant_api.get("/v1/usage").json()["budgets"]["session_seconds_per_month"]
    assert billable >= 1 and answer["used"] == billable and answer["reserved"] == 0
    page.get_by_role("button", name="Show").click()  # refresh now rather than in 5 s
    expect(budget).to_contain_text(f"{billable} / 600 s")
    expect(budget).to_contain_text(f"used {billable} s")
    expect(budget).to_contain_text("reserved 0 s")
    expect(budget).to_contain_text(f"remaining {600 - billable} s")
    expect(meter).to_have_attribute("aria-valuenow", str(billable))
    expect(page.locator("#usage-bars")).to_contain_text("Sessions today (UTC)")  # beside the quota bars
    screenshot(page, "usage-budgets")

    page.get_by_label("End-user id").fill("u_nobody")  # one end user's view: its (unset) budget, counted
    page.get_by_role("button", name="Show").click()
    expect(per_user).to_contain_text("no budget")
    expect(per_user).to_contain_text("used 0 s, reserved 0 s")
    expect(page.locator("#usage-bars")).to_contain_text("Live sessions of u_nobody")
    expect(budget).to_contain_text(f"used {billable} s")


def test_a_budget_refusal_and_a_cut_ttl_are_explained(page: Page, stack: tuple[ApiServer, Admin]) -> None:
    """Invariant: with ``session_seconds_per_month`` 100, a 60 s session is admitted as asked, the
    next is admitted with its TTL cut to the 40 s left and its page says so (ttl_limited_by:
    budget), and the third is refused 402 on the form with the budget named, used + reserved of
    the limit, and the renewal date; the refusal creates nothing."""
    api, admin = stack
    _, key = admin.tenant("metered", quotas={"session_seconds_per_month": 100, "max_concurrent_sessions": 5})
    _sign_in(page, api.url, key)

    def create(ttl: str) -> None:
        page.get_by_role("link", name="New session").click()
        page.get_by_label("TTL (seconds)").fill(ttl)
        page.get_by_role("button", name="Create session").click()

    create("60")
    expect(_status(page)).to_have_text("ready", timeout=SLOW)
    expect(page.locator("#s-ttl-limited")).to_be_hidden()
    create("60")
    expect(_status(page)).to_have_text("ready", timeout=SLOW)
    note = page.locator("#s-ttl-limited")
    expect(note).to_contain_text("ttl_limited_by: budget")
    expect(note).to_contain_text("TTL cut to 40 s")
    sid = page.locator("#s-id").inner_text()
    with tenant_client(api.url, key) as tenant_api:
        assert tenant_api.get(f"/v1/sessions/{sid}").json()["ttl_limited_by"] == "budget"
    screenshot(page, "session-ttl-cut")

    create("60")
    refusal = page.get_by_role("alert").filter(has_text="budget_exhausted")
    expect(refusal).to_be_visible()
    expect(refusal).to_contain_text("session_seconds_per_month")
    expect(refusal).to_contain_text("used 0 s + reserved by live sessions 100 s = 100 s of 100 s")
    expect(refusal).to_contain_text(f"renews on {_next_month_utc()}")
    expect(refusal).to_contain_text(re.compile(r"Retry after \d+ s \([^)]+\)\."))  # to the renewal
    screenshot(page, "create-budget-refused")
    with tenant_client(api.url, key) as tenant_api:
        assert len(tenant_api.get("/v1/sessions").json()["data"]) == 2


def _requests(page: Page) -> list[Any]:
    """Every request the page makes from now on (Playwright's request events), in order."""
    seen: list[Any] = []

    def record(request: Any) -> None:
        seen.append(request)

    page.on("request", record)
    return seen


def _paths(requests: list[Any], method: str, path: str) -> list[Any]:
    return [r for r in requests if r.method == method and urlsplit(r.url).path == path]


def test_the_timeline_follows_the_event_stream_without_polling(page: Page, stack: tuple[ApiServer, Admin]) -> None:
    """Invariant: the session page is fed by the session's event stream (one EventSource on
    /v1/sessions/{id}/events): it shows queued, ready with the frontend token, then terminated
    after a stop, with exactly one GET /v1/sessions/{id} (the token, which events withhold), and
    after the terminal event the page closes the stream rather than letting the browser
    reconnect (no second stream request while the page stays open)."""
    api, admin = stack
    _, key = admin.tenant("acme")
    _sign_in(page, api.url, key)
    requests = _requests(page)
    page.get_by_role("link", name="New session").click()
    page.get_by_label("TTL (seconds)").fill("120")
    page.get_by_role("button", name="Create session").click()
    expect(_status(page)).to_have_text("ready", timeout=SLOW)
    sid = page.locator("#s-id").inner_text()
    expect(page.locator("#s-live")).to_have_attribute("data-state", "live")
    with tenant_client(api.url, key) as tenant_api:
        token = tenant_api.get(f"/v1/sessions/{sid}").json()["avaturn"]["token"]
    expect(page.get_by_label("Avaturn session token")).to_have_value(token)
    timeline = page.locator("#s-timeline li")
    expect(timeline.first).to_contain_text("queued")
    expect(timeline.last).to_contain_text("ready")

    page.get_by_role("button", name="Stop session").click()
    expect(_status(page)).to_have_text("terminated", timeout=SLOW)
    expect(page.locator("#s-live")).to_have_attribute("data-state", "ended")
    expect(page.locator("#s-waiting")).to_contain_text("requested")
    expect(timeline.last).to_contain_text("terminated")
    screenshot(page, "session-streamed")

    session_path = f"/v1/sessions/{sid}"
    streams = _paths(requests, "GET", f"{session_path}/events")
    assert len(streams) == 1 and streams[0].resource_type == "eventsource", [r.url for r in streams]
    assert len(_paths(requests, "GET", session_path)) == 1  # the token, once: no polling
    assert len(_paths(requests, "DELETE", session_path)) == 1
    # Chromium reconnects a stream the page left open 3 s after it ends: none in twice that
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        page.wait_for_timeout(200)
        assert len(_paths(requests, "GET", f"{session_path}/events")) == 1, "the ended stream was reopened"
    assert len(_paths(requests, "GET", session_path)) == 1


def test_a_dropped_stream_says_reconnecting_and_resumes_after_the_last_event(
    page: Page, stack: tuple[ApiServer, Admin]
) -> None:
    """Invariant: when the connection carrying the event stream drops, the page says it is
    reconnecting; the browser reopens the stream with Last-Event-ID set to the last event it
    got (session.ready), and the event that happened while it was away (session.terminated)
    then reaches the timeline, with no GET polling in between."""
    api, admin = stack
    _, key = admin.tenant("acme")
    proxy = CutProxy(api.port).start()
    try:
        with tenant_client(api.url, key) as tenant_api:
            sid = tenant_api.post("/v1/sessions?wait=10", json={"ttl_seconds": 120}).json()["id"]
            _until_status(tenant_api, sid, "ready")
            _sign_in(page, proxy.url, key)
            requests = _requests(page)
            page.locator("#sessions-body a", has_text=sid).click()
            expect(_status(page)).to_have_text("ready", timeout=SLOW)
            expect(page.locator("#s-live")).to_have_attribute("data-state", "live")
            events = tenant_api.get("/v1/events", params={"session_id": sid}).json()["data"]
            assert [e["type"] for e in events] == ["session.created", "session.ready"]

            proxy.cut()
            expect(page.locator("#s-live")).to_have_attribute("data-state", "reconnecting")
            expect(page.locator("#s-live")).to_contain_text("reconnecting")
            screenshot(page, "session-reconnecting")
            assert tenant_api.delete(f"/v1/sessions/{sid}").status_code in (200, 202)
            _until_status(tenant_api, sid, "terminated")
            expect(_status(page)).to_have_text("ready")  # not told yet: the network is down
            proxy.resume()

            expect(_status(page)).to_have_text("terminated", timeout=SLOW)
            expect(page.locator("#s-live")).to_have_attribute("data-state", "ended")
            streams = _paths(requests, "GET", f"/v1/sessions/{sid}/events")
            assert len(streams) == 2, [r.url for r in streams]
            assert "last-event-id" not in streams[0].all_headers()
            assert streams[1].all_headers()["last-event-id"] == events[1]["id"]
            assert len(_paths(requests, "GET", f"/v1/sessions/{sid}")) == 1  # the token
    finally:
        proxy.stop()


def test_a_stream_refused_is_explained(page: Page, stack: tuple[ApiServer, Admin]) -> None:
    """Invariant: a session page whose stream the API refuses (an unknown session id: 404) says
    why with the API's message, and stops asking rather than retrying forever."""
    api, admin = stack
    _, key = admin.tenant("acme")
    _sign_in(page, api.url, key)
    requests = _requests(page)
    page.goto(f"{api.url}/console#/sessions/ses_doesnotexist")
    expect(page.locator("#s-fetch-error")).to_be_visible()
    expect(page.locator("#s-fetch-error")).to_contain_text(re.compile("not found|no session|unknown", re.I))
    expect(page.locator("#s-live")).to_have_attribute("data-state", "stopped")
    assert len(_paths(requests, "GET", "/v1/sessions/ses_doesnotexist")) == 0


def test_a_session_whose_events_are_gone_is_shown_as_it_is(
    page: Page, stack: tuple[ApiServer, Admin], settings: Any
) -> None:
    """Invariant: a session whose events are no longer in the outbox (kept 7 days; here deleted)
    gets an empty replay: the page then reads the session once and shows it (status, token)
    rather than an empty timeline."""
    api, admin = stack
    tenant, key = admin.tenant("acme")
    with tenant_client(api.url, key) as tenant_api:
        sid = tenant_api.post("/v1/sessions?wait=10", json={"ttl_seconds": 120}).json()["id"]
        token = _until_status(tenant_api, sid, "ready")["avaturn"]["token"]
    r = redis.Redis.from_url(settings.redis_url)
    try:
        assert r.delete(TenantScope(tenant["id"]).events()) == 1
    finally:
        r.close()
    _sign_in(page, api.url, key)
    requests = _requests(page)
    page.locator("#sessions-body a", has_text=sid).click()
    expect(_status(page)).to_have_text("ready", timeout=SLOW)
    expect(page.get_by_label("Avaturn session token")).to_have_value(token)
    expect(page.locator("#s-live")).to_have_attribute("data-state", "live")
    assert len(_paths(requests, "GET", f"/v1/sessions/{sid}")) == 1

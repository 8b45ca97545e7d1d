"""The console's webhook pages in a real browser (Debian's Chromium through Playwright) against a
real API, worker and Redis, with ``BROKER_WEBHOOK_ALLOW_PRIVATE=true`` so that an endpoint can
point at a receiver on loopback: add an endpoint and see its secret once, send a test event, see
its attempts (newest first) and resend one, edit the events filter, disable and enable, rotate
the secret, delete; refusals shown where they belong; every control labelled and the add flow
done with the keyboard. Each page is screenshotted into .artifacts/console/.

The attempts on the page are the real ones: the stack's worker delivers to the receiver (or fails
to reach a closed port), and the page shows what the delivery wrote in the attempt log."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis
from playwright.sync_api import Page, expect

from broker.embedded_redis import EmbeddedRedis, free_port
from broker.core.settings import Settings
from tests.fixtures.stack import Admin, ApiServer, make_settings, tenant_client

from .conftest import screenshot

SLOW = 20_000  # ms: a delivery and its first retry (5 s) take well under this; a ceiling
SECRET = re.compile(r"^whsec_[A-Za-z0-9+/=]{20,}$")


class Receiver:
    """A webhook receiver on loopback: keeps what it got; answers the statuses of ``answers`` in
    turn (then 200 to every POST), with the body ``thanks``."""

    def __init__(self) -> None:
        got: list[dict[str, Any]] = []
        self.answers: list[int] = []
        answers = self.answers

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                got.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                self.send_response(answers.pop(0) if answers else 200)
                self.send_header("Content-Length", "6")
                self.end_headers()
                self.wfile.write(b"thanks")

            def log_message(self, *args: Any) -> None:
                pass

        self.received = got
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        self.thread = threading.Thread(target=self.server.serve_forever, name="receiver", daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def settings(redis_server: EmbeddedRedis, sandbox: Any) -> Settings:
    """The stack's settings, with private and loopback webhook URLs allowed (development, tests)."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return make_settings(redis_server.url, sandbox, BROKER_WEBHOOK_ALLOW_PRIVATE="true")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def _sign_in(page: Page, url: str, key: str) -> None:
    page.goto(f"{url}/console")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Sessions", exact=True)).to_be_visible()


def _unlabelled(page: Page) -> list[str]:
    """Visible or not: every input, select and textarea without a label, and every button without a name."""
    return page.evaluate("""() => [
        ...[...document.querySelectorAll('input, select, textarea')]
            .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                           && !e.getAttribute('aria-labelledby')),
        ...[...document.querySelectorAll('button')]
            .filter((e) => !e.textContent.trim() && !e.getAttribute('aria-label')),
    ].map((e) => e.id || e.outerHTML)""")


def test_add_an_endpoint_see_its_secret_once_send_a_test_and_resend_an_attempt(
    page: Page, stack: tuple[ApiServer, Admin], receiver: Receiver
) -> None:
    """Invariant: the add form creates the endpoint with the events filter chosen; its signing
    secret is shown once (with a copy button and the "you will not see it again" note), is in no
    other answer, and leaves the page when dismissed; "Send test event" is accepted (a test.ping
    event for this endpoint) and delivered, signed, to the receiver: a first 503 and the retry's
    200 show in the attempt log newest first with status, the receiver's answer and latency;
    "Resend" delivers the same event again (same webhook-id), shown above them."""
    api, admin = stack
    tenant, key = admin.tenant("acme")
    _sign_in(page, api.url, key)
    receiver.answers.append(503)  # the first delivery is refused: the retry delivers it
    page.get_by_role("link", name="Webhooks").click()
    expect(page.get_by_role("heading", name="Webhook endpoints")).to_be_visible()
    expect(page.get_by_text("No endpoints yet.")).to_be_visible()
    assert _unlabelled(page) == []

    page.get_by_role("textbox", name="Endpoint URL").fill(receiver.url)
    page.get_by_role("textbox", name="Description").fill("orders service")
    page.get_by_role("checkbox", name="All event types").uncheck()
    page.get_by_role("checkbox", name="session.ready", exact=True).check()
    page.get_by_role("checkbox", name="test.ping", exact=True).check()
    screenshot(page, "webhook-add")
    page.get_by_role("button", name="Add endpoint").click()

    box = page.locator("#wh-secret-box")
    expect(box).to_be_visible()
    expect(box).to_contain_text("you will not see it again")
    secret = page.get_by_role("textbox", name="Signing secret", exact=True).input_value()
    assert SECRET.match(secret), secret
    page.get_by_role("button", name="Copy secret").click()
    expect(page.locator("#wh-secret-copied")).not_to_be_empty()
    row = page.locator("#webhooks-body tr", has_text=receiver.url)
    expect(row).to_contain_text("session.ready, test.ping")
    expect(row).to_contain_text("enabled")
    screenshot(page, "webhook-secret")
    with tenant_client(api.url, key) as tenant_api:
        listed = tenant_api.get("/v1/webhook_endpoints")
        (endpoint,) = listed.json()["data"]
        assert secret not in listed.text
    assert endpoint["url"] == receiver.url and endpoint["description"] == "orders service"
    assert endpoint["events"] == ["session.ready", "test.ping"]
    weid = endpoint["id"]
    expect(row).to_contain_text(weid)

    page.get_by_role("button", name="I have copied it").click()
    expect(box).to_be_hidden()
    assert secret not in page.content()
    page.reload()
    expect(page.get_by_role("heading", name="Webhook endpoints")).to_be_visible()
    expect(row).to_be_visible()
    assert secret not in page.content()

    row.get_by_role("link", name=weid).click()
    expect(page.get_by_role("heading", name=f"Endpoint {weid}")).to_be_visible()
    expect(page.locator("#wh-details")).to_contain_text(receiver.url)
    expect(page.get_by_text("No delivery attempts yet.")).to_be_visible()
    assert _unlabelled(page) == []
    page.get_by_role("button", name="Send test event").click()
    result = page.locator("#wh-action-result")
    expect(result).to_contain_text(re.compile(r"Test event evt_\S+ \(test\.ping\) queued"))
    test_event = re.search(r"evt_[0-9-]+", result.inner_text())
    assert test_event is not None
    with tenant_client(api.url, key) as tenant_api:
        events = tenant_api.get("/v1/events", params={"type": "test.ping"}).json()["data"]
    assert [(e["id"], e["data"]["endpoint_id"]) for e in events] == [(test_event[0], weid)]

    attempts = page.locator("#wh-attempts-body tr")
    expect(attempts).to_have_count(2, timeout=SLOW)  # the 503, then the retry 5 s (+-10 %) later
    expect(attempts.first).to_contain_text("#2")
    expect(attempts.first).to_contain_text("HTTP 200")
    expect(attempts.first).to_contain_text("thanks")
    expect(attempts.first).to_contain_text(re.compile(r"\d+ ms"))
    expect(attempts.first).to_contain_text(test_event[0])
    expect(attempts.nth(1)).to_contain_text("#1")
    expect(attempts.nth(1)).to_contain_text("HTTP 503")
    assert [r["headers"]["webhook-id"] for r in receiver.received] == [test_event[0]] * 2
    assert all(r["headers"]["webhook-signature"].startswith("v1,") for r in receiver.received)
    screenshot(page, "webhook-attempts")

    attempts.first.get_by_role("button", name=f"Resend {test_event[0]}").click()
    expect(result).to_contain_text(f"Resend of {test_event[0]} queued.")
    expect(page.locator("#wh-action-error")).to_be_empty()
    expect(attempts).to_have_count(3, timeout=SLOW)
    expect(attempts.first).to_contain_text("HTTP 200")
    assert [r["headers"]["webhook-id"] for r in receiver.received] == [test_event[0]] * 3


def test_an_attempt_without_an_answer_shows_why(page: Page, stack: tuple[ApiServer, Admin]) -> None:
    """Invariant: a delivery to a loopback port nobody listens on is an attempt with no HTTP
    status; the page says "no answer" and the delivery's reason (connect_error)."""
    api, admin = stack
    _, key = admin.tenant("acme")
    with tenant_client(api.url, key) as tenant_api:
        weid = tenant_api.post("/v1/webhook_endpoints", json={"url": f"http://127.0.0.1:{free_port()}/x"}).json()["id"]
    _sign_in(page, api.url, key)
    page.goto(f"{api.url}/console#/webhooks/{weid}")
    page.get_by_role("button", name="Send test event").click()
    attempts = page.locator("#wh-attempts-body tr")
    expect(attempts.first).to_contain_text("no answer connect_error", timeout=SLOW)
    expect(attempts.first).to_contain_text("#1")
    screenshot(page, "webhook-attempt-failed")


def test_edit_disable_enable_rotate_and_delete_an_endpoint(
    page: Page, stack: tuple[ApiServer, Admin], receiver: Receiver
) -> None:
    """Invariant: the endpoint page saves a new events filter (the API then holds it), refuses a
    bad URL next to its field, disables (a test is then refused with the API's reason) and
    enables again, rotates the secret (the new one shown once, different, with the 24 h overlap
    explained, gone from the page on leaving it), and deletes after a confirmation."""
    api, admin = stack
    _, key = admin.tenant("acme")
    with tenant_client(api.url, key) as tenant_api:
        created = tenant_api.post("/v1/webhook_endpoints", json={"url": receiver.url}).json()
    weid = created["id"]
    _sign_in(page, api.url, key)
    page.goto(f"{api.url}/console#/webhooks/{weid}")
    expect(page.get_by_role("heading", name=f"Endpoint {weid}")).to_be_visible()
    expect(page.locator("#wh-details")).to_contain_text("enabled")

    expect(page.get_by_role("checkbox", name="All event types")).to_be_checked()
    page.get_by_role("checkbox", name="All event types").uncheck()
    page.get_by_role("checkbox", name="session.failed", exact=True).check()
    page.get_by_role("checkbox", name="session.terminated", exact=True).check()
    page.get_by_role("button", name="Save changes").click()
    expect(page.locator("#wh-action-result")).to_have_text("Changes saved.")
    expect(page.locator("#wh-details")).to_contain_text("session.failed, session.terminated")
    with tenant_client(api.url, key) as tenant_api:
        assert tenant_api.get(f"/v1/webhook_endpoints/{weid}").json()["events"] == [
            "session.failed", "session.terminated"]

    url = page.get_by_role("textbox", name="Endpoint URL")
    url.fill("ftp://127.0.0.1/hooks")
    page.get_by_role("button", name="Save changes").click()
    expect(page.locator("#whe-url-error")).to_contain_text("invalid_webhook_url")
    expect(url).to_have_attribute("aria-invalid", "true")
    url.fill(receiver.url)

    page.get_by_role("button", name="Disable endpoint").click()
    expect(page.locator("#wh-disabled-note")).to_contain_text("you disabled it")
    page.get_by_role("button", name="Send test event").click()
    expect(page.locator("#wh-action-error")).to_contain_text("webhook_endpoint_disabled")
    screenshot(page, "webhook-disabled")
    page.get_by_role("button", name="Enable endpoint").click()
    expect(page.locator("#wh-disabled-note")).to_be_hidden()
    expect(page.locator("#wh-details")).to_contain_text("enabled")
    with tenant_client(api.url, key) as tenant_api:
        assert tenant_api.get(f"/v1/webhook_endpoints/{weid}").json()["disabled"] is False

    page.get_by_role("button", name="Rotate secret").click()
    box = page.locator("#wh-secret-box")
    expect(box).to_be_visible()
    expect(box).to_contain_text("24 hours")
    rotated = page.get_by_role("textbox", name="Signing secret", exact=True).input_value()
    assert SECRET.match(rotated) and rotated != created["secret"]
    screenshot(page, "webhook-rotated")
    page.get_by_role("link", name="All webhook endpoints").click()
    expect(page.get_by_role("heading", name="Webhook endpoints")).to_be_visible()
    expect(box).to_be_hidden()
    assert rotated not in page.content() and created["secret"] not in page.content()

    page.locator("#webhooks-body").get_by_role("link", name=weid).click()
    page.get_by_role("button", name="Delete endpoint").click()
    expect(page.get_by_role("button", name="Yes, delete it")).to_be_focused()
    page.get_by_role("button", name="Keep it").click()
    expect(page.get_by_role("button", name="Delete endpoint")).to_be_visible()
    page.get_by_role("button", name="Delete endpoint").click()
    page.get_by_role("button", name="Yes, delete it").click()
    expect(page.get_by_role("heading", name="Webhook endpoints")).to_be_visible()
    expect(page.get_by_text("No endpoints yet.")).to_be_visible()
    with tenant_client(api.url, key) as tenant_api:
        assert tenant_api.get(f"/v1/webhook_endpoints/{weid}").status_code == 404


def test_refusals_of_the_add_form_are_explained(page: Page, stack: tuple[ApiServer, Admin]) -> None:
    """Invariant: a URL the API refuses is explained next to the URL field, an empty events
    filter next to the events, and the eleventh endpoint's 409 in the form's banner with the
    limit; nothing is created by a refused form."""
    api, admin = stack
    _, key = admin.tenant("acme")
    _sign_in(page, api.url, key)
    page.get_by_role("link", name="Webhooks").click()
    url = page.get_by_role("textbox", name="Endpoint URL")
    url.fill("not a url")
    page.get_by_role("button", name="Add endpoint").click()
    expect(page.locator("#wh-url-error")).to_contain_text("invalid_webhook_url")
    expect(url).to_have_attribute("aria-invalid", "true")

    url.fill("http://127.0.0.1:9/hooks")
    page.get_by_role("checkbox", name="All event types").uncheck()
    page.get_by_role("button", name="Add endpoint").click()
    expect(page.locator("#wh-events-error")).to_contain_text("invalid_event_type")
    expect(url).not_to_have_attribute("aria-invalid", "true")
    with tenant_client(api.url, key) as tenant_api:
        assert tenant_api.get("/v1/webhook_endpoints").json()["data"] == []
        for n in range(10):
            assert tenant_api.post("/v1/webhook_endpoints", json={"url": f"http://127.0.0.1:9/{n}"}).status_code == 201
    page.get_by_role("checkbox", name="All event types").check()
    page.get_by_role("button", name="Add endpoint").click()
    refusal = page.get_by_role("alert").filter(has_text="webhook_endpoint_limit")
    expect(refusal).to_be_visible()
    expect(refusal).to_contain_text("Limit 10.")
    expect(page.locator("#webhooks-body tr")).to_have_count(10)
    screenshot(page, "webhook-add-refused")
    with tenant_client(api.url, key) as tenant_api:
        assert len(tenant_api.get("/v1/webhook_endpoints").json()["data"]) == 10


def _tab_to(page: Page, matches: str, limit: int = 60) -> None:
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate(f"() => {{ const e = document.activeElement; return Boolean({matches}); }}"):
            return
    raise AssertionError(f"Tab never reached {matches}")


def test_an_endpoint_is_added_with_the_keyboard_alone(
    page: Page, stack: tuple[ApiServer, Admin], receiver: Receiver
) -> None:
    """Invariant: the add form (URL, description, the events checkboxes, the button) and the
    secret's copy and dismiss buttons work with the keyboard alone."""
    api, admin = stack
    _, key = admin.tenant("acme")
    _sign_in(page, api.url, key)
    _tab_to(page, "e.tagName === 'A' && e.textContent === 'Webhooks'")
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Webhook endpoints")).to_be_visible()
    _tab_to(page, "e.id === 'wh-url'")
    page.keyboard.type(receiver.url)
    _tab_to(page, "e.id === 'wh-description'")
    page.keyboard.type("typed")
    _tab_to(page, "e.id === 'wh-events-all'")
    page.keyboard.press("Space")
    _tab_to(page, "e.dataset.type === 'session.terminated'")
    page.keyboard.press("Space")
    _tab_to(page, "e.tagName === 'BUTTON' && e.textContent === 'Add endpoint'")
    page.keyboard.press("Enter")
    expect(page.locator("#wh-secret-box")).to_be_visible()
    expect(page.locator("#wh-secret-title")).to_be_focused()
    _tab_to(page, "e.id === 'wh-secret-copy'")
    page.keyboard.press("Enter")
    expect(page.locator("#wh-secret-copied")).not_to_be_empty()
    _tab_to(page, "e.id === 'wh-secret-done'")
    page.keyboard.press("Enter")
    expect(page.locator("#wh-secret-box")).to_be_hidden()
    with tenant_client(api.url, key) as tenant_api:
        (endpoint,) = tenant_api.get("/v1/webhook_endpoints").json()["data"]
    assert endpoint["events"] == ["session.terminated"] and endpoint["description"] == "typed"

"""Redaction by construction: a full stack (API, worker, sandbox upstreams) runs with distinct
random secrets through the happy path and the error paths (OpenAI 401 echoing part of the key,
an upstream 400 and 5xx whose text carries a key, Avaturn 401, revoked and malformed keys, Redis
unreachable), while every log line (JSON at DEBUG), every response body and header and every
metric exposition is captured. No secret, and no 8-character piece of one, may appear anywhere;
the Avaturn frontend token may appear only in its own tenant's session answers.
"""

from __future__ import annotations

import io
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest
from prometheus_client import generate_latest

from broker.embedded_redis import EmbeddedRedis, free_port
from tests.fixtures.stack import ApiServer, WorkerThread, make_settings
from workers.sandbox import SandboxServer, fingerprint

from .support import broker_logs, leaked_fragments, redis_dump

EK = re.compile(r"ek_[A-Za-z0-9_\-]{8,}")


def _secret(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(24)


@dataclass
class Capture:
    """Everything the outside world could see, by who received it."""

    responses: list[tuple[str, str]] = field(default_factory=list)  # (owner, headers + body)
    logs: str = ""
    metrics: list[str] = field(default_factory=list)

    def client(self, base_url: str, owner: str, token: str | None) -> httpx.Client:
        def record(response: httpx.Response) -> None:
            response.read()
            self.responses.append((owner, f"{response.status_code} {dict(response.headers)}\n{response.text}"))

        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return httpx.Client(base_url=base_url, headers=headers, timeout=40, event_hooks={"response": [record]})

    def seen_by(self, owner: str | None = None, *, excluding: str | None = None) -> str:
        return "\n".join(t for o, t in self.responses if (owner is None or o == owner) and o != excluding)


@dataclass
class Scenario:
    capture: Capture
    secrets: dict[str, str]            # name -> value that must never be shown
    shown_once: dict[str, str]         # tenant API key -> the owner label of the answer that created it
    tokens: dict[str, set[str]]        # tenant label -> Avaturn frontend tokens it received
    minted: list[str]                  # sandbox fingerprints of every client secret minted
    redis_text: str


@pytest.fixture(scope="module")
def log_buffer() -> Iterator[io.StringIO]:
    """The broker's own logging setup (JSON, DEBUG) writing into a buffer; restored afterwards."""
    with broker_logs("DEBUG") as buffer:
        yield buffer


def _tenant(admin: httpx.Client, cap: Scenario, label: str, **body: Any) -> tuple[str, str]:
    r = admin.post("/admin/v1/tenants", json={"name": f"tenant {label}", **body})
    assert r.status_code == 201, r.text
    tid = r.json()["id"]
    k = admin.post(f"/admin/v1/tenants/{tid}/keys")
    assert k.status_code == 201, k.text
    key = k.json()["key"]
    cap.secrets[f"api key of {label}"] = key
    cap.shown_once[key] = "admin"
    return tid, key


def _sessions_in(text: str) -> Iterator[dict[str, Any]]:
    try:
        body = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return
    items = body.get("data", [body]) if isinstance(body, dict) else []
    yield from (s for s in items if isinstance(s, dict) and "status" in s)


@pytest.fixture(scope="module")
def scenario(redis_server: EmbeddedRedis, sandbox_server: SandboxServer, log_buffer: io.StringIO) -> Iterator[Scenario]:
    """The whole run, once for the module's checks."""
    import redis as sync_redis

    flusher = sync_redis.Redis.from_url(redis_server.url)
    flusher.flushall()
    flusher.close()
    sandbox = sandbox_server
    sandbox.reset()
    names = {"admin token": _secret("adm"), "platform OpenAI key": _secret("sk-"),
             "platform Avaturn key": _secret("avt"), "A OpenAI key": _secret("sk-"), "A Avaturn key": _secret("avt"),
             "B OpenAI key": _secret("sk-"), "B Avaturn key": _secret("avt"),
             "C OpenAI key (rejected)": _secret("sk-invalidQ"), "D OpenAI key": _secret("sk-"),
             "E Avaturn key (rejected)": _secret("invalidQ")}
    settings = make_settings(redis_server.url, sandbox, BROKER_ADMIN_TOKEN=names["admin token"],
                             BROKER_OPENAI_API_KEY=names["platform OpenAI key"],
                             BROKER_AVATURN_API_KEY=names["platform Avaturn key"])
    for i, key in enumerate(settings.secret_keys):
        names[f"BROKER_SECRET_KEY {i}"] = key
    cap = Scenario(Capture(), dict(names), {}, {"A": set(), "B": set()}, [], "")
    api, worker = ApiServer(settings).start(), WorkerThread(settings).start()
    dead_redis = msgspec.structs.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    try:
        _run(cap, api.url, names, sandbox)
        _run_without_redis(cap, dead_redis)
        with cap.capture.client(api.url, "anonymous", None) as anon:
            cap.capture.metrics.append(anon.get("/metrics").text)
        cap.capture.metrics.append(generate_latest(worker.metrics.registry).decode())
    finally:
        worker.stop()
        api.stop()
    cap.capture.logs = log_buffer.getvalue()
    cap.minted = [s["secret_fingerprint"] for s in sandbox.audit()["secrets"]]
    cap.redis_text = redis_dump(redis_server.url)
    yield cap


def _run(cap: Scenario, url: str, names: dict[str, str], sandbox: SandboxServer) -> None:
    c = cap.capture
    with c.client(url, "admin", names["admin token"]) as admin:
        tid_a, key_a = _tenant(admin, cap, "A", openai={"api_key": names["A OpenAI key"]},
                               avaturn={"api_key": names["A Avaturn key"]})
        tid_b, key_b = _tenant(admin, cap, "B", openai={"api_key": names["B OpenAI key"]},
                               avaturn={"api_key": names["B Avaturn key"]})
        _, key_c = _tenant(admin, cap, "C", openai={"api_key": names["C OpenAI key (rejected)"]})
        _, key_d = _tenant(admin, cap, "D", openai={"api_key": names["D OpenAI key"]})
        _, key_e = _tenant(admin, cap, "E", avaturn={"api_key": names["E Avaturn key (rejected)"]})
        _, key_p = _tenant(admin, cap, "P")  # platform credentials
        spare = admin.post(f"/admin/v1/tenants/{tid_b}/keys").json()
        cap.secrets["spare key of B"] = spare["key"]
        cap.shown_once[spare["key"]] = "admin"
        for tid in (tid_a, tid_b):
            assert admin.get(f"/admin/v1/tenants/{tid}").status_code == 200
            assert admin.get(f"/admin/v1/tenants/{tid}/keys").status_code == 200
        assert admin.get("/admin/v1/tenants").status_code == 200
        assert admin.delete(f"/admin/v1/tenants/{tid_b}/keys/{spare['id']}").status_code == 200

    with c.client(url, "A", key_a) as a, c.client(url, "B", key_b) as b:
        ready = a.post("/v1/sessions?wait=10", json={"end_user": "u1"}, headers={"Idempotency-Key": "idem-1"})
        assert ready.status_code == 201, ready.text
        sid = ready.json()["id"]
        assert a.post("/v1/sessions?wait=10", json={"end_user": "u1"}, headers={"Idempotency-Key": "idem-1"}).json()["id"] == sid
        assert a.post("/v1/sessions", json={"end_user": "u2"}, headers={"Idempotency-Key": "idem-1"}).status_code == 422
        for path in (f"/v1/sessions/{sid}", "/v1/sessions", "/v1/usage?end_user=u1"):
            assert a.get(path).status_code == 200
        assert b.post("/v1/sessions?wait=10").status_code == 201
        for attempt in (b.get(f"/v1/sessions/{sid}"), b.delete(f"/v1/sessions/{sid}"),
                        b.post("/v1/sessions", headers={"Idempotency-Key": "idem-1"})):
            assert attempt.status_code in (404, 201, 202), attempt.text
        assert b.get("/v1/sessions").status_code == 200
        assert a.delete(f"/v1/sessions/{sid}").status_code in (200, 202)

        # upstream errors whose text carries a key: a 5xx body and a 400 message
        sandbox.configure({"mint": {"fail": [{"status": 500, "count": 1, "body": f"boom {names['A OpenAI key']}"}]},
                           "create": {"fail": [{"status": 503, "count": 1, "message": f"down {names['A Avaturn key']}"}]}})
        assert a.post("/v1/sessions?wait=15").status_code == 201
    echo_d = {"mint": {"fail": [{"status": 400, "count": 1, "code": "invalid_value",
                                 "message": f"Invalid value: '{names['D OpenAI key']}' for {names['D OpenAI key']}"}]}}
    for label, key, faults in (("C", key_c, {}), ("D", key_d, echo_d), ("E", key_e, {})):
        sandbox.configure(faults)
        with c.client(url, label, key) as t:
            failed = t.post("/v1/sessions?wait=15")
            assert failed.status_code == 502, failed.text
    sandbox.configure({})
    with c.client(url, "P", key_p) as p:
        assert p.post("/v1/sessions?wait=10").status_code == 201
    # refused credentials: revoked, unknown, malformed, a tenant key on the admin API
    for owner, token, path in (("revoked", cap.secrets["spare key of B"], "/v1/sessions"),
                               ("A-on-admin", key_a, "/admin/v1/tenants"),
                               ("admin-on-tenant", names["admin token"], "/v1/sessions"),
                               ("malformed", key_a[:-2], "/v1/sessions"),
                               ("garbage", names["platform OpenAI key"], "/v1/sessions")):
        with c.client(url, owner, token) as bad:
            assert bad.get(path).status_code == 401
    for owner, text in c.responses:
        if owner in cap.tokens:
            for s in _sessions_in(text.split("\n", 1)[1]):
                if s.get("avaturn") and s["avaturn"].get("token"):
                    cap.tokens[owner].add(s["avaturn"]["token"])


def _run_without_redis(cap: Scenario, settings: Any) -> None:
    """An API whose Redis is unreachable: every request answers 503 (key in hand)."""
    server = ApiServer(settings).start()
    try:
        with cap.capture.client(server.url, "no-redis", cap.secrets["api key of A"]) as c:
            r = c.get("/v1/sessions")
            assert r.status_code == 503 and r.json()["error"]["code"] == "redis_unavailable"
            assert c.get("/readyz").status_code == 503
    finally:
        server.stop()


def test_no_secret_in_logs_responses_metrics_or_redis(scenario: Scenario) -> None:
    """Invariant: no configured secret (admin token, platform and tenant upstream keys,
    BROKER_SECRET_KEY, tenant API keys outside the answer that created them) nor any 8-character
    piece of one appears in a log line, a response (headers included), a metric, or (for everything
    but the Fernet keys' own ciphertexts) Redis; and no minted client secret appears anywhere."""
    cap = scenario.capture
    assert len(cap.responses) > 40 and cap.logs.count("\n") > 50 and len(cap.metrics) == 2
    assert '"level":"debug"' in cap.logs  # DEBUG really was on
    for name, value in scenario.secrets.items():
        api_key = value in scenario.shown_once
        # a tenant API key: shown once, to the admin that created it; listings show its 8-char prefix
        allowed = frozenset({value[:8]}) if api_key else frozenset()
        if api_key:
            creations = [o for o, t in cap.responses if f'"key":"{value}"' in t]
            assert creations == [scenario.shown_once[value]], name
        responses = "\n".join(t for _, t in cap.responses if f'"key":"{value}"' not in t)
        for where, text in (("logs", cap.logs), ("responses", responses), ("metrics", "\n".join(cap.metrics)),
                            ("redis", scenario.redis_text)):
            assert value not in text, f"{name} found in {where}"
            assert not leaked_fragments(value, text, allowed=allowed), f"a piece of {name} found in {where}"
    everything = "\n".join([cap.logs, cap.seen_by(), *cap.metrics, scenario.redis_text])
    assert len(scenario.minted) >= 4
    assert not EK.findall(everything), "a client secret (ek_...) appeared"
    shown = {fingerprint(tok) for tok in re.findall(r"ek_[A-Za-z0-9_\-]+", everything)}
    assert not shown & set(scenario.minted)


def test_frontend_token_only_in_its_own_tenants_answers(scenario: Scenario) -> None:
    """Invariant: an Avaturn frontend token appears in its own tenant's session answers only: never
    in logs, metrics, admin answers, refused requests or another tenant's answers."""
    cap = scenario.capture
    assert scenario.tokens["A"] and scenario.tokens["B"]
    assert not scenario.tokens["A"] & scenario.tokens["B"]
    for owner, tokens in scenario.tokens.items():
        elsewhere = "\n".join([cap.logs, *cap.metrics, cap.seen_by(excluding=owner)])
        for token in tokens:
            assert token not in elsewhere, f"{owner}'s frontend token shown outside its own answers"
            assert not leaked_fragments(token, elsewhere), f"a piece of {owner}'s frontend token leaked"

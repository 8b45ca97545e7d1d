"""The sandbox upstreams on the wire: OpenAI/Avaturn behaviour, audit, fault injection, control API."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from workers.sandbox import SandboxControl, SandboxProcess, SandboxServer

KEY = "sk-test-0123456789abcdef"
AV_KEY = "av-project-key-1"
NON_GA = [
    "temperature", "voice", "modalities", "input_audio_format", "output_audio_format",
    "input_audio_transcription", "turn_detection", "max_response_output_tokens", "frobnicate",
]
FULL_GA_SESSION: dict[str, Any] = {
    "type": "realtime",
    "model": "gpt-realtime",
    "instructions": "Be brief.",
    "output_modalities": ["audio"],
    "max_output_tokens": "inf",
    "audio": {
        "input": {"format": {"type": "audio/pcm", "rate": 24000}, "noise_reduction": {"type": "near_field"},
                  "transcription": {"model": "whisper-1", "language": "en"},
                  "turn_detection": {"type": "semantic_vad"}},
        "output": {"voice": "marin", "speed": 1.1, "format": {"type": "audio/pcm"}},
    },
    "tools": [{"type": "function", "name": "lookup", "description": "d", "parameters": {"type": "object"}}],
    "tool_choice": "auto",
    "prompt": {"id": "pmpt_1", "version": "3", "variables": {"name": "x"}},
}


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0, verify=False) as client:
        yield client


def mint(http: httpx.Client, sb: SandboxControl, body: Any, key: str | None = KEY, **headers: str) -> httpx.Response:
    hdrs = dict(headers)
    if key is not None:
        hdrs.setdefault("Authorization", f"Bearer {key}")
    return http.post(sb.openai_base_url + "/realtime/client_secrets", json=body, headers=hdrs)


def good_mint(http: httpx.Client, sb: SandboxControl, seconds: int = 600) -> str:
    r = mint(http, sb, {"expires_after": {"anchor": "created_at", "seconds": seconds}, "session": {"type": "realtime"}})
    assert r.status_code == 200, r.text
    return str(r.json()["value"])


def create(http: httpx.Client, sb: SandboxControl, secret: str | None, key: str = AV_KEY,
           **fields: Any) -> httpx.Response:
    body: dict[str, Any] = {"avatar_id": "jane_20240829", "background": "default", "user_absent_timeout": 30,
                            "max_duration": 600}
    if secret is not None:
        body["conversation_engine"] = {"type": "openai-realtime", "client_secret": secret}
    body.update(fields)
    body = {k: v for k, v in body.items() if v is not None}
    return http.post(sb.avaturn_base_url + "/sessions", json=body, headers={"Authorization": f"Bearer {key}"})


def delete(http: httpx.Client, sb: SandboxControl, sid: str, key: str = AV_KEY) -> httpx.Response:
    return http.delete(f"{sb.avaturn_base_url}/sessions/{sid}", headers={"Authorization": f"Bearer {key}"})


# -- OpenAI ----------------------------------------------------------------------------------


def test_mint_answers_like_openai_and_audits_only_fingerprints(sandbox: SandboxServer, http: httpx.Client) -> None:
    """A GA mint answers value/expires_at/session; the audit holds sha256 of secret and key, never the values."""
    before = time.time()
    r = mint(http, sandbox, {"expires_after": {"anchor": "created_at", "seconds": 120}, "session": FULL_GA_SESSION})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["value"].startswith("ek_") and len(body["value"]) > 20
    assert before + 119 <= body["expires_at"] <= time.time() + 121
    assert body["session"]["object"] == "realtime.session" and body["session"]["id"].startswith("sess_")
    assert body["session"]["instructions"] == "Be brief."
    raw_audit = http.get(sandbox.base_url + "/_sandbox/audit").text
    assert body["value"] not in raw_audit and KEY not in raw_audit
    [secret] = sandbox.audit()["secrets"]
    assert secret["secret_fingerprint"] == sha(body["value"])
    assert secret["key_fingerprint"] == sha(KEY)
    assert secret["session"] == FULL_GA_SESSION and secret["expires_after_seconds"] == 120


def test_two_mints_give_distinct_secrets(sandbox: SandboxServer, http: httpx.Client) -> None:
    """Every mint returns a fresh secret."""
    assert good_mint(http, sandbox) != good_mint(http, sandbox)


def test_bearer_matched_case_insensitively(sandbox: SandboxServer, http: httpx.Client) -> None:
    """Header name and scheme are case-insensitive (SDK 3.x sends lowercase names)."""
    body = {"session": {"type": "realtime"}}
    assert mint(http, sandbox, body, key=None, AUTHORIZATION=f"bearer {KEY}").status_code == 200
    assert mint(http, sandbox, body, key=None, authorization=f"BEARER {KEY}").status_code == 200


@pytest.mark.parametrize("key", ["pk-123456789012345", "sk-this-is-invalid-key-9f3e"])
def test_bad_key_is_401_echoing_part_of_it(sandbox: SandboxServer, http: httpx.Client, key: str) -> None:
    """A key not starting with sk- or containing 'invalid' gets 401 invalid_api_key echoing a masked key."""
    r = mint(http, sandbox, {"session": {"type": "realtime"}}, key=key)
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    assert key[:6] in err["message"] and key[-4:] in err["message"] and key not in err["message"]
    assert sandbox.audit()["secrets"] == []


def test_missing_key_is_401(sandbox: SandboxServer, http: httpx.Client) -> None:
    """No Authorization header: 401 and nothing minted."""
    r = mint(http, sandbox, {"session": {"type": "realtime"}}, key=None)
    assert r.status_code == 401 and "error" in r.json()
    assert sandbox.audit()["counters"]["mint"]["401"] == 1


@pytest.mark.parametrize("field", NON_GA)
def test_non_ga_session_field_is_unknown_parameter(sandbox: SandboxServer, http: httpx.Client, field: str) -> None:
    """Beta-only and unknown session fields answer 400 unknown_parameter naming session.<field>."""
    r = mint(http, sandbox, {"session": {"type": "realtime", field: 0.8}})
    assert r.status_code == 400
    assert r.json()["error"] == {"message": f"Unknown parameter: 'session.{field}'.", "type": "invalid_request_error",
                                 "param": f"session.{field}", "code": "unknown_parameter"}


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"session": {"model": "gpt-realtime"}}, "session.type", "missing_required_parameter"),
        ({}, "session.type", "missing_required_parameter"),
        ({"session": {"type": "transcription"}}, "session.type", "invalid_value"),
        ({"session": {"type": "realtime", "prompt": {"id": "p", "version": 3}}}, "session.prompt.version",
         "invalid_type"),
        ({"session": {"type": "realtime"}, "expires_after": {"anchor": "created_at", "seconds": 9}},
         "expires_after.seconds", "integer_below_min_value"),
        ({"session": {"type": "realtime"}, "expires_after": {"anchor": "created_at", "seconds": 7201}},
         "expires_after.seconds", "integer_above_max_value"),
        ({"session": {"type": "realtime"}, "expires_after": {"anchor": "now", "seconds": 60}},
         "expires_after.anchor", "invalid_value"),
        ({"session": {"type": "realtime"}, "voice": "alloy"}, "voice", "unknown_parameter"),
        ({"session": {"type": "realtime", "audio": {"output": {"voice": "nobody"}}}}, "session.audio.output.voice",
         "invalid_value"),
        ({"session": {"type": "realtime", "audio": {"output": {"speed": 2}}}}, "session.audio.output.speed",
         "decimal_above_max_value"),
        ({"session": {"type": "realtime", "audio": {"output": {"temperature": 1}}}}, "session.audio.output.temperature",
         "unknown_parameter"),
        ({"session": {"type": "realtime", "max_output_tokens": 5000}}, "session.max_output_tokens",
         "integer_above_max_value"),
        ({"session": {"type": "realtime", "output_modalities": ["audio", "text"]}}, "session.output_modalities",
         "invalid_value"),
    ],
)
def test_ga_body_validation(sandbox: SandboxServer, http: httpx.Client, body: Any, param: str, code: str) -> None:
    """Each GA rule violation answers 400 with OpenAI's error shape naming the parameter; nothing is minted."""
    r = mint(http, sandbox, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code)
    assert set(err) == {"message", "type", "param", "code"}
    assert sandbox.audit()["secrets"] == []


def test_unparseable_body_is_400(sandbox: SandboxServer, http: httpx.Client) -> None:
    """A body that is not a JSON object answers 400 in OpenAI's shape."""
    r = http.post(sandbox.openai_base_url + "/realtime/client_secrets", content=b"{nope",
                  headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


# -- Avaturn ---------------------------------------------------------------------------------


def test_create_and_delete_session_with_audit(sandbox: SandboxServer, http: httpx.Client) -> None:
    """Create answers session_id+token and records every field; DELETE answers 200 empty, then 404."""
    secret = good_mint(http, sandbox)
    r = create(http, sandbox, secret, avatar_id="bob", background="transparent", max_duration=120)
    assert r.status_code == 200, r.text
    sid, token = r.json()["session_id"], r.json()["token"]
    assert sid and token and set(r.json()) == {"session_id", "token"}
    [session] = sandbox.audit()["sessions"]
    assert session["session_id"] == sid and session["live"] is True and session["ended_by"] is None
    assert (session["avatar_id"], session["background"], session["max_duration"], session["user_absent_timeout"]) == (
        "bob", "transparent", 120, 30)
    assert session["secret_fingerprint"] == sha(secret) and session["key_fingerprint"] == sha(AV_KEY)
    gone = delete(http, sandbox, sid)
    assert gone.status_code == 200 and gone.content == b""
    again = delete(http, sandbox, sid)
    assert again.status_code == 404
    audit = sandbox.audit()
    [session] = audit["sessions"]
    assert session["live"] is False and session["ended_by"] == "delete" and session["deleted_at"] is not None
    assert [(d["session_id"], d["status"]) for d in audit["deletes"]] == [(sid, 200), (sid, 404)]
    assert audit["live_sessions"] == 0


def test_delete_unknown_or_foreign_session_is_404(sandbox: SandboxServer, http: httpx.Client) -> None:
    """Unknown ids and another project key's sessions answer 404 and leave the session live."""
    sid = create(http, sandbox, good_mint(http, sandbox)).json()["session_id"]
    assert delete(http, sandbox, "no-such-session").status_code == 404
    assert delete(http, sandbox, sid, key="av-other-project").status_code == 404
    assert sandbox.audit()["sessions"][0]["live"] is True


@pytest.mark.parametrize(
    ("fields", "status", "loc"),
    [
        ({"max_duration": 59}, 422, ["body", "max_duration"]),
        ({"max_duration": 86401}, 422, ["body", "max_duration"]),
        ({"user_absent_timeout": 9}, 422, ["body", "user_absent_timeout"]),
        ({"max_duration": "long"}, 422, ["body", "max_duration"]),
        ({"background": "green"}, 400, None),
        ({"model": "alpha"}, 400, None),
    ],
)
def test_create_field_validation(sandbox: SandboxServer, http: httpx.Client, fields: dict[str, Any], status: int,
                                 loc: list[str] | None) -> None:
    """Out-of-range fields answer 422 FastAPI-style (with loc) or 400; no session is created."""
    r = create(http, sandbox, good_mint(http, sandbox), **fields)
    assert r.status_code == status, r.text
    if loc is not None:
        assert r.json()["detail"][0]["loc"] == loc and {"msg", "type"} <= set(r.json()["detail"][0])
    else:
        assert isinstance(r.json()["detail"], str)
    assert sandbox.audit()["sessions"] == []


def test_create_engine_validation(sandbox: SandboxServer, http: httpx.Client) -> None:
    """Missing engine or client_secret is 422; a secret not minted here is 400; a bad key is 401."""
    r = create(http, sandbox, None)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "conversation_engine"]
    r = create(http, sandbox, None, conversation_engine={"type": "openai-realtime"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "client_secret"
    r = create(http, sandbox, None, conversation_engine={"type": "openai-realtime", "client_secret": "ek_x",
                                                          "model": "gpt-realtime"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "extra_forbidden"
    assert create(http, sandbox, "ek_never_minted").status_code == 400
    assert create(http, sandbox, good_mint(http, sandbox), key="invalid-key").status_code == 401
    assert sandbox.audit()["sessions"] == []


def test_expired_secret_is_rejected(sandbox: SandboxServer, http: httpx.Client) -> None:
    """A secret past its expires_at cannot create a session (400); before that it can."""
    secret = good_mint(http, sandbox, seconds=30)
    assert create(http, sandbox, secret).status_code == 200
    sandbox.advance_clock(31)
    assert create(http, sandbox, secret).status_code == 400
    assert len(sandbox.audit()["sessions"]) == 1


def test_max_duration_ends_session_by_itself(sandbox: SandboxServer, http: httpx.Client) -> None:
    """Once max_duration has elapsed the session is ended (ended_by max_duration) and DELETE is 404."""
    sid = create(http, sandbox, good_mint(http, sandbox), max_duration=60).json()["session_id"]
    sandbox.advance_clock(59)
    assert sandbox.audit()["sessions"][0]["live"] is True
    sandbox.advance_clock(2)
    [session] = sandbox.audit()["sessions"]
    assert session["live"] is False and session["ended_by"] == "max_duration" and session["deleted_at"] is None
    assert session["ended_at"] == pytest.approx(session["created_at"] + 60)
    assert delete(http, sandbox, sid).status_code == 404
    assert sandbox.audit()["sessions"][0]["ended_by"] == "max_duration"


# -- fault injection and control API ---------------------------------------------------------


def test_count_rule_fails_first_n_calls_with_retry_after(sandbox: SandboxServer, http: httpx.Client) -> None:
    """A count rule fails exactly the first N calls (429 + retry-after + code), then calls succeed."""
    sandbox.configure({"mint": {"fail": [{"status": 429, "count": 2, "retry_after": 1,
                                          "code": "rate_limit_exceeded"}]}})
    body = {"session": {"type": "realtime"}}
    for _ in range(2):
        r = mint(http, sandbox, body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert mint(http, sandbox, body).status_code == 200
    counters = sandbox.audit()["counters"]["mint"]
    assert (counters["requests"], counters["injected"], counters["429"], counters["200"]) == (3, 2, 2, 1)


def test_insufficient_quota_says_do_not_retry(sandbox: SandboxServer, http: httpx.Client) -> None:
    """insufficient_quota answers 429 with x-should-retry: false, like OpenAI."""
    sandbox.configure({"mint": {"fail": [{"status": 429, "code": "insufficient_quota"}]}})
    r = mint(http, sandbox, {"session": {"type": "realtime"}})
    assert r.status_code == 429 and r.headers["x-should-retry"] == "false"
    assert r.json()["error"]["code"] == "insufficient_quota"


def test_rate_rule_is_deterministic_for_a_seed(sandbox: SandboxServer, http: httpx.Client) -> None:
    """Same seed, same failure pattern; the rate is roughly honoured."""
    def pattern() -> list[int]:
        sandbox.configure({"seed": 42, "create": {"fail": [{"status": 503, "rate": 0.3}]}})
        return [create(http, sandbox, "ek_unknown").status_code for _ in range(60)]

    first = pattern()
    assert first == pattern()
    assert set(first) == {400, 503} and 6 <= first.count(503) <= 30


def test_latency_is_applied(sandbox: SandboxServer, http: httpx.Client) -> None:
    """latency_ms delays each answer of that operation by at least that long."""
    sandbox.configure({"delete": {"latency_ms": 200}})
    started = time.monotonic()
    assert delete(http, sandbox, "x").status_code == 404
    assert time.monotonic() - started >= 0.2


def test_hang_outlives_the_client_timeout(sandbox: SandboxServer, http: httpx.Client) -> None:
    """A hang rule gives no answer within a client timeout; the server notices the client leaving."""
    sandbox.configure({"delete": {"fail": [{"hang": True, "count": 1}]}})
    with pytest.raises(httpx.ReadTimeout):
        http.delete(sandbox.avaturn_base_url + "/sessions/x", headers={"Authorization": "Bearer k"}, timeout=0.3)
    assert delete(http, sandbox, "x").status_code == 404  # count exhausted
    assert sandbox.audit()["counters"]["delete"]["hung"] == 1


def test_hang_ends_with_504_if_client_waits(sandbox: SandboxServer, http: httpx.Client) -> None:
    """A hang with a short hang_seconds answers 504 to a patient client."""
    sandbox.configure({"delete": {"fail": [{"hang": True, "hang_seconds": 0.2}]}})
    assert delete(http, sandbox, "x").status_code == 504


def test_close_drops_the_connection(sandbox: SandboxServer, http: httpx.Client) -> None:
    """A close rule drops the connection without any HTTP answer."""
    sandbox.configure({"mint": {"fail": [{"close": True, "count": 1}]}})
    with pytest.raises(httpx.RemoteProtocolError):
        mint(http, sandbox, {"session": {"type": "realtime"}})
    assert mint(http, sandbox, {"session": {"type": "realtime"}}).status_code == 200


def test_after_apply_creates_then_fails(sandbox: SandboxServer, http: httpx.Client) -> None:
    """after_apply creates the session for real and then answers 503: the outcome-unknown case."""
    sandbox.configure({"create": {"fail": [{"status": 503, "after_apply": True, "count": 1}]}})
    assert create(http, sandbox, good_mint(http, sandbox)).status_code == 503
    [session] = sandbox.audit()["sessions"]
    assert session["live"] is True


def test_raw_body_rule(sandbox: SandboxServer, http: httpx.Client) -> None:
    """A status rule with a body answers exactly that body and content type."""
    sandbox.configure({"mint": {"fail": [{"status": 200, "body": "<html>", "content_type": "text/html"}]}})
    r = mint(http, sandbox, {"session": {"type": "realtime"}})
    assert (r.status_code, r.text, r.headers["content-type"]) == (200, "<html>", "text/html")


@pytest.mark.parametrize(
    "config",
    [
        {"mint": {"fail": [{"status": 429, "bogus": 1}]}},
        {"mint": {"fail": [{"status": 429, "hang": True}]}},
        {"mint": {"fail": [{"count": 1}]}},
        {"mint": {"fail": [{"status": 503, "rate": 2}]}},
        {"teleport": {}},
    ],
)
def test_bad_config_is_refused(sandbox: SandboxServer, config: dict[str, Any]) -> None:
    """A malformed config is answered 400 and the previous config stays."""
    with pytest.raises(RuntimeError, match="400"):
        sandbox.configure(config)
    assert sandbox.audit()["config"]["mint"] == {}


def test_reset_forgets_everything(sandbox: SandboxServer, http: httpx.Client) -> None:
    """Reset clears secrets, sessions, deletes, counters, config and the clock offset."""
    sandbox.configure({"delete": {"latency_ms": 5}})
    create(http, sandbox, good_mint(http, sandbox))
    sandbox.advance_clock(10)
    sandbox.reset()
    audit = sandbox.audit()
    assert audit["secrets"] == audit["sessions"] == audit["deletes"] == []
    assert audit["clock_offset"] == 0 and audit["config"]["delete"] == {}
    assert audit["counters"] == {"mint": {}, "create": {}, "delete": {}}


def test_routes_and_health(sandbox: SandboxServer, http: httpx.Client) -> None:
    """Unknown paths are 404, wrong methods 405, the clock cannot go back, healthz answers."""
    assert http.get(sandbox.base_url + "/v2/whatever").status_code == 404
    assert http.get(sandbox.avaturn_base_url + "/sessions").status_code == 405
    assert http.post(sandbox.base_url + "/_sandbox/clock", json={"advance": -1}).status_code == 400
    assert http.get(sandbox.base_url + "/_sandbox/healthz").json() == {"ok": True}
    assert set(sandbox.audit(summary=True)) == {"now", "clock_offset", "live_sessions", "counters"}


def test_sandbox_process_serves_and_stops() -> None:
    """The subprocess flavour serves both upstreams on its port and is gone after stop()."""
    with SandboxProcess() as proc, httpx.Client(timeout=5.0, verify=False) as http:
        secret = good_mint(http, proc)
        assert create(http, proc, secret).status_code == 200
        assert proc.audit()["live_sessions"] == 1
    assert not proc.healthy()

"""Upstreams that misbehave: 429 with Retry-After (and one longer than the provisioning
deadline), 5xx, hangs, dropped connections and creates applied-then-failed at set rates;
permanent errors; an Avaturn DELETE that keeps failing until the upstream recovers."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tenants.scope import TenantScope

from .harness import counter, wait_until
from .ledger import FINAL, assert_orphans_end_by_backstop, check_invariants

pytestmark = pytest.mark.fault

TENANT_OPENAI_KEY = "sk-tenant-faults-secret-0123456789abcdef"
TENANT_AVATURN_KEY = "avaturn-tenant-faults-secret-0123456789"
TENANT_KEYS = {"openai": {"api_key": TENANT_OPENAI_KEY}, "avaturn": {"api_key": TENANT_AVATURN_KEY}}

FAULT_MATRIX: dict[str, Any] = {
    "seed": 4,
    "mint": {"fail": [
        {"status": 429, "retry_after": 1, "rate": 0.10},
        {"status": 500, "rate": 0.10},
        {"hang": True, "hang_seconds": 5, "rate": 0.05},
    ]},
    "create": {"fail": [
        {"status": 503, "rate": 0.10},
        {"status": 502, "rate": 0.05},
        {"close": True, "rate": 0.05},
        {"hang": True, "hang_seconds": 5, "rate": 0.03},
        {"status": 500, "after_apply": True, "rate": 0.05},
        {"close": True, "after_apply": True, "rate": 0.03},
        {"hang": True, "hang_seconds": 5, "after_apply": True, "rate": 0.03},
    ]},
    "delete": {"fail": [
        {"status": 503, "rate": 0.15},
        {"close": True, "rate": 0.05},
        {"status": 429, "retry_after": 1, "rate": 0.05},
    ]},
}


def test_fault_matrix_at_rates(make_harness, make_ledger, sandbox: Any) -> None:
    """Invariant: with 429 (Retry-After 1 s), 5xx, hangs, dropped connections and
    applied-then-failed creates injected at fixed rates on mint, create and DELETE, every one
    of 30 sessions ends (terminated, or failed with a clear code: none stuck); every upstream
    session the broker recorded is deleted by expires_at + 20 s; the only upstream sessions
    created twice for one broker session are exactly those whose create was applied but not
    answered (the outcome-unknown window), each counted in possible_orphans and bounded by
    max_duration; every slot is released; no upstream key appears in any answer or log line."""
    h = make_harness(BROKER_PROVISION_DEADLINE_SECONDS=25, BROKER_UPSTREAM_TIMEOUT_SECONDS=1)
    worker = h.worker()
    led = make_ledger(h, **TENANT_KEYS)
    sandbox.configure(FAULT_MATRIX)
    started = time.monotonic()
    for _ in range(30):
        led.create(ttl=10)
    took = led.wait_for(None, FINAL, timeout=75)
    audit = sandbox.audit()
    applied_unanswered = counter(sandbox, "create", "applied")
    report = check_invariants(led, audit, lateness_bound_s=20, max_duplicates=applied_unanswered)
    assert len(report.orphans) == applied_unanswered  # each applied-then-failed create, and nothing else
    assert worker.metric("broker_upstream_possible_orphans_total") >= report.duplicates
    failures = {op: audit["counters"][op].get("injected", 0) for op in ("mint", "create", "delete")}
    assert all(n > 0 for n in failures.values()), failures  # every kind of call did meet faults
    assert worker.metric("broker_termination_failures_total") > 0
    for sid in led.sessions:
        text = led.client.get(f"/v1/sessions/{sid}").text
        assert TENANT_OPENAI_KEY not in text and TENANT_AVATURN_KEY not in text and "ek_" not in text
    h.assert_no_secret_logged(TENANT_OPENAI_KEY, TENANT_AVATURN_KEY)
    assert_orphans_end_by_backstop(sandbox, report)
    slowest = max((led.record(sid).ready_at - led.record(sid).created_at) / 1000 for sid in led.sessions)
    print(f"fault matrix: settled in {time.monotonic() - started:.1f}s ({took:.1f}s of waiting); "
          f"injected {failures}; slowest time to ready {slowest:.1f}s; {report}")


def test_retry_after_is_honoured_and_the_secret_reused(make_harness, make_ledger, sandbox: Any) -> None:
    """Invariant: a 429 with Retry-After from OpenAI (2 s) and then from Avaturn (1.5 s) delays
    the retries by at least that long, the session still becomes ready with exactly one
    upstream session, and the secret minted before the Avaturn 429 is reused (one mint)."""
    h = make_harness()
    h.thread_worker()
    led = make_ledger(h)
    sandbox.configure({"mint": {"fail": [{"status": 429, "retry_after": 2, "count": 1}]},
                       "create": {"fail": [{"status": 429, "retry_after": 1.5, "count": 1}]}})
    sid = led.create(ttl=120)
    led.wait_for([sid], {"ready"}, timeout=15)
    rec = led.record(sid)
    waited = (rec.ready_at - rec.created_at) / 1000
    assert 3.5 <= waited < 3.5 + 3, waited
    assert (counter(sandbox, "mint"), counter(sandbox, "create")) == (2, 2)
    up = led.upstream(sandbox.audit())
    assert up.secrets_by_sid[sid] == 1 and len(up.by_sid[sid]) == 1
    led.client.delete(f"/v1/sessions/{sid}")
    led.wait_for(None, FINAL, timeout=10)
    check_invariants(led, sandbox.audit(), lateness_bound_s=5)


@pytest.mark.parametrize("op", ["mint", "create"])
def test_retry_after_beyond_the_deadline_fails_fast(make_harness, make_ledger, sandbox: Any, op: str) -> None:
    """Invariant: a 429 whose Retry-After (60 s) ends after the provisioning deadline (10 s)
    fails the session at once (not at the deadline) with ``upstream_rate_limited``; nothing
    stays alive upstream and the slot is released."""
    h = make_harness(BROKER_PROVISION_DEADLINE_SECONDS=10)
    h.thread_worker()
    led = make_ledger(h)
    sandbox.configure({op: {"fail": [{"status": 429, "retry_after": 60}]}})
    sid = led.create(ttl=30)
    led.wait_for([sid], {"failed"}, timeout=8)
    rec = led.record(sid)
    assert rec.error_code == "upstream_rate_limited"
    assert (rec.terminated_at - rec.created_at) / 1000 < 3
    assert counter(sandbox, op) == 1
    report = check_invariants(led, sandbox.audit(), lateness_bound_s=0)
    assert report.statuses == {"failed": 1} and sandbox.audit()["sessions"] == []


@pytest.mark.parametrize(
    ("op", "rule", "code"),
    [
        ("mint", {"status": 429, "code": "insufficient_quota"}, "openai_insufficient_quota"),
        ("mint", {"status": 400, "code": "invalid_value", "message": "bad"}, "openai_bad_request"),
        ("create", {"status": 400}, "avaturn_rejected"),
        ("create", {"status": 410}, "avaturn_avatar_gone"),
    ],
)
def test_permanent_errors_fail_at_once(make_harness, make_ledger, sandbox: Any, op: str, rule: dict[str, Any],
                                       code: str) -> None:
    """Invariant: a permanent upstream error (insufficient_quota is one) fails the session at
    once after a single call, with a clear code and a message that echoes no key; the secret
    minted before a rejected create leaves nothing upstream; the slot is released."""
    h = make_harness()
    h.thread_worker()
    led = make_ledger(h, **TENANT_KEYS)
    sandbox.configure({op: {"fail": [rule]}})
    sid = led.create(ttl=30)
    led.wait_for([sid], {"failed"}, timeout=8)
    view = led.view(sid)
    assert view["error"]["code"] == code
    assert TENANT_OPENAI_KEY[:12] not in str(view) and TENANT_AVATURN_KEY[:12] not in str(view)
    assert counter(sandbox, op) == 1
    check_invariants(led, sandbox.audit(), lateness_bound_s=0)
    assert sandbox.audit()["sessions"] == []


def test_delete_that_keeps_failing_is_retried_until_the_upstream_recovers(make_harness, make_ledger,
                                                                          sandbox: Any) -> None:
    """Invariant: while Avaturn's DELETE keeps failing (503) the session stays
    ``terminating`` (never recorded terminated, never dropped), keeps its slot, is retried
    with capped exponential backoff (not hammered) and each failure is counted in
    broker_termination_failures_total; once the upstream recovers it ends terminated within
    one backoff step (<= 8 s) and the upstream session is deleted; the slot is released."""
    h = make_harness()
    worker = h.thread_worker()
    led = make_ledger(h)
    sid = led.create(ttl=60, wait=10)
    sandbox.configure({"delete": {"fail": [{"status": 503}]}})
    assert led.client.delete(f"/v1/sessions/{sid}").status_code == 202
    failing_for = wait_until(lambda: counter(sandbox, "delete") >= 4, 15, "4 failed DELETEs")
    time.sleep(1.0)
    attempts = counter(sandbox, "delete")
    rec = led.record(sid)
    assert rec.status == "terminating" and rec.delete_attempts >= 4
    assert attempts <= 8, f"{attempts} DELETEs in {failing_for + 1:.1f}s: no backoff"
    assert led.live_slots() == 1 and led.usage_active() == 1
    failures = worker.metrics.registry.get_sample_value("broker_termination_failures_total",
                                                        {"code": "upstream_unavailable"})
    assert failures is not None and failures >= 4
    sandbox.configure({})
    recovered = time.monotonic()
    led.wait_for([sid], {"terminated"}, timeout=12)
    assert time.monotonic() - recovered <= 8 + 1.5
    rec = led.record(sid)
    assert rec.termination_reason == "requested"
    report = check_invariants(led, sandbox.audit(), lateness_bound_s=30)
    print(f"DELETE failing: {attempts} attempts; ended {report.max_lateness_s}s after the request")


def test_replace_oldest_never_exceeds_max_concurrent_upstream_while_deletes_fail(make_harness, make_ledger,
                                                                                sandbox: Any) -> None:
    """Invariant (issue 17, item 4; CONTRACT.md section 14): with every Avaturn DELETE failing,
    15 sequential creates for one end user (replace_oldest, cap 1, max_concurrent_sessions 5)
    and then 4 for other end users never make the live upstream sessions (sandbox audit,
    sampled throughout) exceed 5: the replacement waits (queued) for the replaced session's
    upstream end, both count in GET /v1/usage, and the 4th other end user is refused
    (concurrency_limit). Once the DELETEs recover the replaced session ends, the last
    replacement becomes ready, and after stopping everything every session is terminated or
    failed with a reason and no slot is left held."""
    h = make_harness()
    h.worker()  # a real worker process
    led = make_ledger(h, quotas={"max_concurrent_sessions": 5, "max_sessions_per_end_user": 1,
                                 "end_user_policy": "replace_oldest"})
    cap = 5
    peak = {"live": 0}
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak["live"] = max(peak["live"], int(sandbox.audit(summary=True)["live_sessions"]))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        first = led.create(ttl=60, wait=10, end_user="u")
        assert led.view(first)["status"] == "ready"
        sandbox.configure({"delete": {"fail": [{"status": 503}]}})
        sched = TenantScope(led.tenant_id).provision_schedule()
        last = first
        for _ in range(14):
            last = led.create(ttl=60, end_user="u")

            def looked_at(sid: str = last) -> bool:  # ready, or deferred by a claim (still queued)
                rec = led.record(sid)
                score = led.redis.zscore(sched, sid)
                return rec.status == "ready" or (rec.status == "queued" and score is not None and score > rec.mint_at)

            wait_until(looked_at, 10, f"the worker to look at {last}")
        assert int(sandbox.audit(summary=True)["live_sessions"]) == 1  # only the first, still undeleted
        assert led.record(first).status == "terminating" and led.record(first).termination_reason == "replaced"
        assert led.record(last).status == "queued" and led.record(last).waits_for == first
        assert led.usage_active() == 2  # the replaced one (live upstream) and its replacement
        others = []
        for i in range(3):
            others.append(led.create(ttl=60, wait=10, end_user=f"other-{i}"))
        r = led.client.post("/v1/sessions", json={"ttl_seconds": 60, "end_user": "other-3"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "concurrency_limit", r.text
        led.wait_for(others, {"ready"}, timeout=15)
        assert led.usage_active() == cap
        assert int(sandbox.audit(summary=True)["live_sessions"]) == 4  # first + 3 others; last waits
        sandbox.configure({})  # the DELETEs recover: the first ends upstream, the last one starts
        led.wait_for([first], {"terminated"}, timeout=15)
        led.wait_for([last], {"ready"}, timeout=15)
        assert int(sandbox.audit(summary=True)["live_sessions"]) == 4  # last + 3 others
        for sid in [last, *others]:
            assert led.client.delete(f"/v1/sessions/{sid}").status_code == 202
        led.wait_for(None, FINAL, timeout=30)
    finally:
        sampling.set()
        sampler.join(5)
    assert peak["live"] <= cap, f"{peak['live']} live upstream sessions against max_concurrent_sessions {cap}"
    for sid in led.sessions:
        rec = led.record(sid)
        assert rec.termination_reason, f"{sid} ended without a reason"
    report = check_invariants(led, sandbox.audit(), lateness_bound_s=30)  # slots released, usage 0
    print(f"replace_oldest with failing DELETEs: peak {peak['live']} live upstream (cap {cap}); {report}")


def test_a_replacement_whose_replaced_session_outlives_the_deadline_fails_saying_so(make_harness, make_ledger,
                                                                                   sandbox: Any) -> None:
    """Invariant (issue 17, item 4): when the replaced session cannot be ended upstream before
    the new session's provisioning deadline (every DELETE failing), the new session is never
    created upstream: it fails ``provision_deadline_exceeded`` (reason ``reaped``) with a
    message saying it waited for the session it replaced, and its slot is released; the
    replaced one keeps its slot until its DELETE succeeds."""
    h = make_harness(BROKER_PROVISION_DEADLINE_SECONDS=5)
    h.thread_worker()
    led = make_ledger(h, quotas={"max_concurrent_sessions": 5, "max_sessions_per_end_user": 1,
                                 "end_user_policy": "replace_oldest"})
    first = led.create(ttl=60, wait=10, end_user="u")
    assert led.view(first)["status"] == "ready"
    sandbox.configure({"delete": {"fail": [{"status": 503}]}})
    second = led.create(ttl=60, end_user="u")
    led.wait_for([second], {"failed"}, timeout=15)
    view = led.view(second)
    assert view["error"]["code"] == "provision_deadline_exceeded" and "replaced" in view["error"]["message"]
    assert led.record(second).termination_reason == "reaped"
    assert counter(sandbox, "create") == 1  # only the first was ever created upstream
    assert led.record(first).status == "terminating" and led.live_slots() == 1 and led.usage_active() == 1
    sandbox.configure({})
    led.wait_for([first], {"terminated"}, timeout=15)
    check_invariants(led, sandbox.audit(), lateness_bound_s=30)  # no slot left, no live upstream session

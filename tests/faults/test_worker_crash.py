"""Worker processes that die: SIGKILL inside the OpenAI mint, inside the Avaturn create and
inside the Avaturn DELETE (the sandbox holds the call with injected latency), SIGKILL while
the expiry loop has a batch of DELETEs in flight, SIGTERM with jobs running, and sessions
stuck past the provisioning deadline."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from tenants.scope import TenantScope
from workers.expiry import STOP_GRACE_MS
from workers.jobs.claim import HELD_LEASE_MS, RENEW_S

from .harness import counter, wait_until
from .ledger import FINAL, assert_orphans_end_by_backstop, check_invariants

pytestmark = pytest.mark.fault

SWEEP_S = 2
LEASE_S = HELD_LEASE_MS / 1000  # a termination claim outlives its claimer's last renewal by this
STOP_GRACE_S = STOP_GRACE_MS / 1000  # the expiry loop takes a stop's first attempt this late
LOOP_SLEEP_S = 0.5       # the expiry loop's longest sleep (workers/expiry.py)


def test_sigkill_at_every_step_is_finished_by_another_worker(make_harness, make_ledger, sandbox: Any) -> None:
    """Invariant: a worker SIGKILLed while one session is inside the OpenAI mint, one inside the
    Avaturn create, one inside the DELETE at its expiry and one inside the DELETE the tenant
    asked for leaves nothing stuck: another worker finishes the two provisionings (ready) and
    the two terminations when the dead worker's claims on them run out (the 3 s lease after
    its last renewal, renewed every second: within lease + 1 s of the kill for the
    provisionings; its expiry loop claimed one termination, its stop job the other), reasons kept;
    the recorded secret is reused, not minted again; the only upstream session created twice
    is the one whose create outcome was unknown (the named window), counted in
    broker_upstream_possible_orphans_total and bounded by max_duration; every upstream session
    is ended by expires_at (or the DELETE request) + the claim lease + a few seconds; every
    slot is released."""
    upstream_timeout = 10
    bound_s = LEASE_S + STOP_GRACE_S + LOOP_SLEEP_S + 1  # the kill, then the lapse of the last renewal
    h = make_harness(BROKER_PROVISION_DEADLINE_SECONDS=60, BROKER_UPSTREAM_TIMEOUT_SECONDS=upstream_timeout)
    w1 = h.worker()
    led = make_ledger(h)
    expiring = led.create(ttl=10, wait=10)
    requested = led.create(ttl=120, wait=10)
    sandbox.configure({op: {"latency_ms": 5000} for op in ("mint", "create", "delete")})
    expires_at = led.record(expiring).expires_at / 1000
    time.sleep(max(0.0, expires_at - time.time() - 6.0))
    in_create = led.create(ttl=120)  # mint [e-6, e-1], create [e-1, e+4]
    wait_until(lambda: counter(sandbox, "create") == 3, 10, "a session inside the Avaturn create")
    in_mint = led.create(ttl=120)  # mint [e-1, e+4]
    assert led.client.delete(f"/v1/sessions/{requested}").status_code == 202  # DELETE [e-1, e+4]
    wait_until(lambda: counter(sandbox, "mint") == 4 and counter(sandbox, "delete") == 2, 10,
               "mint and both DELETEs in flight")  # the expiry DELETE [e, e+5]
    w1.kill()
    killed_at = time.time()
    rec_c, rec_m = led.record(in_create), led.record(in_mint)
    slots = {sid: led.record(sid).mint_at for sid in (in_create, in_mint)}
    assert all(slots.values())  # reserved at admission
    assert (rec_c.status, rec_c.create_state, bool(rec_c.secret_enc)) == ("provisioning", "inflight", True)
    assert (rec_m.status, rec_m.create_state, bool(rec_m.secret_enc)) == ("provisioning", "", False)
    assert led.record(expiring).status == led.record(requested).status == "terminating"
    sandbox.configure({})
    queued = led.create(ttl=120)  # admitted while no worker runs
    w2 = h.thread_worker()
    led.wait_for([expiring, requested], {"terminated"}, timeout=bound_s + 5)
    terminated_after = max(led.record(sid).terminated_at / 1000 - killed_at for sid in (expiring, requested))
    assert terminated_after <= bound_s, terminated_after
    assert led.record(expiring).termination_reason == "expired"
    assert led.record(requested).termination_reason == "requested"
    led.wait_for([queued], {"ready"}, timeout=10)
    led.wait_for([in_create, in_mint], {"ready"}, timeout=LEASE_S + 10)
    recovered_after = max(led.record(sid).ready_at / 1000 - killed_at for sid in (in_create, in_mint))
    assert recovered_after <= LEASE_S + 1, recovered_after  # the lease + 1 s
    for sid in (in_create, in_mint):
        assert led.record(sid).attempts == 2  # claimed twice: by the killed worker, then by the survivor
        assert led.record(sid).mint_at == slots[sid]  # the same mint slot: none taken by the re-run

    # the sandbox finishes what the killed worker had asked (a slow server does not stop when
    # its client goes away): the takeover is faster than those 5 s calls
    for op in ("mint", "create"):
        wait_until(lambda op=op: counter(sandbox, op, "200") == counter(sandbox, op), 10, f"every {op} answered")
    up = led.upstream(sandbox.audit())
    assert up.secrets_by_sid[in_create] == 1, "the recorded secret was minted again instead of reused"
    assert up.secrets_by_sid[in_mint] == 2  # its secret was never recorded: a second mint (unused, it expires)
    assert [len(up.by_sid[sid]) for sid in (in_create, in_mint, queued)] == [2, 1, 1]
    assert len({u["secret_fingerprint"] for u in up.by_sid[in_create]}) == 1
    orphans = w2.metrics.registry.get_sample_value("broker_upstream_possible_orphans_total")
    assert orphans == 1

    for sid in (in_create, in_mint, queued):
        assert led.client.delete(f"/v1/sessions/{sid}").status_code == 202
    led.wait_for(None, FINAL, timeout=15)
    report = check_invariants(led, sandbox.audit(), lateness_bound_s=bound_s + 2, max_duplicates=1)
    assert report.duplicates == 1 and report.statuses == {"terminated": 5}
    assert_orphans_end_by_backstop(sandbox, report)
    h.assert_no_secret_logged()
    print(f"SIGKILL: terminations done {terminated_after:.1f}s and provisionings ready {recovered_after:.1f}s "
          f"after the kill; {report}")


def test_sigkill_with_expiry_deletes_in_flight_loses_nothing(make_harness, make_ledger, sandbox: Any) -> None:
    """Invariant: a worker whose expiry loop has a batch of upstream DELETEs in flight (the
    sandbox holds them unanswered and unapplied) keeps its claims while it lives: a second
    worker running beside it for longer than the claim lease takes none of them (no DELETE of
    its own). SIGKILLed, it loses none of them: the second worker takes every session again
    once the dead worker's claims run out (3 s after their last renewal) and ends it: each
    upstream session is deleted (a second DELETE each, none a third), each broker session is
    recorded terminated once (reason expired), every slot is released."""
    n = 20
    h = make_harness(BROKER_UPSTREAM_TIMEOUT_SECONDS=30)  # the held DELETEs do not time out by themselves
    w1 = h.worker()
    led = make_ledger(h)
    sids = [led.create(ttl=10) for _ in range(n)]
    led.wait_for(sids, {"ready"}, timeout=10)
    sandbox.configure({"delete": {"fail": [{"hang": True, "hang_seconds": 60, "count": n}]}})
    last_due = max(led.record(sid).expires_at for sid in sids) / 1000
    wait_until(lambda: counter(sandbox, "delete") == n, last_due - time.time() + 5, "every expiry DELETE in flight")
    w2 = h.thread_worker()
    time.sleep(LEASE_S + 1.5)  # the first claims are older than one lease: only their renewals hold them
    assert counter(sandbox, "delete") == n, "the second worker took claims its live owner still held"
    assert set(led.statuses().values()) == {"terminating"}
    w1.kill()
    killed_at = time.time()
    up = led.upstream(sandbox.audit())
    assert all(len(up.by_sid[sid]) == 1 and up.by_sid[sid][0]["live"] for sid in sids)
    led.wait_for(None, {"terminated"}, timeout=LEASE_S + 10)
    recovered_after = max(led.record(sid).terminated_at / 1000 for sid in sids) - killed_at
    for sid in sids:
        rec = led.record(sid)
        assert rec.termination_reason == "expired"
        # taken again only once the dead worker's last renewal ran out (renewed up to the kill)
        assert rec.terminated_at >= (killed_at + LEASE_S - RENEW_S) * 1000 - 300, sid
    assert recovered_after <= LEASE_S + LOOP_SLEEP_S + 2, recovered_after
    assert counter(sandbox, "delete") == 2 * n  # the n lost ones, then one each: nothing deleted twice after
    terminations = w2.metrics.registry.get_sample_value("broker_terminations_total", {"reason": "expired"})
    assert terminations == n
    report = check_invariants(led, sandbox.audit(), lateness_bound_s=(killed_at - last_due) + LEASE_S + LOOP_SLEEP_S + 3)
    assert report.statuses == {"terminated": n} and report.duplicates == 0
    h.assert_no_secret_logged()
    print(f"SIGKILL mid-expiry: {n} DELETEs in flight; all terminated {recovered_after:.1f}s after the kill "
          f"(claim lease {LEASE_S}s, renewed every {RENEW_S}s); {report}")


def test_sigterm_lets_running_jobs_finish_and_leaves_the_rest_queued(make_harness, make_ledger,
                                                                     sandbox: Any) -> None:
    """Invariant: SIGTERM stops a worker without half-done sessions: the provisionings it is
    running (inside a 1.5 s Avaturn create) finish to ready with one upstream session each,
    a session admitted after the signal stays queued in the provisioning schedule (not
    claimed, not half-started), the process exits 0 as soon as its work is done, and
    another worker then provisions the queued session; all end terminated, slots released."""
    h = make_harness()
    w1 = h.worker()
    led = make_ledger(h)
    sandbox.configure({"create": {"latency_ms": 1500}})
    running = [led.create(ttl=60), led.create(ttl=60)]
    wait_until(lambda: counter(sandbox, "create") == 2, 10, "two creates in flight")
    w1.signal(signal.SIGTERM)
    signalled = time.monotonic()
    wait_until(lambda: "received SIGTERM: taking no new work" in w1.log_text(), 10, "the worker taking the signal")
    queued = led.create(ttl=60)
    assert w1.wait(25) == 0, w1.log_text()[-3000:]
    stopped_after = time.monotonic() - signalled
    assert stopped_after < 10, stopped_after
    for sid in running:
        rec = led.record(sid)
        assert (rec.status, rec.create_state, rec.attempts) == ("ready", "done", 1)
    rec = led.record(queued)
    assert (rec.status, rec.attempts) == ("queued", 0)
    assert led.redis.zscore(TenantScope(led.tenant_id).provision_schedule(), queued) is not None
    up = led.upstream(sandbox.audit())
    assert [len(up.by_sid[sid]) for sid in running] == [1, 1] and not up.by_sid.get(queued)

    sandbox.configure({})
    h.thread_worker()
    led.wait_for([queued], {"ready"}, timeout=10)
    for sid in led.sessions:
        led.client.delete(f"/v1/sessions/{sid}")
    led.wait_for(None, FINAL, timeout=15)
    report = check_invariants(led, sandbox.audit(), lateness_bound_s=5)
    assert report.statuses == {"terminated": 3}
    print(f"SIGTERM: worker exited {stopped_after:.1f}s after the signal; {report}")


def test_sessions_stuck_past_the_deadline_are_failed(make_harness, make_ledger, sandbox: Any) -> None:
    """Invariant: while a worker runs, no session stays queued or provisioning past the
    provisioning deadline (6 s here) + one sweep (2 s) + 1 s: a session whose worker was
    SIGKILLed mid-mint and one that waited in the schedule while no worker ran are failed as
    soon as a worker is up again (its loop claims them past their deadline), one whose OpenAI
    mint hangs by its deadline; all with a clear code (reason ``reaped`` for the first two);
    nothing is created upstream and every slot is released."""
    deadline_s = 6
    h = make_harness(BROKER_PROVISION_DEADLINE_SECONDS=deadline_s, BROKER_UPSTREAM_TIMEOUT_SECONDS=3)
    w1 = h.worker()
    led = make_ledger(h)
    sandbox.configure({"mint": {"fail": [{"hang": True, "hang_seconds": 60}]}})
    killed = led.create(ttl=10)
    wait_until(lambda: counter(sandbox, "mint") == 1, 10, "mint in flight")
    w1.kill()
    waited = led.create(ttl=10)
    time.sleep(max(0.0, led.record(waited).created_at / 1000 + deadline_s + 0.5 - time.time()))
    h.thread_worker()
    worker_up_ms = time.time() * 1000
    led.create(ttl=10)  # its mint hangs
    led.wait_for(None, {"failed"}, timeout=deadline_s + SWEEP_S + 6)
    lates = []
    for sid in led.sessions:
        rec = led.record(sid)
        late = rec.terminated_at - max(rec.created_at + deadline_s * 1000, worker_up_ms)
        lates.append(late / 1000)
        assert late <= (SWEEP_S + 1) * 1000, f"{sid} failed {late} ms after its deadline"
        assert rec.error_code in ("provision_deadline_exceeded", "upstream_timeout"), rec.error_code
    for sid in (killed, waited):
        rec = led.record(sid)
        assert (rec.error_code, rec.termination_reason) == ("provision_deadline_exceeded", "reaped")
    report = check_invariants(led, sandbox.audit(), lateness_bound_s=0)
    assert report.statuses == {"failed": 3}
    assert sandbox.audit()["sessions"] == []
    view = led.view(killed)
    assert view["error"]["code"] == "provision_deadline_exceeded" and view["avaturn"] is None
    print(f"deadline: stuck sessions failed at most {max(lates):.1f}s after their deadline (or worker start)")

"""Stateful property test: ``admit`` on a real redis-server behaves exactly like a small
pure-Python reference model of the rules, over random sequences of admissions (random end
users, idempotency keys and bodies, lease lengths), clock advances (across UTC midnight),
sessions ending, and quota settings. The model includes the mint pacing: each admitted
session's slot (GCRA, written plainly), the ``provisioning_backlog`` refusal, the backlog
counted as the granted slots still ahead, and the provisioning schedule."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from broker.embedded_redis import EmbeddedRedis
from tenants.admission import AdmissionRequest, Admitted, KeyReused, Outcome, Refused, Replayed, admit
from tenants.mint_rate import schedule
from tenants.models import Quotas
from tenants.scope import DUE_EXPIRY, PROVISION_TENANTS, PROVISION_WAKE, TenantScope, due_member
from tenants.usage import QuotaUsage, UsageSnapshot, seconds_to_utc_midnight, usage, utc_day

T = TypeVar("T")
TENANT = "ten_m"
START = int(datetime(2026, 11, 23, 23, 57, 0, tzinfo=UTC).timestamp() * 1000)
ACTIVE = ("queued", "provisioning", "ready")


class Model:
    """The admission rules, written plainly."""

    def __init__(self, q: Quotas) -> None:
        self.q = q
        self.rate: list[tuple[int, str]] = []
        self.day: dict[str, int] = {}
        self.live: dict[str, int] = {}
        self.eu: dict[str, dict[str, int]] = {}
        self.status: dict[str, str] = {}
        self.idem: dict[str, tuple[str, str]] = {}
        self.due_expiry: dict[str, int] = {}
        self.tat = 0                       # GCRA state of the mint schedule
        self.last = 0
        self.slots: dict[str, int] = {}    # sid -> its mint slot (the provisioning schedule)
        self.wakes = 0                     # admissions whose slot was due within 1 s
        self.upstream: set[str] = set()    # sessions whose record says they reached Avaturn
        self.waits: dict[str, list[str]] = {}  # sid -> the replaced sessions it waits for

    def grants(self, now: int, n: int) -> list[int]:
        """The next ``n`` mint slots the schedule would grant at ``now`` (without taking them):
        grant = max(now, tat - tau, last grant), then tat = max(tat, now) + T."""
        interval, tau = schedule(self.q.openai_requests_per_minute)
        tat, last, out = self.tat, self.last, []
        for _ in range(n):
            tat = max(tat, now)
            last = max(now, tat - tau, last)
            out.append(last)
            tat += interval
        return out

    def mint(self, now: int, window: int) -> QuotaUsage:
        """Pacing as admit() reports it: backlog = granted slots after now, remaining = how
        many more would be granted within the window now, reset = until one more would."""
        latest = now + window
        ahead = self.grants(now, 1000)
        fit = sum(1 for g in ahead if g <= latest)
        assert fit < 1000
        backlog = sum(1 for g in self.slots.values() if g > now)
        reset = max(1, math.ceil((ahead[0] - latest) / 1000)) if fit == 0 else 0
        return QuotaUsage(limit=self.q.openai_requests_per_minute, used=backlog, remaining=fit, reset_s=reset)

    def eu_live(self, end_user: str, now: int) -> list[str]:
        members = self.eu.get(end_user, {})
        alive = [(c, s) for s, c in members.items() if self.live.get(s, -math.inf) > now]
        return [s for _, s in sorted(alive)]

    def snapshot(self, now: int, end_user: str | None, delta: int = 0, replaced: int = 0,
                 freed: int | None = None) -> UsageSnapshot:
        q = self.q
        window = sorted(t for t, _ in self.rate if t > now - 60_000)
        used = len(window) + delta
        if window:  # noqa: SIM108 - until the oldest leaves the window
            reset = max(1, math.ceil((window[0] + 60_000 - now) / 1000))
        else:  # nothing used before: 0, or the session just admitted (a full window)
            reset = 60 if delta else 0
        live = sum(1 for lease in self.live.values() if lease > now) - (replaced if freed is None else freed) + delta
        snap = UsageSnapshot(
            minute=QuotaUsage.of(q.sessions_per_minute, used, reset),
            day=QuotaUsage.of(q.sessions_per_day, self.day.get(utc_day(now), 0) + delta, seconds_to_utc_midnight(now)),
            concurrency=QuotaUsage.of(q.max_concurrent_sessions, live, 0),
        )
        if end_user is not None:
            snap.end_user = QuotaUsage.of(
                q.max_sessions_per_end_user, len(self.eu_live(end_user, now)) - replaced + delta, 0
            )
        return snap

    def admit(self, r: AdmissionRequest) -> Outcome:
        q, now, sid, eu = self.q, r.now_ms, r.session_id, r.end_user
        if r.idempotency_digest in self.idem:
            body, first = self.idem[r.idempotency_digest]
            return Replayed(session_id=first) if body == (r.body_digest or "") else KeyReused()
        snap = self.snapshot(now, eu)
        mint = self.mint(now, r.mint_window_ms)
        (slot,) = self.grants(now, 1)

        def refuse(code: Any, limit: int, current: int, retry: int) -> Refused:
            return Refused(code=code, limit=limit, current=current, retry_after_s=max(1, retry), usage=snap,
                           mint=mint)

        if snap.minute.used >= q.sessions_per_minute:
            return refuse("rate_limited", q.sessions_per_minute, snap.minute.used, snap.minute.reset_s or 60)
        if snap.day.used >= q.sessions_per_day:
            return refuse("daily_quota_exhausted", q.sessions_per_day, snap.day.used, snap.day.reset_s)
        replaced: list[str] = []
        if eu is not None:
            alive = self.eu_live(eu, now)
            if len(alive) >= q.max_sessions_per_end_user:
                if q.end_user_policy != "replace_oldest":
                    return refuse("end_user_limit", q.max_sessions_per_end_user, len(alive), 1)
                replaced = alive[: len(alive) - q.max_sessions_per_end_user + 1]
        # replace_oldest (issue 17): a replaced session that reached upstream keeps its lease and
        # the new one waits for it, and for what a replaced session was waiting for (still live)
        keeps = {old for old in replaced if old in self.upstream}
        waits: list[str] = []
        inherited_live = 0
        for old in replaced:
            if old in keeps and old not in waits:
                waits.append(old)
            for w in self.waits.get(old, []):
                if w not in waits and self.status.get(w) in ("queued", "provisioning", "ready", "terminating"):
                    waits.append(w)
                    inherited_live += self.live.get(w, -math.inf) > now
        if snap.concurrency.used - len(replaced) - inherited_live >= q.max_concurrent_sessions:
            return refuse("concurrency_limit", q.max_concurrent_sessions, snap.concurrency.used, 1)
        if slot > now + r.mint_window_ms:
            return refuse("provisioning_backlog", q.openai_requests_per_minute, mint.used,
                          math.ceil((slot - now - r.mint_window_ms) / 1000))
        after = self.snapshot(now, eu, delta=1, replaced=len(replaced), freed=len(replaced) - len(keeps))
        # apply
        interval, _ = schedule(q.openai_requests_per_minute)
        self.tat, self.last = max(self.tat, now) + interval, slot
        self.slots[sid] = slot
        self.wakes += slot <= now + 1000
        self.live = {s: lease for s, lease in self.live.items() if lease > now}
        self.rate = [(t, s) for t, s in self.rate if t > now - 60_000] + [(now, sid)]
        self.day[utc_day(now)] = self.day.get(utc_day(now), 0) + 1
        self.live[sid] = r.lease_until_ms
        self.status[sid] = "queued"
        if r.idempotency_digest is not None:
            self.idem[r.idempotency_digest] = (r.body_digest or "", sid)
        for old in replaced:
            if self.status.get(old) in ACTIVE:
                self.status[old] = "terminating"
            if self.status.get(old) == "terminating":
                self.due_expiry[old] = now
            if old not in keeps:
                self.live.pop(old, None)
        if waits:
            self.waits[sid] = waits
        if eu is not None:
            keep = set(self.eu_live(eu, now)) - set(replaced)
            self.eu[eu] = {s: c for s, c in self.eu.get(eu, {}).items() if s in keep}
            self.eu[eu][sid] = now
        return Admitted(session_id=sid, replaced=replaced, usage=after, mint_at=slot,
                        mint=self.mint(now, r.mint_window_ms))


Request = tuple[str | None, str | None, str, int]  # end user, idempotency key, body, lease ms
BATCH = st.lists(
    st.tuples(
        st.sampled_from([None, "u1", "u1", "u2"]),
        st.sampled_from([None, None, None, None, "k1", "k2", "k3", "k4"]),
        st.sampled_from(["b1", "b2"]),
        st.integers(1, 300_000),
    ),
    min_size=1,
    max_size=4,
)


class AdmissionMachine(RuleBasedStateMachine):
    def __init__(self, url: str, regime: str) -> None:
        super().__init__()
        self.regime = regime
        self.loop = asyncio.new_event_loop()
        self.redis = aioredis.Redis.from_url(url)
        self.run(self.redis.flushall())
        self.now = START
        self.counter = 0
        self.model = Model(Quotas())
        self.mint_rate = 300     # drawn by start()
        self.window = 40_000
        self.scope = TenantScope(TENANT)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.redis.aclose())
        self.loop.close()

    def draw_quotas(self, data: st.DataObject) -> Quotas:
        """Quotas for this run's regime: "mixed" (any cap may bind), "end_user" (only the
        end-user cap, mostly replace_oldest, and the concurrency cap bind) or "mint" (only the
        mint pacing binds: backlogs build up and drain). The mint pacing is drawn once per run
        (the backlog is counted exactly while it is unchanged)."""
        concurrency = [1, 2, 3, 5, 100]
        eu_cap = data.draw(st.integers(1, 3))
        if self.regime == "mint":
            per_minute, per_day, concurrency, eu_cap = 10_000, 100_000, [10_000], 10_000
            policy = "reject"
        elif self.regime == "end_user":
            per_minute, per_day, concurrency = 100, 100, [1, 2, 3, 4]
            policy = data.draw(st.sampled_from(["reject", "replace_oldest", "replace_oldest", "replace_oldest"]))
        else:
            per_minute = data.draw(st.sampled_from([0, 1, 2, 3, 5, 100, 100]))
            per_day = data.draw(st.sampled_from([2, 10, 100, 100]))
            policy = data.draw(st.sampled_from(["reject", "replace_oldest"]))
        return Quotas(
            sessions_per_minute=per_minute,
            sessions_per_day=per_day,
            max_concurrent_sessions=data.draw(st.sampled_from(concurrency)),
            max_sessions_per_end_user=eu_cap,
            end_user_policy=policy,  # type: ignore[arg-type]
            openai_requests_per_minute=self.mint_rate,
        )

    @initialize(data=st.data(), batch=BATCH)
    def start(self, data: st.DataObject, batch: list[Request]) -> None:
        """Every run starts with its quotas, mint pacing and window, and a first few admissions."""
        paced = self.regime != "end_user"
        self.mint_rate = data.draw(st.sampled_from([1, 6, 60, 300]) if paced else st.just(300))
        self.window = data.draw(st.sampled_from([0, 5_000, 40_000]) if paced else st.just(40_000))
        self.model.q = self.draw_quotas(data)
        self.do_admit(batch)

    @rule(data=st.data())
    def change_quotas(self, data: st.DataObject) -> None:
        """The admin edits the tenant's quotas (lowering a cap below current usage included)."""
        self.model.q = self.draw_quotas(data)

    async def _dump(self) -> dict[bytes, bytes | None]:
        return {k: await self.redis.dump(k) for k in sorted(await self.redis.keys("*"))}

    @rule(batch=BATCH)
    def do_admit(self, batch: list[Request]) -> None:
        """A few admissions at the same instant, one after the other."""
        for end_user, idem, body, lease_ms in batch:
            self.counter += 1
            sid = f"ses_{self.counter:05d}"
            r = AdmissionRequest(
                tenant_id=TENANT,
                session_id=sid,
                now_ms=self.now,
                quotas=self.model.q,
                end_user=end_user,
                idempotency_digest=idem,
                body_digest=body if idem else None,
                session_fields={"id": sid, "status": "queued"},
                lease_until_ms=self.now + lease_ms,
                mint_window_ms=self.window,
            )
            before = self.run(self._dump())
            expected = self.model.admit(r)
            got = self.run(admit(self.redis, r))
            if isinstance(got, Admitted):  # no budget set: the whole TTL granted (budgets: tests/tenants/test_budgets.py)
                assert got.budget is not None and got.budget.ttl_seconds == self.model.q.max_session_seconds
                assert not got.budget.limited
                got.budget = None
            assert got == expected
            if not isinstance(got, Admitted):
                assert self.run(self._dump()) == before  # refusals and replays write nothing

    @rule(ms=st.one_of(st.integers(0, 5_000), st.integers(5_000, 90_000), st.sampled_from([1, 59_999, 60_000])))
    def advance(self, ms: int) -> None:
        self.now += ms

    @rule(pick=st.integers(0, 1000))
    def session_ends(self, pick: int) -> None:
        """What the terminator does when a session ends: release its lease and end-user slot."""
        alive = sorted(self.model.live)
        if not alive:
            return
        sid = alive[pick % len(alive)]
        self.model.live.pop(sid)
        self.model.status[sid] = "terminated"
        for members in self.model.eu.values():
            members.pop(sid, None)
        self.run(self.redis.zrem(self.scope.live(), sid))
        for eu in ("u1", "u2"):
            self.run(self.redis.zrem(self.scope.end_user(eu), sid))
        self.run(self.redis.hset(self.scope.session(sid), "status", "terminated"))

    @rule(pick=st.integers(0, 1000))
    def session_ready(self, pick: int) -> None:
        queued = sorted(s for s, v in self.model.status.items() if v == "queued")
        if queued:
            sid = queued[pick % len(queued)]
            self.model.status[sid] = "ready"
            self.model.upstream.add(sid)
            self.run(self.redis.hset(self.scope.session(sid), mapping={"status": "ready", "avaturn_session_id": "av"}))

    @invariant()
    def usage_matches(self) -> None:
        for eu in (None, "u1"):
            got = self.run(usage(self.redis, TENANT, self.model.q, self.now, end_user=eu))
            assert got == self.model.snapshot(self.now, eu)

    @invariant()
    def records_match(self) -> None:
        for sid, status in self.model.status.items():
            assert self.run(self.redis.hget(self.scope.session(sid), "status")) == status.encode()
            waits = self.model.waits.get(sid)
            assert self.run(self.redis.hget(self.scope.session(sid), "waits_for")) == (
                ",".join(waits).encode() if waits else None)
        due = self.run(self.redis.zrange(DUE_EXPIRY, 0, -1, withscores=True))
        expected = sorted((due_member(TENANT, s).encode(), float(t)) for s, t in self.model.due_expiry.items())
        assert sorted(due) == expected
        sched = self.run(self.redis.zrange(self.scope.provision_schedule(), 0, -1, withscores=True))
        assert sorted(sched) == sorted((s.encode(), float(t)) for s, t in self.model.slots.items())
        ring = self.run(self.redis.zscore(PROVISION_TENANTS, TENANT))
        assert ring == (min(self.model.slots.values()) if self.model.slots else None)
        assert self.run(self.redis.llen(PROVISION_WAKE)) == min(64, self.model.wakes)


@pytest.mark.parametrize("regime", ["mixed", "end_user", "mint"])
def test_admission_matches_reference_model(redis_server: EmbeddedRedis, regime: str) -> None:
    """Invariant: for every generated sequence, each admit outcome (kind, session id, code,
    limit, current, retry_after, usage snapshot, replaced ids, mint slot and pacing) equals
    the model's; refusals and replays leave every key byte-identical; usage(), the session
    statuses, due:expiry entries and the provisioning schedule (sessions at their slots, the
    tenant's ring score, wake-up tokens) equal the model's after every step."""
    run_state_machine_as_test(
        lambda: AdmissionMachine(redis_server.url, regime),
        settings=settings(max_examples=40, stateful_step_count=30, deadline=None, database=None),
    )

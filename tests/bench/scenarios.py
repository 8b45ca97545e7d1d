"""Scenarios of the benchmark: API floor vs admission, time to ready vs the direct pattern,
one worker's throughput and CPU, and Redis's idle command rate. Each returns plain dicts."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import datetime
from typing import Any

from tenants.budgets import period as budget_period
from tenants.scope import TenantScope
from tests.fixtures.wait import wait_until

from .load import Answer, RunStats, closed_loop, fixed_rate, merge, pct, saturate
from .stack import BenchTenant, Stack

CREATE_BODY = json.dumps({"ttl_seconds": 3600})
SAT_SECONDS = 8.0
SAT_SLICES = 4   # alternating slices of SAT_SECONDS / SAT_SLICES each (see api_floor_and_admission)
HALF_SECONDS = 16.0  # each side's time at half load, in HALF_SLICES alternating slices
HALF_SLICES = 4


def _ms(iso: str | None) -> float:
    if not iso:
        return float("nan")
    return datetime.fromisoformat(iso).timestamp() * 1000


def _dist(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(pct(values, 50), 3), "p99": round(pct(values, 99), 3),
            "max": round(max(values, default=float("nan")), 3)}


def api_floor_and_admission(stack: Stack) -> dict[str, Any]:
    """Baseline A and POST /v1/sessions, each at saturation and at half that rate.

    Run with no worker process: both servers get the same CPU (the queue just grows, and is
    flushed afterwards)."""
    base = stack.start_baseline("a")
    api = stack.procs["api"]
    key = stack.tenant("bench-admission").key
    floor_url, admit_url = base.url + "/floor", api.url + "/v1/sessions"
    out: dict[str, Any] = {}
    saturate(floor_url, [stack.bench_token], seconds=2)  # warm-ups
    saturate(admit_url, [key], method="POST", body=CREATE_BODY, seconds=2)
    # Saturation of A and of the admission in alternating slices (A, ADM, A, ADM...), each figure
    # the sum of its slices: on a shared machine whatever else runs weighs on both alike, where
    # two back-to-back 8 s runs gave ratios from 0.34x to 0.50x for the same code.
    a_runs: list[RunStats] = []
    adm_runs: list[RunStats] = []
    a_cpu = adm_cpu = 0.0
    for _ in range(SAT_SLICES):
        cpu0 = base.cpu_seconds()
        a_runs.append(saturate(floor_url, [stack.bench_token], seconds=SAT_SECONDS / SAT_SLICES))
        a_cpu += base.cpu_seconds() - cpu0
        cpu0 = api.cpu_seconds()
        adm_runs.append(saturate(admit_url, [key], method="POST", body=CREATE_BODY, seconds=SAT_SECONDS / SAT_SLICES))
        adm_cpu += api.cpu_seconds() - cpu0
    out["baseline_a_saturation"] = merge(a_runs).as_dict()
    out["baseline_a_saturation"]["server_cpu_us_per_request"] = _cpu_us(a_cpu, out["baseline_a_saturation"])
    out["admission_saturation"] = merge(adm_runs).as_dict()
    out["admission_saturation"]["server_cpu_us_per_request"] = _cpu_us(adm_cpu, out["admission_saturation"])
    # Each at half its own saturation rate, also in alternating slices, twice as long in all: a
    # p99 of one short run moved with a single stall of the machine (30-60 ms, seen on either
    # side); the percentiles are those of all the requests of a side's slices (load.merge).
    a_half, adm_half = out["baseline_a_saturation"]["rps"] / 2, out["admission_saturation"]["rps"] / 2
    a_runs, adm_runs = [], []
    for _ in range(HALF_SLICES):
        a_runs.append(fixed_rate(floor_url, [stack.bench_token], a_half, seconds=HALF_SECONDS / HALF_SLICES))
        adm_runs.append(fixed_rate(admit_url, [key], adm_half, method="POST", body=CREATE_BODY,
                                   seconds=HALF_SECONDS / HALF_SLICES))
    out["baseline_a_half_load"] = merge(a_runs).as_dict()
    out["admission_half_load"] = merge(adm_runs).as_dict()
    out["admission_half_load"]["slices_p99_ms"] = [round(r.p99, 3) for r in adm_runs]
    stack.stop_proc("baseline_a")
    stack.flush_sessions()
    return out


BUDGET_SECONDS = 1_000_000_000  # the largest budget: never exhausted (nor 50 % reached) by a run


def admission_with_budget(stack: Stack) -> dict[str, Any]:
    """Issue 21: POST /v1/sessions of a tenant with a monthly budget set against one without,
    the same body, at saturation and then both at the same rate (half the no-budget saturation),
    in alternating slices as in :func:`api_floor_and_admission` (whatever else runs on the
    machine weighs on both alike). Run with no worker process."""
    api = stack.procs["api"]
    url = api.url + "/v1/sessions"
    plain = stack.tenant("bench-no-budget").key
    with_budget = stack.tenant("bench-budget", session_seconds_per_month=BUDGET_SECONDS)
    budgeted = with_budget.key
    saturate(url, [plain], method="POST", body=CREATE_BODY, seconds=2)  # warm-ups
    saturate(url, [budgeted], method="POST", body=CREATE_BODY, seconds=2)
    out: dict[str, Any] = {}
    runs: dict[str, list[RunStats]] = {"none": [], "budget": []}
    for _ in range(SAT_SLICES):
        for name, key in (("none", plain), ("budget", budgeted)):
            runs[name].append(saturate(url, [key], method="POST", body=CREATE_BODY, seconds=SAT_SECONDS / SAT_SLICES))
    out["none_saturation"] = merge(runs["none"]).as_dict()
    out["budget_saturation"] = merge(runs["budget"]).as_dict()
    rate = out["none_saturation"]["rps"] / 2
    runs = {"none": [], "budget": []}
    for _ in range(HALF_SLICES):
        for name, key in (("none", plain), ("budget", budgeted)):
            runs[name].append(fixed_rate(url, [key], rate, method="POST", body=CREATE_BODY,
                                         seconds=HALF_SECONDS / HALF_SLICES))
    out["none_half_load"] = merge(runs["none"]).as_dict()
    out["budget_half_load"] = merge(runs["budget"]).as_dict()
    for name in ("none", "budget"):
        out[f"{name}_half_load"]["slices_p99_ms"] = [round(r.p99, 3) for r in runs[name]]
    # the budget was in play: every admission of the budgeted tenant reserved its 3600 s
    month = TenantScope(with_budget.id).budget_month(budget_period(int(time.time() * 1000))[0])
    out["budget_reserved_seconds"] = int(stack.r.hget(month, "reserved") or 0)
    stack.flush_sessions()
    return out


def _cpu_us(cpu_s: float, run: dict[str, Any]) -> float:
    return round(cpu_s * 1e6 / max(1, run["requests"]), 1)


def _ready_overheads(answers: list[Answer], injected_ms: float) -> dict[str, Any]:
    ready = [a for a in answers if a.status == 201]
    overhead = [_ms(a.body.get("ready_at")) - _ms(a.body.get("created_at")) - injected_ms for a in ready]
    return {"ok": len(ready), "failed": len(answers) - len(ready), "overhead_ms": _dist(overhead),
            "end_to_end_ms": _dist([a.latency_ms for a in ready])}


def time_to_ready(stack: Stack, key: str, mint_ms: float, create_ms: float, total: int,
                  concurrency: int) -> dict[str, Any]:
    """POST /v1/sessions?wait=30 from ``concurrency`` callers; (ready - created) minus the
    injected upstream latency is the broker's own overhead."""
    stack.latency(mint_ms, create_ms)
    url = stack.procs["api"].url + "/v1/sessions?wait=30"
    answers, wall = asyncio.run(closed_loop(url, [key], total, concurrency, {"ttl_seconds": 3600},
                                            stagger=(mint_ms + create_ms) / 1000))
    out = _ready_overheads(answers, mint_ms + create_ms)
    out.update(concurrency=concurrency, sessions_per_s=round(out["ok"] / wall, 1))
    return out


def direct_pattern(stack: Stack, mint_ms: float, create_ms: float, total: int, concurrency: int) -> dict[str, Any]:
    """Baseline B: the same callers against the inline mint+create handler."""
    stack.latency(mint_ms, create_ms)
    url = stack.procs["baseline_b"].url + "/sessions"
    answers, wall = asyncio.run(closed_loop(url, [stack.bench_token], total, concurrency,
                                            stagger=(mint_ms + create_ms) / 1000))
    ok = [a for a in answers if a.status == 201]
    return {"ok": len(ok), "failed": len(answers) - len(ok), "concurrency": concurrency,
            "end_to_end_ms": _dist([a.latency_ms for a in ok]), "sessions_per_s": round(len(ok) / wall, 1)}


def wait_settled(stack: Stack, timeout: float) -> None:
    """Until no session is queued or provisioning (the live-status counts the session scripts
    keep, ``sb:stats:live``): one HMGET a poll, so the bench does not steal the CPU."""
    wait_until(lambda: not sum(int(v or 0) for v in stack.r.hmget("sb:stats:live", "queued", "provisioning")),
               timeout, "no session queued or provisioning")


def worker_throughput(stack: Stack, tenant: BenchTenant, n: int, worker: str = "worker") -> dict[str, Any]:
    """A backlog of ``n`` admitted sessions (worker paused), then one worker drains it with
    300 + 500 ms of upstream latency: sessions/s and the worker's CPU per session."""
    stack.latency(300, 500)
    proc = stack.procs[worker]
    proc.pause()
    try:
        url = stack.procs["api"].url + "/v1/sessions"
        answers, _ = asyncio.run(closed_loop(url, [tenant.key], n, 64, {"ttl_seconds": 3600}))
    finally:
        cpu0 = proc.cpu_seconds()
        t0 = time.time() * 1000
        proc.resume()
    ids = [a.body["id"] for a in answers if a.status == 202]
    wait_settled(stack, 120)
    cpu = proc.cpu_seconds() - cpu0
    ready = [int(r[0]) for r in stack.session_fields(tenant.id, ids, "ready_at") if r[0]]
    span = (max(ready) - t0) / 1000 if ready else float("nan")
    return {"sessions": len(ready), "admitted": len(ids), "seconds": round(span, 3),
            "sessions_per_s": round(len(ready) / span, 1), "worker_cpu_ms_per_session": round(cpu * 1000 / n, 3)}


def upstream_cpu(stack: Stack, n: int, concurrency: int) -> dict[str, Any]:
    """The same two calls from a bare process with the same clients (same latency as the worker run)."""
    stack.latency(300, 500)
    out = subprocess.run([sys.executable, "-m", "tests.bench.upstream_cpu", "--openai", stack.sandbox.openai_base_url,
                          "--avaturn", stack.sandbox.avaturn_base_url, "--n", str(n), "--concurrency", str(concurrency)],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    d = json.loads(out.strip().splitlines()[-1])
    return {"n": d["n"], "cpu_ms_per_session": round(d["cpu_s"] * 1000 / d["n"], 3),
            "sessions_per_s": round(d["n"] / d["wall_s"], 1), "cpu_s": d["cpu_s"], "wall_s": d["wall_s"]}


def upstream_cpu_both(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The calls alone run just before and just after the worker's drain, as one: the VM's speed
    drifts by 20-30 % within a minute here, and one run after the drain gave ratios from 1.32
    to 1.63 for the same code; the mean of two runs around it follows the drain's own moment."""
    n, cpu, wall = before["n"] + after["n"], before["cpu_s"] + after["cpu_s"], before["wall_s"] + after["wall_s"]
    return {"n": n, "cpu_ms_per_session": round(cpu * 1000 / n, 3), "sessions_per_s": round(n / wall, 1),
            "runs_cpu_ms_per_session": [before["cpu_ms_per_session"], after["cpu_ms_per_session"]]}


def idle_redis(stack: Stack, seconds: float = 10.0) -> dict[str, Any]:
    """Commands/s Redis serves while the API and worker(s) are idle (the bench's own INFO calls excluded)."""
    def stats() -> dict[str, int]:
        return {k: int(v["calls"]) for k, v in stack.r.info("commandstats").items()}

    time.sleep(3)  # the start-up and the previous scenario's tail die down: what follows is idle
    before = stats()
    time.sleep(seconds)  # the window the idle command rate is measured over
    after = stats()
    delta = {k.removeprefix("cmdstat_"): after[k] - before.get(k, 0) for k in after}
    delta["info"] = delta.get("info", 0) - 1
    delta = {k: v for k, v in delta.items() if v > 0}
    total = sum(delta.values())
    return {"commands_per_s": round(total / seconds, 2), "by_command": dict(sorted(delta.items(), key=lambda kv: -kv[1]))}

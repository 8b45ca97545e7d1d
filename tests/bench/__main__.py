"""``python -m tests.bench [--out bench-results.json] [--only NAME,...]``: run every scenario
of issue 8 once, print the table and write the JSON (measurements, their same-run
baselines, the ratios and the targets)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

from . import expiry, report, scale, scenarios, scheduler, webhooks
from .load import WRK
from .stack import Stack

TERMINATIONS = 10_000
WINDOW_S = 10.0
TENANTS = 10_000


def _step(name: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)


PARTS = ("admission", "budget", "tenants", "ready", "worker", "terminations", "scheduler", "webhooks")


def run(stack: Stack, m: dict[str, Any], only: set[str] | None = None) -> None:
    """Fills ``m`` step by step (a failed step leaves the earlier ones in it). ``only``: a
    subset of :data:`PARTS` (the whole run without it)."""
    want = set(PARTS) if only is None else only
    stack.start_api()
    if want & {"admission", "tenants"}:
        _step("API floor (baseline A) and admission, worker not running")
        adm = scenarios.api_floor_and_admission(stack)
        m["baseline_a"] = {"saturation": adm["baseline_a_saturation"], "half_load": adm["baseline_a_half_load"]}
        m["admission"] = {"saturation": adm["admission_saturation"], "half_load": adm["admission_half_load"]}
    if "budget" in want:
        _step("admission with a budget set vs without, worker not running")
        m["budget"] = scenarios.admission_with_budget(stack)
    if "tenants" in want:
        _step(f"admission latency with 10 and {TENANTS} tenants")
        m["tenants"] = scale.tenants_scaling(stack, TENANTS, m["admission"]["saturation"]["rps"] / 2)

    stack.start_worker()
    if only is None:
        _step("idle Redis command rate (API + worker idle)")
        m["idle_redis"] = scenarios.idle_redis(stack)
    if "ready" in want:
        tenant = stack.tenant("bench-ready")
        stack.start_baseline("b")
        _step("time to ready and baseline B, 0 ms upstreams, one caller")
        m["ttr_0ms"] = scenarios.time_to_ready(stack, tenant.key, 0, 0, total=500, concurrency=1)
        m["direct_0ms"] = scenarios.direct_pattern(stack, 0, 0, total=500, concurrency=1)
        _step("time to ready and baseline B, 300 + 500 ms upstreams, 50 callers")
        m["ttr_800ms"] = scenarios.time_to_ready(stack, tenant.key, 300, 500, total=1000, concurrency=50)
        m["direct_800ms"] = scenarios.direct_pattern(stack, 300, 500, total=1000, concurrency=50)
        _step("time to ready and baseline B, 300 + 500 ms upstreams, 200 callers")
        m["ttr_800ms_c200"] = scenarios.time_to_ready(stack, tenant.key, 300, 500, total=2000, concurrency=200)
        m["direct_800ms_c200"] = scenarios.direct_pattern(stack, 300, 500, total=2000, concurrency=200)
        stack.stop_proc("baseline_b")

    if "worker" in want:
        _step("the upstream calls alone (CPU), before the drain")
        calls_before = scenarios.upstream_cpu(stack, 3000, 500)
    if want & {"worker", "terminations"}:
        _step("one worker draining 3000 sessions at 300 + 500 ms")
        m["worker_throughput"] = scenarios.worker_throughput(stack, stack.tenant("bench-worker"), 3000)
    if "worker" in want:
        _step("the upstream calls alone (CPU), after the drain")
        m["upstream_cpu"] = scenarios.upstream_cpu_both(calls_before, scenarios.upstream_cpu(stack, 3000, 500))
    if "terminations" in want:
        _step(f"{TERMINATIONS} sessions expiring within {WINDOW_S:.0f} s")
        rate = m["worker_throughput"]["sessions_per_s"]
        m["terminations"] = expiry.terminations(stack, TERMINATIONS, WINDOW_S, rate)
        _step("the same with a second worker process (one per core)")
        stack.start_worker("worker2")
        m["terminations_2_workers"] = expiry.terminations(stack, TERMINATIONS, WINDOW_S, rate)
        stack.stop_proc("worker2")
    if "scheduler" in want:
        _step("provisioning scheduler: noisy neighbour, burst lateness, takeover after SIGKILL")
        scheduler.run(stack, m)
    if "webhooks" in want:
        _step("admission with a webhook endpoint vs without (worker paused), same run")
        m["webhook_admission"] = webhooks.admission_with_endpoint(stack)
        _step(f"webhook delivery lateness at {webhooks.EVENTS_PER_S} events/s, one worker")
        m["webhook_lateness"] = webhooks.delivery_lateness(stack)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench")
    p.add_argument("--out", default="bench-results.json")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    args = p.parse_args()
    only = {x.strip() for x in args.only.split(",") if x.strip()} or None
    if only is not None and not only <= set(PARTS):
        p.error(f"--only takes {', '.join(PARTS)}")
    if not WRK:
        print("wrk not found: using aiohttp as the load generator (install wrk for the real figures)", file=sys.stderr)
    log_dir = tempfile.mkdtemp(prefix="sb-bench-")
    _step(f"process logs in {log_dir}")
    started = time.monotonic()
    stack = Stack(log_dir).start()
    measurements: dict[str, Any] = {}
    try:
        run(stack, measurements, only)
        measurements["redis_stalls"] = stack.redis_stalls()
    except BaseException:
        with open(args.out, "w") as f:  # what was measured before the failure
            json.dump({"machine": report.machine(), "incomplete": True, "measurements": measurements}, f, indent=2)
        raise
    finally:
        stack.stop()
    rows = report.rows(measurements)
    result = {
        "machine": report.machine(),
        "load_tool": "wrk" if WRK else "aiohttp",
        "duration_s": round(time.monotonic() - started, 1),
        "targets": report.as_json(rows),
        "measurements": measurements,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(report.table(rows))
    print(f"\n{result['machine']}; load: {result['load_tool']}; {result['duration_s']} s; JSON: {os.path.abspath(args.out)}")
    print(f"Redis during the run (forks, AOF writes delayed by a slow fsync): {measurements.get('redis_stalls')}; "
          f"its log and the processes' logs: {log_dir}")
    missed = [r.name for r in rows if r.met is False]
    if missed:
        print(f"targets missed: {len(missed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

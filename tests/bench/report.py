"""The targets of issue 8 checked against one run's measurements, the printed table, and
the machine description."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from typing import Any

import psutil


@dataclass
class Row:
    name: str
    value: float
    unit: str
    baseline: float | None = None      # the same run's baseline, when there is one
    baseline_name: str = ""
    ratio: float | None = None         # value / baseline
    target: str = ""
    met: bool | None = None


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "kernel": platform.release()}


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def rows(m: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    if "admission" in m:
        out += _admission_rows(m)
    if "ttr_0ms" in m:
        out += _ready_rows(m)
    if "upstream_cpu" in m:
        out += _worker_rows(m)
    if "terminations" in m:
        out += _termination_rows(m)
    if "budget" in m:
        out += _budget_rows(m)
    if "tenants" in m:
        out += _tenant_rows(m)
    if "noisy_neighbour" in m:
        out += _scheduler_rows(m)
    if "webhook_admission" in m:
        out += _webhook_rows(m)
    if "idle_redis" in m:
        idle = m["idle_redis"]
        out.append(Row("Redis commands/s with API + worker idle", idle["commands_per_s"], "cmd/s"))
    return out


def _admission_rows(m: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    a_sat, adm_sat = m["baseline_a"]["saturation"], m["admission"]["saturation"]
    r = _ratio(adm_sat["rps"], a_sat["rps"])
    out.append(Row("admission throughput (POST /v1/sessions)", adm_sat["rps"], "req/s", a_sat["rps"], "A", r,
                   ">= 0.5x A", r >= 0.5))
    a_cpu, adm_cpu = a_sat["server_cpu_us_per_request"], adm_sat["server_cpu_us_per_request"]
    out.append(Row("API process CPU per admission (at saturation)", adm_cpu, "us", a_cpu, "A", _ratio(adm_cpu, a_cpu)))
    a_half, adm_half = m["baseline_a"]["half_load"], m["admission"]["half_load"]
    for p in ("p50", "p99"):
        v = adm_half[f"{p}_ms"]
        out.append(Row(f"admission {p} at 50% load ({adm_half['rps']:.0f} req/s)", v, "ms", a_half[f"{p}_ms"],
                       f"A at {a_half['rps']:.0f} req/s", _ratio(v, a_half[f"{p}_ms"]),
                       "<= 10 ms" if p == "p99" else "", v <= 10 if p == "p99" else None))
    return out


def _budget_rows(m: dict[str, Any]) -> list[Row]:
    """Issue 21: admission with a budget set within 10 % of without (same run, alternating slices)."""
    out: list[Row] = []
    b = m["budget"]
    none, budget = b["none_saturation"]["rps"], b["budget_saturation"]["rps"]
    r = _ratio(budget, none)
    out.append(Row("admission throughput with a budget set", budget, "req/s", none, "no budget", r, ">= 0.9x",
                   r >= 0.9))
    nh, bh = b["none_half_load"], b["budget_half_load"]
    for p in ("p50", "p99"):
        v, base = bh[f"{p}_ms"], nh[f"{p}_ms"]
        r = _ratio(v, base)
        out.append(Row(f"admission {p} with a budget set ({bh['rps']:.0f} req/s)", v, "ms", base,
                       f"no budget at {nh['rps']:.0f} req/s", r, "<= 1.1x" if p == "p99" else "",
                       r <= 1.1 if p == "p99" else None))
    out.append(Row("seconds reserved by the budgeted tenant's admissions (the budget was in play)",
                   b["budget_reserved_seconds"], "s"))
    return out


def _ready_rows(m: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    for label, key in (("0 ms upstreams", "ttr_0ms"), ("300+500 ms upstreams", "ttr_800ms")):
        t = m[key]["overhead_ms"]
        out.append(Row(f"broker overhead to ready p50, {label} (c={m[key]['concurrency']})", t["p50"], "ms",
                       target="<= 10 ms", met=t["p50"] <= 10))
        out.append(Row(f"broker overhead to ready p99, {label}", t["p99"], "ms", target="<= 50 ms", met=t["p99"] <= 50))
    for key, bkey, judged in (("ttr_0ms", "direct_0ms", False), ("ttr_800ms", "direct_800ms", True),
                              ("ttr_800ms_c200", "direct_800ms_c200", False)):
        t, b = m[key], m[bkey]
        for p in ("p50", "p99"):
            v, bv = t["end_to_end_ms"][p], b["end_to_end_ms"][p]
            r = _ratio(v, bv)
            lat = "0 ms" if key == "ttr_0ms" else "300+500 ms"
            out.append(Row(f"end to end {p}, {lat}, c={t['concurrency']} ({t['sessions_per_s']:.0f}/s vs "
                           f"{b['sessions_per_s']:.0f}/s)", v, "ms", bv, "B", r,
                           "<= 1.05x B" if judged else "", r <= 1.05 if judged else None))
    return out


def _worker_rows(m: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    w, u = m["worker_throughput"], m["upstream_cpu"]
    out.append(Row("one worker, 300+500 ms upstreams", w["sessions_per_s"], "sessions/s", target=">= 300",
                   met=w["sessions_per_s"] >= 300))
    r = _ratio(w["worker_cpu_ms_per_session"], u["cpu_ms_per_session"])
    out.append(Row("worker CPU per session", w["worker_cpu_ms_per_session"], "ms", u["cpu_ms_per_session"],
                   "mint+create alone", r, "<= 1.5x", r <= 1.5))
    return out


def _termination_rows(m: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    for key, workers in (("terminations", "1 worker"), ("terminations_2_workers", "2 workers")):
        if key not in m:
            continue
        lat, n = m[key]["lateness_s"], m[key]["sessions"]
        for p in ("p50", "p99", "max"):
            out.append(Row(f"termination lateness {p}, {workers} ({n} due in {m[key]['window_s']:.1f} s)", lat[p],
                           "s", target="<= 1 s" if p == "p99" else "", met=lat[p] <= 1 if p == "p99" else None))
    mem = m["terminations"]["memory"]["bytes_per_live_session"]
    out.append(Row("Redis memory per live session", mem, "bytes", target="<= 2048", met=mem <= 2048))
    return out


def _tenant_rows(m: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    t10, t10k = m["tenants"]["tenants_10"], m["tenants"]["tenants_10000"]
    for p in ("p50", "p99"):
        r = _ratio(t10k[f"{p}_ms"], t10[f"{p}_ms"])
        out.append(Row(f"admission {p}, 10,000 tenants vs 10 ({t10k['rps']:.0f} vs {t10['rps']:.0f} req/s)",
                       t10k[f"{p}_ms"], "ms", t10[f"{p}_ms"], "10 tenants", r, "<= 1.2x", r <= 1.2))
    return out


def _scheduler_rows(m: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    nn = m["noisy_neighbour"]
    alone, beside = nn["alone"]["time_to_ready_ms"]["p99"], nn["beside"]["time_to_ready_ms"]["p99"]
    r = _ratio(beside, alone)
    out.append(Row(f"noisy neighbour: B's time to ready p99 beside A's {nn['a_admitted']} queued", beside, "ms",
                   alone, "B alone", r, "<= 1.2x", r <= 1.2))
    bl = m["burst_lateness"]
    late = bl["lateness_ms"]["p99"]
    out.append(Row(f"burst lateness p99: ready - mint slot - upstream ({bl['ready']} sessions over "
                   f"{bl['slot_span_s']:.0f} s of slots)", late, "ms", target="<= 50 ms", met=late <= 50))
    tk = m["takeover"]
    worst = tk["seconds_after_kill"]["max"]
    out.append(Row(f"takeover after SIGKILL mid-mint: last of {tk['sessions']} ready after the kill", worst, "s",
                   target=f"<= {tk['bound_s']:.0f} s (lease + 1 s)", met=worst <= tk["bound_s"]))
    return out


def _webhook_rows(m: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    adm = m["webhook_admission"]
    with_rps, without_rps = adm["with_endpoint"]["rps"], adm["without"]["rps"]
    r = _ratio(with_rps, without_rps)
    out.append(Row("admission throughput, tenant with a webhook endpoint (worker paused)", with_rps, "req/s", without_rps,
                   "tenant without", r, ">= 0.9x", r >= 0.9))
    if "webhook_lateness" in m:
        late = m["webhook_lateness"]
        lat = late["lateness_ms"]
        what = f"{late['events_delivered']}/{late['events_expected']} events at {late['events_per_s']:.0f}/s, 1 worker"
        out.append(Row(f"webhook delivery lateness p50 ({what})", lat["p50"], "ms"))
        met = lat["p99"] <= 200 and late["events_delivered"] == late["events_expected"]
        out.append(Row("webhook delivery lateness p99 (event recorded -> receiver got it; all delivered)", lat["p99"],
                       "ms", target="<= 200 ms", met=met))
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    if v != v:
        return "nan"
    return f"{v:,.0f}" if abs(v) >= 1000 else (f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}")


def table(rs: list[Row]) -> str:
    head = ("measurement", "value", "unit", "baseline (same run)", "ratio", "target", "met")
    body = [(r.name, _fmt(r.value), r.unit, f"{_fmt(r.baseline)} ({r.baseline_name})" if r.baseline is not None else "",
             _fmt(r.ratio), r.target, "" if r.met is None else ("yes" if r.met else "NO")) for r in rs]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in body]
    return "\n".join(lines)


def as_json(rs: list[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rs]

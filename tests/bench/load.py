"""Load generation: wrk (C, one thread) for saturation and fixed-rate runs when it is
installed, aiohttp otherwise; an aiohttp closed-loop runner for session creations whose
answers (timestamps) we need. Latencies are reported in milliseconds."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

WRK = shutil.which("wrk")
MARK = "BENCHJSON "


@dataclass
class RunStats:
    requests: int
    seconds: float
    errors: int          # non-2xx answers and socket errors
    p50: float
    p90: float
    p99: float
    max: float
    tool: str
    # every latency of the run (microseconds -> count), so that runs can be merged exactly
    hist: dict[int, int] | None = field(default=None, repr=False, compare=False)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "seconds": round(self.seconds, 2), "rps": round(self.rps, 1),
                "errors": self.errors, "p50_ms": round(self.p50, 3), "p90_ms": round(self.p90, 3),
                "p99_ms": round(self.p99, 3), "max_ms": round(self.max, 3), "tool": self.tool}


def merge(runs: Sequence[RunStats]) -> RunStats:
    """Several runs of the same load as one: counts and durations add up, and the percentiles
    are those of every request of the runs together (from their latency histograms). Without a
    histogram (a run from elsewhere) a percentile of the whole is not known from the parts', so
    each is then the worst (largest) of them."""
    requests, seconds, errors = sum(r.requests for r in runs), sum(r.seconds for r in runs), sum(r.errors for r in runs)
    if all(r.hist is not None for r in runs):
        hist: dict[int, int] = {}
        for r in runs:
            for value, count in (r.hist or {}).items():
                hist[value] = hist.get(value, 0) + count
        return RunStats(requests, seconds, errors, hist_pct(hist, 50), hist_pct(hist, 90), hist_pct(hist, 99),
                        max(hist, default=0) / 1000, runs[0].tool, hist)
    return RunStats(requests, seconds, errors, max(r.p50 for r in runs), max(r.p90 for r in runs),
                    max(r.p99 for r in runs), max(r.max for r in runs), runs[0].tool)


def hist_pct(hist: dict[int, int], p: float) -> float:
    """The ``p``-th percentile (ms) of a histogram of latencies in microseconds: the smallest
    value that at least ``p`` % of them do not exceed (as :func:`pct`)."""
    total = sum(hist.values())
    if not total:
        return float("nan")
    rank = max(1, math.ceil(p / 100 * total))
    seen = 0
    for value in sorted(hist):
        seen += hist[value]
        if seen >= rank:
            return value / 1000
    return max(hist) / 1000


def pct(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return float(ordered[k])


def _lua_str(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid Lua string literal for ASCII


_WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('%s{"requests":%d,"duration_us":%d,"errors":%d,"p50":%d,"p90":%d,"p99":%d,"max":%d}\\n',
    '""" + MARK + """', summary.requests, summary.duration, e.status + e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
  -- every latency (microseconds) and its count, for merging runs exactly (load.merge)
  local parts = {}
  for i = 1, #latency do
    local v, c = latency(i)
    parts[#parts + 1] = string.format('[%d,%d]', v, c)
  end
  io.write('""" + MARK + """H[' .. table.concat(parts, ',') .. ']\\n')
end
"""


def _wrk_script(method: str, body: str, tokens: Sequence[str], delay_ms: float | None) -> str:
    lines = [f"wrk.method = {_lua_str(method)}", f"wrk.body = {_lua_str(body)}",
             'wrk.headers["Content-Type"] = "application/json"']
    if len(tokens) == 1:
        lines.append(f'wrk.headers["Authorization"] = {_lua_str("Bearer " + tokens[0])}')
    else:
        lines.append("local keys = {" + ",".join(_lua_str("Bearer " + t) for t in tokens) + "}")
        lines.append("local i = 0")
        lines.append("request = function() i = i % #keys + 1; "
                     "return wrk.format(nil, nil, {Authorization = keys[i], [\"Content-Type\"] = \"application/json\"}, "
                     "nil) end")
    if delay_ms is not None:  # random pauses (mean delay_ms): connections do not fall into step
        lines.append(f"delay = function() return math.random() * {2 * delay_ms:.3f} end")
    return "\n".join(lines) + _WRK_DONE


def _wrk(url: str, method: str, body: str, tokens: Sequence[str], seconds: float, connections: int,
         delay_ms: float | None) -> RunStats:
    assert WRK is not None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_wrk_script(method, body, tokens, delay_ms))
        path = f.name
    try:
        out = subprocess.run([WRK, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
                              "-s", path, url], capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    finally:
        os.unlink(path)
    line = next(ln for ln in out.splitlines() if ln.startswith(MARK + "{"))
    d = json.loads(line[len(MARK):])
    hist_line = next((ln for ln in out.splitlines() if ln.startswith(MARK + "H")), None)
    hist = None
    if hist_line is not None:
        hist = {}
        for value, count in json.loads(hist_line[len(MARK) + 1:]):
            hist[int(value)] = hist.get(int(value), 0) + int(count)
    return RunStats(d["requests"], d["duration_us"] / 1e6, d["errors"], d["p50"] / 1000, d["p90"] / 1000,
                    d["p99"] / 1000, d["max"] / 1000, "wrk", hist)


async def _aiohttp_run(url: str, method: str, body: str, tokens: Sequence[str], seconds: float, connections: int,
                       rate: float | None) -> RunStats:
    lat: list[float] = []
    errors = 0
    data = body.encode()
    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn) as http:
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + seconds
        counter = 0

        async def one() -> None:
            nonlocal errors, counter
            token = tokens[counter % len(tokens)]
            counter += 1
            t0 = loop.time()
            try:
                async with http.request(method, url, data=data, headers={
                        "Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as resp:
                    await resp.read()
                    if resp.status >= 300:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            lat.append((loop.time() - t0) * 1000)

        if rate is None:
            async def worker() -> None:
                while loop.time() < end:
                    await one()
            await asyncio.gather(*(worker() for _ in range(connections)))
        else:
            tasks = []
            i = 0
            while (due := start + i / rate) < end:
                await asyncio.sleep(max(0.0, due - loop.time()))
                tasks.append(asyncio.ensure_future(one()))
                i += 1
            await asyncio.gather(*tasks)
        elapsed = loop.time() - start
    hist: dict[int, int] = {}
    for ms in lat:
        hist[round(ms * 1000)] = hist.get(round(ms * 1000), 0) + 1
    return RunStats(len(lat), elapsed, errors, pct(lat, 50), pct(lat, 90), pct(lat, 99), max(lat, default=0),
                    "aiohttp", hist)


def saturate(url: str, tokens: Sequence[str], *, method: str = "GET", body: str = "", seconds: float = 8,
             connections: int = 64) -> RunStats:
    """Closed loop, as fast as the server answers."""
    if WRK:
        return _wrk(url, method, body, tokens, seconds, connections, None)
    return asyncio.run(_aiohttp_run(url, method, body, tokens, seconds, connections, None))


def fixed_rate(url: str, tokens: Sequence[str], rate: float, *, method: str = "GET", body: str = "",
               seconds: float = 8, connections: int = 32) -> RunStats:
    """About ``rate`` requests/s: each of ``connections`` connections pauses a random time
    (uniform, mean connections/rate) between requests, so arrivals are spread rather than in
    bursts of ``connections`` (the achieved rate is in the result)."""
    if WRK:
        return _wrk(url, method, body, tokens, seconds, connections, connections * 1000.0 / rate)
    return asyncio.run(_aiohttp_run(url, method, body, tokens, seconds, connections * 8, rate))


@dataclass
class Answer:
    status: int
    started: float    # unix seconds, when the request was sent
    latency_ms: float
    body: dict[str, Any]


async def closed_loop(url: str, tokens: Sequence[str], total: int, concurrency: int,
                      body: dict[str, Any] | None = None, stagger: float = 0.0) -> tuple[list[Answer], float]:
    """``total`` POSTs from ``concurrency`` callers, each waiting for its answer; returns the
    answers and the wall time. Caller k starts ``k / concurrency * stagger`` seconds late, so
    callers whose requests all take about the same time do not arrive in waves."""
    answers: list[Answer] = []
    data = json.dumps(body or {}).encode()
    conn = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    next_i = 0
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as http:
        async def caller(k: int) -> None:
            nonlocal next_i
            await asyncio.sleep(k / concurrency * stagger)
            while next_i < total:
                i = next_i
                next_i += 1
                headers = {"Authorization": f"Bearer {tokens[i % len(tokens)]}", "Content-Type": "application/json"}
                started = time.time()
                t0 = time.perf_counter()
                async with http.post(url, data=data, headers=headers) as resp:
                    raw = await resp.read()
                    status = resp.status
                latency = (time.perf_counter() - t0) * 1000
                try:
                    parsed = json.loads(raw)
                except ValueError:
                    parsed = {}
                answers.append(Answer(status, started, latency, parsed))

        t0 = time.perf_counter()
        await asyncio.gather(*(caller(k) for k in range(concurrency)))
        wall = time.perf_counter() - t0
    return answers, wall

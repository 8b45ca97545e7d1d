"""Tests wait for conditions, not for time.

Every ``time.sleep(...)`` / ``asyncio.sleep(...)`` in tests/ (however imported) is either the poll
step of tests/fixtures/wait.py, or in ALLOWED below: a deliberate passage of time that is itself
what the test exercises (a lease lapsing, a TTL, a rate window, a pacing, a slow fake), each with
why. Anything else is a sleep used as synchronisation: wait for the state you expect instead
(``tests.fixtures.wait.wait_until`` / ``wait_until_async``, ``wait_status``, ...).

An entry is (file, enclosing function, the sleep's argument as written): a second sleep in the
same function, or a changed duration, is a new entry to justify. An entry that matches nothing
fails too, so the list stays the inventory of what is there.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
HELPER = "tests/fixtures/wait.py"
SLEEP_MODULES = frozenset({"time", "asyncio", "anyio", "trio"})

# (file, function qualname, argument) -> why the time passing is the behaviour under test
ALLOWED: dict[tuple[str, str, str], str] = {
    # -- the bench: time is what it measures (`make bench`, not part of `make test`) --
    ("tests/bench/expiry.py", "terminations", "max(0.0, t0 - 2 - time.time())"):
        "the sessions' TTLs run toward the measured expiry window; provisioning results (kept 10 s) expire meanwhile",
    ("tests/bench/expiry.py", "terminations", "max(0.0, t0 + window - time.time())"):
        "the expiry window under measurement passes",
    ("tests/bench/load.py", "_aiohttp_run", "max(0.0, due - loop.time())"):
        "open-loop load: each request is sent at its scheduled time (the offered rate)",
    ("tests/bench/load.py", "closed_loop.caller", "k / concurrency * stagger"):
        "closed-loop load: callers start staggered, not as one burst",
    ("tests/bench/scenarios.py", "idle_redis", "3"):
        "the previous scenario's tail dies down before the idle command rate is measured",
    ("tests/bench/scenarios.py", "idle_redis", "seconds"):
        "the window the idle command rate is measured over",
    ("tests/bench/scheduler.py", "takeover", "1.5"):
        "the claims live past a renewal before the kill: the takeover measured is a lease lapsing",
    ("tests/deploy/redis_capacity.py", "_idle_rates", "seconds"):
        "the window the idle Redis CPU and command rates are measured over",
    ("tests/deploy/redis_capacity.py", "measure", "1"):
        "the workers' start-up traffic dies down so the idle rates measured next are idle",
    ("tests/deploy/redis_capacity.py", "measure", "1.5"):
        "the last sweeps and AOF fsyncs land before memory is read: a cadence, no single event to wait on",
    ("tests/deploy/redis_capacity.py", "measure", "11"):
        "arq keeps job results 10 s: their TTL runs out before the memory without them is read",
    # -- fault tests: the fault lasts a given time, or a deadline / lease must lapse --
    ("tests/faults/test_redis_restart.py", "test_redis_killed_and_restarted_mid_run", "2.5"):
        "the Redis outage under test: it outlasts the 1.5 s creates in flight, whose answers come while Redis is down",
    ("tests/faults/test_upstream_faults.py",
     "test_delete_that_keeps_failing_is_retried_until_the_upstream_recovers", "1.0"):
        "a further second of failing DELETEs over which the retry rate (the backoff) is bounded",
    ("tests/faults/test_upstream_faults.py",
     "test_replace_oldest_never_exceeds_max_concurrent_upstream_while_deletes_fail.sample", "0.02"):
        "the sampling period of the peak of live upstream sessions, taken all through the test",
    ("tests/faults/test_worker_crash.py", "test_sigkill_at_every_step_is_finished_by_another_worker",
     "max(0.0, expires_at - time.time() - 6.0)"):
        "the timeline under test: sessions are created so their mint and create straddle another's expiry",
    ("tests/faults/test_worker_crash.py", "test_sigkill_with_expiry_deletes_in_flight_loses_nothing", "LEASE_S + 1.5"):
        "longer than one claim lease: only the live owner's renewals can hold its claims now",
    ("tests/faults/test_worker_crash.py", "test_sessions_stuck_past_the_deadline_are_failed",
     "max(0.0, led.record(waited).created_at / 1000 + deadline_s + 0.5 - time.time())"):
        "the provisioning deadline of the waiting session passes while no worker runs",
    ("tests/faults/test_webhook_delivery_1000.py",
     "test_1000_sessions_every_event_delivered_verified_in_order_through_a_worker_kill_and_a_redis_restart.lifecycle",
     "REDIS_DOWN_S"):
        "the Redis outage under test: fan-out and delivery must pause and go on by themselves",
    ("tests/multiprocess/test_redis_restart.py", "test_worker_survives_a_redis_restart", "3"):
        "the Redis outage under test: both processes live through 3 s without Redis",
    ("tests/multiprocess/test_scheduling.py",
     "test_what_cannot_be_ready_in_time_is_refused_and_the_rest_is_delivered", "retry_after"):
        "the client honours the Retry-After of the refusal: that the request then fits is the invariant",
    # -- the passage of time is the behaviour: a trickle, a grace period, a lease, a rate window --
    ("tests/security/test_http_limits.py", "test_a_stalled_body_gets_the_connection_dropped_a_trickling_one_does_not",
     "0.3"):
        "the trickle itself: one byte every 0.3 s must keep the connection open",
    ("tests/workers/test_expiry.py", "test_two_loops_and_a_stop_job_never_double_terminate",
     "max(0.0, (now + 300 - now_ms()) / 1000)"):
        "the sessions' TTLs run out so they become due while the stop jobs race the loops",
    ("tests/workers/test_expiry.py", "test_a_stop_is_left_to_its_job_then_taken_when_late", "0.7"):
        "inside the 1 s stop grace under test: the loop must not take the stop from its job meanwhile",
    ("tests/workers/test_expiry.py", "test_a_lapsed_claim_is_taken_again", "1.0"):
        "inside the 1.5 s claim lease under test: the session is not taken before the lease lapses",
    ("tests/workers/test_expiry.py", "test_a_live_claimer_renews_its_claim_while_the_delete_hangs", "1.8"):
        "well past the 1 s lease of the first claim: only its renewals hold it",
    ("tests/workers/test_provisioning.py", "test_a_claimers_lease_is_renewed_while_it_works_and_lapses_when_it_dies",
     "2.5 * lease_ms / 1000"):
        "2.5 leases pass: only the renewals keep the claim from the second loop",
    ("tests/workers/test_provisioning.py", "test_an_idle_loop_costs_a_few_commands_a_second", "3.0"):
        "the window the idle loop's command rate is measured over",
    ("tests/workers/test_provisioning.py", "test_a_drained_loop_claims_nothing_and_leaves_the_event_loop_free", "0.3"):
        "a window in which a loop not drained would have claimed the woken session: the claim must not come",
    # -- fakes that are slow on purpose, and single loop turns --
    ("tests/workers/test_shutdown.py", "test_no_background_task_outlives_the_shutdown.slow_snapshot", "30"):
        "the fake snapshot hangs until cancelled (it is the shutdown that ends it)",
    ("tests/workers/test_shutdown.py", "test_no_background_task_outlives_the_shutdown.slow_snapshot", "0.3"):
        "the fake's clean-up is slow on purpose: shutdown must wait for it",
    ("tests/test_redis_mux.py", "test_a_cancelled_caller_does_not_shift_the_replies", "0"):
        "exactly one loop turn: the commands are written, their replies not read yet, "
        "so the cancellations hit commands in flight",
    ("tests/test_redis_mux.py", "test_a_redis_restart_fails_or_retries_the_commands_in_flight_then_reconnects.load",
     "0.05"):
        "a steady load spread over the restart, not one burst before it",
    ("tests/webhooks/test_endpoints_urls.py", "test_a_slow_dns_lookup_is_bounded.hang", "3600"):
        "the fake resolver never answers: the lookup's own timeout is what ends it",
    ("tests/webhooks/receiver.py", "Receiver._handle", "delay"):
        "the fake receiver answers slowly on purpose when told to: slow endpoints are under test",
    ("tests/workers/test_gc.py", "_start_and_stop", "0"):
        "one loop turn between start-up and shutdown, as a running worker has",
}


@dataclass(frozen=True)
class Sleep:
    path: str
    function: str
    argument: str
    line: int

    @property
    def key(self) -> tuple[str, str, str]:
        return self.path, self.function, self.argument

    def __str__(self) -> str:
        return f"{self.path}:{self.line} in {self.function}: sleep({self.argument})"


class _Finder(ast.NodeVisitor):
    def __init__(self, path: str) -> None:
        self.path = path
        self.scope: list[str] = []
        self.modules: set[str] = set(SLEEP_MODULES)  # names of a module that has a sleep (imported or not)
        self.functions: set[str] = set()   # names bound to such a sleep (from time import sleep)
        self.found: list[Sleep] = []

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name in SLEEP_MODULES:
                self.modules.add(alias.asname or alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module in SLEEP_MODULES:
            for alias in node.names:
                if alias.name == "sleep":
                    self.functions.add(alias.asname or alias.name)

    def _scoped(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        is_sleep = (isinstance(func, ast.Attribute) and func.attr == "sleep"
                    and isinstance(func.value, ast.Name) and func.value.id in self.modules) or (
                    isinstance(func, ast.Name) and func.id in self.functions)
        if is_sleep:
            argument = ", ".join(ast.unparse(a) for a in [*node.args, *node.keywords])
            self.found.append(Sleep(self.path, ".".join(self.scope) or "<module>", argument, node.lineno))
        self.generic_visit(node)


def sleeps_in(path: str, source: str) -> list[Sleep]:
    """Every sleep call in ``source`` (a file of tests/ at ``path``)."""
    finder = _Finder(path)
    finder.visit(ast.parse(source, filename=path))
    return finder.found


def sources(root: Path = ROOT) -> Iterator[tuple[str, str]]:
    """(path, text) of every Python file of tests/ but the wait helper."""
    for file in sorted((root / "tests").rglob("*.py")):
        rel = file.relative_to(root).as_posix()
        if rel != HELPER:
            yield rel, file.read_text()


Key = tuple[str, str, str]


def offences(files: Iterable[tuple[str, str]], allowed: dict[Key, str]) -> tuple[list[Sleep], list[Key]]:
    """(sleeps not allowed, allow-list entries that match no sleep)."""
    found = [s for path, source in files for s in sleeps_in(path, source)]
    bare = [s for s in found if s.key not in allowed]
    stale = sorted(set(allowed) - {s.key for s in found})
    return bare, stale


def test_no_sleep_is_used_as_synchronisation() -> None:
    bare, stale = offences(sources(), ALLOWED)
    assert not bare, ("sleeps used as synchronisation (wait for the state instead, with tests/fixtures/wait.py), "
                      "or deliberate ones missing from ALLOWED with their reason:\n" + "\n".join(map(str, bare)))
    assert not stale, f"ALLOWED entries that match no sleep any more (remove them): {stale}"


def test_every_allowed_sleep_says_why() -> None:
    terse = [key for key, why in ALLOWED.items() if len(why.split()) < 4]
    assert not terse, terse


def test_the_check_fails_on_a_bare_sleep_however_it_is_imported() -> None:
    """The check itself can fail: a synthetic file with sleeps spelled every way is caught."""
    source = (
        "import time, asyncio as aio\n"
        "from time import sleep as nap\n"
        "from asyncio import sleep\n"
        "def test_a():\n    time.sleep(0.5)\n"
        "async def test_b():\n    await aio.sleep(1)\n"
        "class TestC:\n    def test_c(self):\n        nap(2)\n"
        "    async def test_d(self):\n        await sleep(0.1)\n"
        "def not_a_sleep(event):\n    event.sleep(1)\n    other.sleep(2)\n"
    )
    bare, stale = offences([("tests/test_synthetic.py", source)], {})
    assert [(s.function, s.argument, s.line) for s in bare] == [
        ("test_a", "0.5", 5), ("test_b", "1", 7), ("TestC.test_c", "2", 10), ("TestC.test_d", "0.1", 12)]
    assert stale == []
    # allowed by its exact key only: same function with another duration is still caught
    allowed = {("tests/test_synthetic.py", "test_a", "0.5"): "the lease lapsing is under test",
               ("tests/test_synthetic.py", "test_b", "2"): "no such sleep: a stale entry"}
    bare, stale = offences([("tests/test_synthetic.py", source)], allowed)
    assert [s.function for s in bare] == ["test_b", "TestC.test_c", "TestC.test_d"]
    assert stale == [("tests/test_synthetic.py", "test_b", "2")]


def test_the_wait_helper_is_the_only_file_left_out() -> None:
    assert HELPER not in {path for path, _ in sources()}
    assert sleeps_in(HELPER, (ROOT / HELPER).read_text()), "the helper's poll step is a sleep the check would see"

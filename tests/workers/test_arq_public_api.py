"""arq is used through its documented API only (issue 15): no module of the project imports a
name arq does not document, touches a private attribute of an arq object, or writes arq's
Redis keys by hand. An arq upgrade can then change its internals without breaking us
silently; what we do rely on is listed here and checked to exist.

Documented means in arq's docs (https://arq-docs.helpmanual.io/, "API"): the package's
``__all__`` plus the classes and functions of its modules that the docs describe."""

from __future__ import annotations

import ast
from pathlib import Path

import arq
from arq.connections import ArqRedis
from arq.jobs import Job
from arq.worker import Worker

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("broker", "workers", "tenants")

# (module, name) pairs a module of ours may import from arq.
DOCUMENTED = {("arq", name) for name in arq.__all__} | {
    ("arq.connections", "ArqRedis"), ("arq.connections", "RedisSettings"), ("arq.connections", "create_pool"),
    ("arq.worker", "Worker"), ("arq.worker", "Retry"), ("arq.worker", "func"), ("arq.worker", "Function"),
    ("arq.worker", "run_worker"), ("arq.worker", "check_health"), ("arq.cron", "cron"),
    ("arq.jobs", "Job"), ("arq.jobs", "JobStatus"), ("arq.jobs", "JobDef"), ("arq.jobs", "JobResult"),
}
# Public methods and attributes of arq's objects that the worker relies on (workers/main.py,
# broker/sessions/jobs.py): an upgrade that removes one fails here rather than at run time.
RELIED_ON = {
    Worker: ("async_run", "close", "handle_sig_wait_for_completion"),
    ArqRedis: ("enqueue_job",),
}


def _sources() -> list[Path]:
    files: list[Path] = []
    for package in PACKAGES:
        files += sorted((ROOT / package).rglob("*.py")) + sorted((ROOT / package).rglob("*.lua"))
    return files


async def _private_names() -> set[str]:
    """Every private attribute arq itself defines on its public objects (methods, and what a
    Worker sets on itself; not those ArqRedis inherits from redis-py), dunders aside."""

    async def job(ctx: dict[str, object]) -> None:
        return None

    pool = ArqRedis()
    worker = Worker(functions=[job], redis_pool=pool, handle_signals=False)
    names: set[str] = set()
    for obj in (Worker, worker, ArqRedis, Job):
        names |= {n for n in vars(obj) if n.startswith("_") and not n.startswith("__")}
    await pool.aclose()
    return names


def _imports_arq(tree: ast.AST) -> bool:
    return any((isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "arq")
               or (isinstance(n, ast.Import) and any(a.name.split(".")[0] == "arq" for a in n.names))
               for n in ast.walk(tree))


def test_only_documented_arq_names_are_imported() -> None:
    found: list[str] = []
    for path in _sources():
        if path.suffix != ".py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "arq":
                found += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                          if (node.module, a.name) not in DOCUMENTED]
            elif isinstance(node, ast.Import):
                found += [f"{path.relative_to(ROOT)}: import {a.name}" for a in node.names
                          if a.name.split(".")[0] == "arq" and a.name != "arq"]
    assert not found, "arq names that arq does not document:\n" + "\n".join(found)


async def test_no_private_attribute_of_an_arq_object_is_touched() -> None:
    """No override of an arq private method anywhere; no private arq attribute read or written
    in a module that imports arq (the only ones holding arq objects: the worker, the job queue,
    the Redis client factory, the metrics)."""
    private = await _private_names()
    assert {"_poll_iteration", "_pool", "_handle_signals", "_job_completion_wait"} <= private  # the scan sees them
    found = []
    for path in _sources():
        if path.suffix != ".py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        uses_arq = _imports_arq(tree)
        for node in ast.walk(tree):
            name = None
            if uses_arq and isinstance(node, ast.Attribute) and node.attr in private:
                name = node.attr
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in private:
                name = f"def {node.name}"  # an override of arq's private method
            if name is not None:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert not found, "private arq names used:\n" + "\n".join(found)


def test_no_arq_key_is_written_by_hand() -> None:
    found = [str(p.relative_to(ROOT)) for p in _sources() if "arq:" in p.read_text()]
    assert not found, f"arq's Redis key layout written by hand in: {found}"


def test_the_public_names_we_rely_on_exist() -> None:
    for cls, names in RELIED_ON.items():
        for name in names:
            assert callable(getattr(cls, name, None)), f"{cls.__name__}.{name}"
    assert set(arq.__all__) >= {"Worker", "Retry", "cron", "func", "ArqRedis"}


def test_the_modules_replaced_by_the_scheduler_are_gone() -> None:
    assert not (ROOT / "workers" / "wakeup.py").exists()
    assert not (ROOT / "workers" / "arq_run.py").exists()


async def test_the_scan_would_catch_a_violation() -> None:
    """The checks above can fail: the same scan on a module written the old way finds it."""
    bad = ("from arq.constants import in_progress_key_prefix\n"
           "class W:\n    async def _poll_iteration(self):\n        return self.pool._pool\n")
    tree = ast.parse(bad)
    imports = [(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    assert imports and all(i not in DOCUMENTED for i in imports)
    private = await _private_names()
    assert any(isinstance(n, ast.AsyncFunctionDef) and n.name in private for n in ast.walk(tree))
    assert any(isinstance(n, ast.Attribute) and n.attr in private for n in ast.walk(tree))

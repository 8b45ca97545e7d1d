"""The import layers (docs/architecture.md#layers): arrows point down only.

    broker.core  <-  tenants  <-  broker.sessions, broker.webhooks  <-  broker.api, workers  <-  top

``top`` is the CLI, the dev runner and the API launcher (``broker/cli*.py``, ``broker/dev*.py``,
``broker/serve.py``, ``broker/embedded_redis.py``): they may import everything. ``broker.api`` and
``workers`` are siblings: neither imports the other. Every import counts, at module level or inside
a function, under ``TYPE_CHECKING`` or not, absolute or relative. A module of ours also never
imports a private name (``_name``) of another package of ours.

The check is a function of the sources (:func:`violations`), so the tests below prove it fails on
a bad arrow before trusting it on the tree.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("broker", "tenants", "workers")

# Longest prefix wins.
LAYER_OF = {
    "broker.core": "core",
    "tenants": "tenants",
    "broker.sessions": "domain",
    "broker.webhooks": "domain",
    "broker.api": "api",
    "workers": "workers",
    "broker": "top",  # the package itself and broker/cli*.py, dev*.py, serve.py, embedded_redis.py
}
TOP_MODULES = ("broker.cli", "broker.cli_tenants", "broker.cli_usage", "broker.dev", "broker.dev_state",
               "broker.serve", "broker.embedded_redis", "broker")
MAY_IMPORT = {
    "core": {"core"},
    "tenants": {"core", "tenants"},
    "domain": {"core", "tenants", "domain"},
    "api": {"core", "tenants", "domain", "api"},
    "workers": {"core", "tenants", "domain", "workers"},
    "top": {"core", "tenants", "domain", "api", "workers", "top"},
}


def layer(module: str) -> str | None:
    """The layer of one of our modules; None for a module no layer claims (a new top-level
    ``broker/x.py`` must be given one)."""
    for prefix in sorted(LAYER_OF, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            if prefix == "broker" and module not in TOP_MODULES:
                return None
            return LAYER_OF[prefix]
    return None


def tree_sources() -> dict[str, tuple[str, bool]]:
    """module name -> (source, is a package's ``__init__``) for every module of ours."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_init = parts[-1] == "__init__"
            if is_init:
                parts.pop()
            out[".".join(parts)] = (path.read_text(), is_init)
    return out


def imports(module: str, source: str, is_init: bool, known: set[str]) -> list[tuple[int, str, str | None]]:
    """(line, imported module, imported name or None) for every import of ours in ``source``."""
    package = module if is_init else module.rpartition(".")[0]
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub, None) if sub in known else (node.lineno, target, alias.name))
    return [f for f in found if f[1].split(".")[0] in PACKAGES]


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    known = set(sources)
    bad = []
    for module, (source, is_init) in sorted(sources.items()):
        mine = layer(module)
        if mine is None:
            bad.append(f"{module}: in no layer (add it to tests/test_layers.py and docs/architecture.md)")
            continue
        for line, target, name in imports(module, source, is_init, known):
            theirs = layer(target)
            if theirs is None or theirs not in MAY_IMPORT[mine]:
                bad.append(f"{module}:{line} ({mine}) imports {target} ({theirs})")
            own_package = module.split(".")[:2] == target.split(".")[:2]
            if name and name.startswith("_") and not name.startswith("__") and not own_package:
                bad.append(f"{module}:{line} imports the private name {target}.{name}")
    return bad


def test_the_tree_keeps_its_layers() -> None:
    sources = tree_sources()
    assert len(sources) > 100  # the walk found the packages
    assert violations(sources) == []


def _with(module: str, source: str) -> list[str]:
    sources = tree_sources()
    sources[module] = (source, False)
    return violations(sources)


def test_an_arrow_up_fails() -> None:
    # tenants importing the HTTP layer, at module level
    assert _with("tenants.bad", "from broker.api.ratelimit import refusal_headers\n") == [
        "tenants.bad:1 (tenants) imports broker.api.ratelimit (api)"]
    # the bottom importing tenants, inside a function
    assert _with("broker.core.bad", "def f():\n    import tenants.scope\n") == [
        "broker.core.bad:2 (core) imports tenants.scope (tenants)"]
    # the session domain importing the HTTP layer through a relative import, only for typing
    src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..api import ratelimit\n"
    assert _with("broker.sessions.bad", src) == ["broker.sessions.bad:3 (domain) imports broker.api.ratelimit (api)"]
    # siblings: the workers import neither the API nor its launcher
    assert _with("workers.bad", "from broker import serve\nfrom broker.api.metrics import ApiMetrics\n") == [
        "workers.bad:1 (workers) imports broker.serve (top)",
        "workers.bad:2 (workers) imports broker.api.metrics (api)"]
    assert _with("broker.api.bad", "from workers.metrics import WorkerMetrics\n") == [
        "broker.api.bad:1 (api) imports workers.metrics (workers)"]


def test_a_private_name_of_another_package_fails() -> None:
    assert _with("workers.bad", "from broker.core.logs import _ArqJobLines\n") == [
        "workers.bad:1 imports the private name broker.core.logs._ArqJobLines"]
    assert _with("workers.jobs.fine", "from workers.jobs.common import _x\n") == []


def test_a_module_in_no_layer_fails() -> None:
    assert _with("broker.newthing", "") == [
        "broker.newthing: in no layer (add it to tests/test_layers.py and docs/architecture.md)"]


def test_the_top_may_import_everything() -> None:
    assert _with("broker.cli", "import workers.main\nimport broker.api.app\nfrom broker import serve\n") == []

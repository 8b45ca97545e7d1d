"""Private names of libraries live in one compat module per library (``compat_<package>.py``,
e.g. ``broker/core/compat_redis.py``), each guarded by a version test; nowhere else.

Read from the sources with ``ast``:

- an import of a library's private module or name (``from redis._parsers import ...``,
  ``from openai import _x``, ``import redis._parsers``) is allowed only in ``compat_<package>``;
- an attribute ``x._name`` is a library's private name unless the module defines ``_name`` itself
  (a ``def``/``class`` of that name, a module-level name, or an attribute it assigns on
  ``self``/``cls``): allowed only in a compat module. The namedtuple API (``_replace``, ``_asdict``,
  ``_fields``, ``_make``) is public despite its underscore.

The check is a function of the sources (:func:`violations`), proven to fail on synthetic cases below.
"""

from __future__ import annotations

import ast

from tests.test_layers import PACKAGES, tree_sources

PUBLIC_DESPITE_UNDERSCORE = frozenset({"_replace", "_asdict", "_fields", "_make", "_field_defaults"})


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _compat_for(module: str) -> str | None:
    """``broker.core.compat_redis`` -> ``redis``."""
    last = module.rpartition(".")[2]
    return last.removeprefix("compat_") if last.startswith("compat_") else None


def _defined_here(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            names.add(node.attr)
        elif isinstance(node, ast.alias) and node.asname:
            names.add(node.asname)
    return names


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    bad: list[str] = []
    for module, (source, _) in sorted(sources.items()):
        found: list[tuple[int, str]] = []
        library_here = _compat_for(module)
        tree = ast.parse(source)
        defined = _defined_here(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    top, *rest = alias.name.split(".")
                    if top not in PACKAGES and any(map(_private, rest)) and library_here != top:
                        found.append((node.lineno, f"{module}:{node.lineno} imports {alias.name}"))
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                top, *rest = node.module.split(".")
                if top in PACKAGES or top == "__future__" or library_here == top:
                    continue
                for alias in node.names:
                    if any(map(_private, rest)) or _private(alias.name):
                        found.append((node.lineno, f"{module}:{node.lineno} imports {node.module}.{alias.name}"))
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                if node.attr in defined or node.attr in PUBLIC_DESPITE_UNDERSCORE or library_here:
                    continue
                found.append((node.lineno, f"{module}:{node.lineno} uses {ast.unparse(node)}"))
        bad += [message for _, message in sorted(found)]
    return bad


def test_no_private_name_of_a_library_outside_its_compat_module() -> None:
    assert violations(tree_sources()) == []


def _check(module: str, source: str) -> list[str]:
    return violations({module: (source, False)})


def test_a_private_import_fails() -> None:
    src = "from redis._parsers.hiredis import _AsyncHiredisParser\nimport redis._parsers\n"
    assert _check("workers.lean_io", src) == [
        "workers.lean_io:1 imports redis._parsers.hiredis._AsyncHiredisParser",
        "workers.lean_io:2 imports redis._parsers"]
    assert _check("workers.upstreams.openai", "def f():\n    from openai._vendor import x\n") == [
        "workers.upstreams.openai:2 imports openai._vendor.x"]
    # in its library's compat module it is fine; in another library's it is not
    assert _check("broker.core.compat_redis", src) == []
    assert _check("workers.upstreams.compat_openai", src) == [
        "workers.upstreams.compat_openai:1 imports redis._parsers.hiredis._AsyncHiredisParser",
        "workers.upstreams.compat_openai:2 imports redis._parsers"]


def test_a_private_attribute_fails() -> None:
    src = "def f(conn, retry):\n    retry._backoff.reset()\n    return conn._writer\n"
    assert _check("broker.core.redis_mux", src) == [
        "broker.core.redis_mux:2 uses retry._backoff", "broker.core.redis_mux:3 uses conn._writer"]
    assert _check("broker.core.compat_redis", src) == []


def test_the_modules_own_private_names_are_fine() -> None:
    src = ("class A:\n    def __init__(self):\n        self._n = 0\n    def _step(self):\n        return 1\n"
           "def _helper(other: A):\n    return other._n + other._step() + _helper.__name__.__len__()\n"
           "def g(p):\n    return p._replace(x=1)\n")
    assert _check("tenants.fine", src) == []

"""The documentation stays true to the code: every route the app serves is in docs/api.md, the
README stays short, and no relative link of the README or of docs/*.md points at nothing."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

from broker.api.app import create_app
from tests.fixtures.stack import make_settings

ROOT = Path(__file__).resolve().parents[1]
API_DOC = ROOT / "docs" / "api.md"
README_MAX_LINES = 300
UNUSED = "http://127.0.0.1:9"  # never contacted: the app is built, not started (its lifespan opens the clients)

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_TEMPLATE = re.compile(r"\{(\w+):\w+\}")  # Litestar's /{session_id:str} -> /{session_id}


def served_routes() -> set[tuple[str, str]]:
    """(method, path) of every operation in the app's OpenAPI document and of every other route
    it serves (the ops routes, the documents under /schema), HEAD and OPTIONS aside."""
    settings = make_settings("redis://127.0.0.1:9/0", SimpleNamespace(openai_base_url=UNUSED + "/v1",
                                                                       avaturn_base_url=UNUSED + "/api/v1"))
    app = create_app(settings)
    routes = {(method.upper(), path) for path, item in app.openapi_schema.to_schema()["paths"].items()
              for method in item if method.upper() in ("GET", "POST", "PUT", "PATCH", "DELETE")}
    for route in app.routes:
        path = _TEMPLATE.sub(r"{\1}", route.path)
        if path == "/schema/{path}":  # Litestar's catch-all for unknown documents: 404s, documented as such
            continue
        routes |= {(m, path) for m in getattr(route, "methods", ()) if m not in ("HEAD", "OPTIONS")}
    return routes


def undocumented(routes: set[tuple[str, str]], text: str) -> list[str]:
    """Routes not named in ``text`` as ``METHOD /path`` (the path not followed by more path)."""
    missing = []
    for method, path in sorted(routes):
        if not re.search(rf"\b{method} {re.escape(path)}(?![\w/{{.-])", text):
            missing.append(f"{method} {path}")
    return missing


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _FENCE.sub("", markdown).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(doc: Path) -> list[str]:
    """Relative links of ``doc`` whose file is missing, or whose #anchor names no heading of
    the markdown file it points at."""
    broken = []
    for target in _LINK.findall(_FENCE.sub("", doc.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            shown = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest.name
            broken.append(f"{target}: no heading #{anchor} in {shown}")
    return broken


def test_every_served_route_is_in_the_api_reference() -> None:
    """Invariant: docs/api.md names every operation of the OpenAPI document and every other
    route of the app (``METHOD /path``), so a new route cannot ship undocumented."""
    routes = served_routes()
    # the document really was read: the tenant, admin and ops surfaces are all there
    assert {("POST", "/v1/sessions"), ("DELETE", "/admin/v1/tenants/{tenant_id}/keys/{key_id}"),
            ("GET", "/healthz"), ("GET", "/schema/openapi.json")} <= routes, sorted(routes)
    assert undocumented(routes, API_DOC.read_text()) == []


def test_a_route_missing_from_the_reference_is_reported() -> None:
    """The check above can fail: a route absent from the text, or present only as the prefix
    of a longer path, is reported."""
    routes = {("GET", "/v1/sessions"), ("GET", "/v1/sessions/{session_id}")}
    assert undocumented(routes, "### GET /v1/sessions/{session_id}\n") == ["GET /v1/sessions"]
    assert undocumented(routes, "`GET /v1/sessions` and `GET /v1/sessions/{session_id}`") == []


def test_the_readme_stays_short() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (limit {README_MAX_LINES})"


def test_relative_links_point_at_something() -> None:
    """Invariant: every relative link of README.md and docs/*.md names an existing file, and
    its #anchor, if any, an existing heading of that file."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(docs) > 5
    broken = {str(d.relative_to(ROOT)): b for d in docs if (b := broken_links(d))}
    assert broken == {}


def test_broken_links_are_reported(tmp_path: Path) -> None:
    """The link check can fail: a missing file, a missing heading, and a good link beside them."""
    (tmp_path / "b.md").write_text("# One process = one `/metrics`\n## Same\n## Same\n")
    doc = tmp_path / "a.md"
    doc.write_text("[ok](b.md#one-process--one-metrics) [ok2](b.md#same-1) [web](https://x.test/nope)\n"
                   "[gone](nope.md) [bad anchor](b.md#nothing) [self](#missing)\n"
                   "```\n[in code](ignored.md)\n```\n# A\n")
    assert broken_links(doc) == ["nope.md: no such file", "b.md#nothing: no heading #nothing in b.md",
                                 "#missing: no heading #missing in a.md"]

"""``tenants apply FILE``: tenants as code. Every entry is checked before anything is written,
then each is created, updated or left alone, and the outcome of each is reported.

An entry is a create body (as ``POST /admin/v1/tenants``), optionally with ``id``. It matches
an existing tenant by ``id``, else by ``name`` (names are unique per deployment); a matched
tenant is patched with the entry (as ``PATCH``), an unmatched entry is created. An entry whose
patch would change nothing is ``unchanged`` and not written (credentials are compared by their
plaintext, so re-applying a file with API keys in it is ``unchanged`` too).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from broker.core.errors import BrokerError, InvalidInput
from tenants.models import Tenant, TenantCreate, TenantPatch, TenantView
from tenants.service import TenantService, decode_create, decode_patch

Action = Literal["created", "updated", "unchanged"]


class _Plan(msgspec.Struct):
    index: int
    action: Action
    tenant_id: str | None
    create: TenantCreate | None = None
    patch: TenantPatch | None = None
    preview: Tenant | None = None


def _label(index: int, entry: Any) -> str:
    name = entry.get("name") if isinstance(entry, dict) else None
    return f"entry {index}" + (f" ({name!r})" if isinstance(name, str) else "")


async def _plan_one(service: TenantService, index: int, raw: Any) -> _Plan:
    if not isinstance(raw, dict):
        raise InvalidInput("must be a JSON object (a tenant body)", field=f"[{index}]")
    entry = dict(raw)
    tenant_id = entry.pop("id", None)
    if tenant_id is not None and not isinstance(tenant_id, str):
        raise InvalidInput("id must be a tenant id (ten_...)", field="id")
    existing = await service.get(tenant_id) if tenant_id else None
    if existing is None and isinstance(entry.get("name"), str):
        existing = await service.find_by_name(entry["name"])
    if existing is None:
        create = decode_create(entry)
        return _Plan(index, "created", None, create=create, preview=service.build(create))
    patch = decode_patch(entry)
    after = service.patched(existing, patch)
    action: Action = "unchanged" if service.same_settings(existing, after) else "updated"
    return _Plan(index, action, existing.id, patch=patch, preview=existing if action == "unchanged" else after)


async def plan(service: TenantService, entries: Any) -> list[_Plan]:
    """Check every entry; InvalidInput naming each failing entry (and its field) if any fails."""
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list):
        raise InvalidInput("the file must hold a JSON list of tenant bodies (or one tenant body)")
    plans: list[_Plan] = []
    problems: list[str] = []
    first_field: str | None = None
    for index, raw in enumerate(entries):
        try:
            plans.append(await _plan_one(service, index, raw))
        except BrokerError as exc:
            field = f" ({exc.field})" if exc.field and exc.field not in exc.message else ""
            problems.append(f"{_label(index, raw)}: {exc.code}: {exc.message}{field}")
            first_field = first_field or f"[{index}]" + (f".{exc.field}" if exc.field else "")
    owners: dict[str, int] = {}
    for p in plans:  # two entries that would end with one name (or two entries for one tenant)
        assert p.preview is not None
        for key in (f"name {p.preview.name!r}", *([f"tenant {p.tenant_id}"] if p.tenant_id else [])):
            if key in owners:
                problems.append(f"entry {p.index}: {key} is also in entry {owners[key]}")
                first_field = first_field or f"[{p.index}]"
            owners.setdefault(key, p.index)
        if p.action != "unchanged" and p.tenant_id is not None and p.patch and p.patch.name is not None:
            holder = await service.find_by_name(p.preview.name)
            if holder is not None and holder.id != p.tenant_id:
                problems.append(f"entry {p.index}: tenant_name_taken: {p.preview.name!r} belongs to {holder.id}")
                first_field = first_field or f"[{p.index}].name"
    if problems:
        raise InvalidInput(
            f"nothing was applied; {len(problems)} problem(s): " + "; ".join(problems),
            code="invalid_apply_file", field=first_field,
        )
    return plans


async def apply(service: TenantService, entries: Any) -> list[dict[str, Any]]:
    """Check everything (:func:`plan`), then write; one ``{"entry", "action", "tenant"}`` per entry."""
    results: list[dict[str, Any]] = []
    for p in await plan(service, entries):
        if p.action == "created":
            assert p.create is not None
            tenant = await service.create(p.create)
        elif p.action == "updated":
            assert p.tenant_id is not None and p.patch is not None
            tenant = await service.update(p.tenant_id, p.patch)
        else:
            assert p.preview is not None
            tenant = p.preview
        results.append({"entry": p.index, "action": p.action, "tenant": msgspec.to_builtins(TenantView.of(tenant))})
    return results

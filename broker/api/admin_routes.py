"""Admin API (/admin/v1): tenants and their API keys. Off unless BROKER_ADMIN_TOKEN is set.
Responses show whether credentials are set, never their values: upstream keys as
``api_key_set``, MCP credentials of the session defaults as a marker that a PATCH may send
back to keep them (``TenantView``, :mod:`tenants.session_secrets`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Request, Response, Router, delete, get, patch, post
from litestar.datastructures import State
from litestar.params import FromPath

from broker.core.errors import InvalidInput
from tenants.apikeys import MAX_ROTATION_OVERLAP_SECONDS
from tenants.models import TenantView, disabled_view, revoked_view
from tenants.service import decode_create, decode_patch

from .body import read_json
from .deps import admin_guard


def _view(tenant: Any, status: int = 200) -> Response[Any]:
    return Response(content=TenantView.of(tenant), status_code=status)


async def _json(request: Request) -> Any:
    raw, _ = await read_json(request, dict, empty_ok=True)  # type: ignore[type-abstract]
    return raw


@post("/tenants", status_code=201)
async def create_tenant(request: Request, state: State) -> Response[Any]:
    body = await _json(request)
    tenant = await state.tenants.create(decode_create(body))
    return _view(tenant, 201)


@get("/tenants")
async def list_tenants(request: Request, state: State) -> Response[Any]:
    raw_limit = request.query_params.get("limit", "20")
    if not (raw_limit.isascii() and raw_limit.isdigit()):  # int() would take " 5", "1_0", "+5"
        raise InvalidInput("limit must be an integer between 1 and 100", code="invalid_limit", field="limit")
    limit = int(raw_limit)
    tenants, next_cursor = await state.tenants.list(limit=limit, cursor=request.query_params.get("cursor"))
    return Response(content={"data": [TenantView.of(t) for t in tenants], "next_cursor": next_cursor})


@get("/tenants/{tenant_id:str}")
async def get_tenant(state: State, tenant_id: FromPath[str]) -> Response[Any]:
    return _view(await state.tenants.get(tenant_id))


@patch("/tenants/{tenant_id:str}")
async def patch_tenant(request: Request, state: State, tenant_id: FromPath[str]) -> Response[Any]:
    body = await _json(request)
    tenant = await state.tenants.update(tenant_id, decode_patch(body))
    if not tenant.active:
        await state.sessions.stop_all(tenant.id, "tenant_disabled")
    return _view(tenant)


@post("/tenants/{tenant_id:str}/disable", status_code=200)
async def disable_tenant(state: State, tenant_id: FromPath[str]) -> Response[Any]:
    """The tenant with ``sessions_stopped`` (the CLI's ``tenants disable`` prints the same)."""
    tenant = await state.tenants.disable(tenant_id)
    stopped = await state.sessions.stop_all(tenant.id, "tenant_disabled")
    return Response(content=disabled_view(tenant, stopped), status_code=200)


@post("/tenants/{tenant_id:str}/enable", status_code=200)
async def enable_tenant(state: State, tenant_id: FromPath[str]) -> Response[Any]:
    return _view(await state.tenants.enable(tenant_id))


class _KeyCreate(msgspec.Struct, forbid_unknown_fields=True):
    not_after: datetime | None = None


@post("/tenants/{tenant_id:str}/keys", status_code=201)
async def create_key(request: Request, state: State, tenant_id: FromPath[str]) -> Response[Any]:
    req, _ = await read_json(request, _KeyCreate, empty_ok=True)
    not_after = req.not_after
    if not_after is not None and not_after.tzinfo is None:
        not_after = not_after.replace(tzinfo=UTC)
    if not_after is not None:
        try:  # 9999-12-31T23:59:59-12:00 is past the last instant a datetime holds in UTC
            not_after = not_after.astimezone(UTC)
        except OverflowError:
            raise InvalidInput("not_after is outside the representable range of times", code="invalid_field",
                               field="not_after") from None
    created = await state.tenants.create_key(tenant_id, not_after=not_after)
    return Response(content=created, status_code=201)


@get("/tenants/{tenant_id:str}/keys")
async def list_keys(state: State, tenant_id: FromPath[str]) -> Response[Any]:
    return Response(content={"data": await state.tenants.list_keys(tenant_id)})


@delete("/tenants/{tenant_id:str}/keys/{key_id:str}", status_code=200)
async def revoke_key(state: State, tenant_id: FromPath[str], key_id: FromPath[str]) -> Response[Any]:
    """The key's record with ``revoked: true`` (the CLI's ``tenants keys revoke`` prints the same)."""
    return Response(content=revoked_view(await state.tenants.revoke_key(tenant_id, key_id)))


class _Rotate(msgspec.Struct, forbid_unknown_fields=True):
    overlap_seconds: int = 3600


@post("/tenants/{tenant_id:str}/keys/{key_id:str}/rotate", status_code=201)
async def rotate_key(request: Request, state: State, tenant_id: FromPath[str], key_id: FromPath[str]) -> Response[Any]:
    req, _ = await read_json(request, _Rotate, empty_ok=True)
    if not 0 <= req.overlap_seconds <= MAX_ROTATION_OVERLAP_SECONDS:
        raise InvalidInput(f"overlap_seconds must be 0..{MAX_ROTATION_OVERLAP_SECONDS}", code="invalid_overlap",
                           field="overlap_seconds")
    return Response(content=await state.tenants.rotate_key(tenant_id, key_id, req.overlap_seconds), status_code=201)


admin_router = Router(
    path="/admin/v1",
    route_handlers=[
        create_tenant, list_tenants, get_tenant, patch_tenant, disable_tenant, enable_tenant,
        create_key, list_keys, revoke_key, rotate_key,
    ],
    guards=[admin_guard],
    tags=["admin"],
)

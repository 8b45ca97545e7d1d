"""Usage history (issue 21): ``GET /v1/usage/history`` for a tenant, ``GET /admin/v1/usage``
across tenants (``tenants/usage_history.py``). ``GET /v1/usage`` itself (with the budgets)
stays in ``tenant_routes``."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, Router, get
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide

from tenants.models import Tenant
from tenants.usage_history import all_tenants_history, check_end_user, history, parse_range

from .deps import admin_guard, authenticate_tenant, provide_tenant


@get("/history")
async def usage_history(request: Request, state: State, tenant: NamedDependency[Tenant]) -> Response[Any]:
    q = request.query_params
    rng = parse_range(q.get("from"), q.get("to"), q.get("granularity"))
    end_user = q.get("end_user")
    check_end_user(end_user)
    return Response(content={"data": await history(state.redis, tenant.id, rng, end_user)}, status_code=200)


@get("/usage")
async def admin_usage(request: Request, state: State) -> Response[Any]:
    q = request.query_params
    rng = parse_range(q.get("from"), q.get("to"), q.get("granularity"))
    tenant_id = q.get("tenant_id")
    if tenant_id is not None:
        tenant_id = (await state.tenants.get(tenant_id)).id  # 404 for an unknown tenant
    return Response(content={"data": await all_tenants_history(state.redis, rng, tenant_id)}, status_code=200)


tenant_usage_router = Router(
    path="/v1/usage",
    route_handlers=[usage_history],
    dependencies={"tenant": Provide(provide_tenant)},
    before_request=authenticate_tenant,
    tags=["usage"],
)

admin_usage_router = Router(path="/admin/v1", route_handlers=[admin_usage], guards=[admin_guard], tags=["admin"])

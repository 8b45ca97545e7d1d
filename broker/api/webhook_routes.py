"""Webhook endpoints (contract section 11, issue 20): the tenant manages its endpoints, rotates
their secrets, sends a test event, reads the attempt log and resends an event. The repository
is ``broker/webhooks/endpoints.py`` (``app.state.webhooks``); the delivery itself runs in the
workers."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, Router, delete, get, patch, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath

from broker.core.errors import InvalidInput
from broker.webhooks.endpoints import EndpointCreate, EndpointPatch, WebhookEndpoints, is_endpoint_id
from broker.webhooks.queue import enqueue
from tenants.models import Tenant

from .body import read_json
from .deps import authenticate_tenant, provide_tenant
from .event_routes import parse_limit


class ResendRequest(msgspec.Struct, forbid_unknown_fields=True):
    endpoint_id: str | None = None


def _repo(state: State) -> WebhookEndpoints:
    repo: WebhookEndpoints = state.webhooks  # one per API process (app.py's lifespan)
    return repo


def _json(content: Any, status: int = 200) -> Response[Any]:
    return Response(content=msgspec.to_builtins(content), status_code=status)


@post("/webhook_endpoints", status_code=201)
async def create_endpoint(request: Request, state: State, tenant: NamedDependency[Tenant]) -> Response[Any]:
    req, _ = await read_json(request, EndpointCreate, empty_ok=False)
    return _json(await _repo(state).create(tenant.id, req), 201)


@get("/webhook_endpoints")
async def list_endpoints(state: State, tenant: NamedDependency[Tenant]) -> Response[Any]:
    return _json({"data": await _repo(state).list(tenant.id)})


@get("/webhook_endpoints/{endpoint_id:str}")
async def get_endpoint(state: State, tenant: NamedDependency[Tenant], endpoint_id: FromPath[str]) -> Response[Any]:
    return _json(await _repo(state).get(tenant.id, endpoint_id))


@patch("/webhook_endpoints/{endpoint_id:str}")
async def patch_endpoint(request: Request, state: State, tenant: NamedDependency[Tenant],
                         endpoint_id: FromPath[str]) -> Response[Any]:
    await _repo(state).fields(tenant.id, endpoint_id)  # 404 before judging the body of another tenant's id
    req, _ = await read_json(request, EndpointPatch, empty_ok=True)
    return _json(await _repo(state).update(tenant.id, endpoint_id, req))


@delete("/webhook_endpoints/{endpoint_id:str}", status_code=200)
async def delete_endpoint(state: State, tenant: NamedDependency[Tenant], endpoint_id: FromPath[str]) -> Response[Any]:
    return _json(await _repo(state).delete(tenant.id, endpoint_id))


@post("/webhook_endpoints/{endpoint_id:str}/rotate_secret", status_code=200)
async def rotate_secret(state: State, tenant: NamedDependency[Tenant], endpoint_id: FromPath[str]) -> Response[Any]:
    return _json(await _repo(state).rotate_secret(tenant.id, endpoint_id))


@post("/webhook_endpoints/{endpoint_id:str}/test", status_code=202)
async def test_endpoint(state: State, tenant: NamedDependency[Tenant], endpoint_id: FromPath[str]) -> Response[Any]:
    return _json(await _repo(state).ping(tenant.id, endpoint_id), 202)


@get("/webhook_endpoints/{endpoint_id:str}/attempts")
async def list_attempts(request: Request, state: State, tenant: NamedDependency[Tenant],
                        endpoint_id: FromPath[str]) -> Response[Any]:
    q = request.query_params
    limit = parse_limit(q.get("limit"))
    cursor = q.get("cursor") or None
    return _json(await _repo(state).attempts(tenant.id, endpoint_id, limit=limit, cursor=cursor))


@post("/events/{event_id:str}/resend", status_code=202)
async def resend_event(request: Request, state: State, tenant: NamedDependency[Tenant],
                       event_id: FromPath[str]) -> Response[Any]:
    """Queues one more delivery of the event to ``endpoint_id``, or by default to every enabled
    endpoint whose filter matches its type; answers the endpoints it was queued for."""
    req, _ = await read_json(request, ResendRequest, empty_ok=True)
    if req.endpoint_id is not None and not is_endpoint_id(req.endpoint_id):
        raise InvalidInput("endpoint_id must be a webhook endpoint id (we_...)", code="invalid_endpoint_id",
                           field="endpoint_id")
    plan = await _repo(state).resend_targets(tenant.id, event_id, req.endpoint_id)
    queued = [weid for weid in plan.endpoint_ids
              if await enqueue(state.redis, tenant.id, weid, plan.entry_id, plan.session_id or None)]
    return _json({"event_id": plan.event_id, "endpoint_ids": queued}, 202)


webhook_router = Router(
    path="/v1",
    route_handlers=[create_endpoint, list_endpoints, get_endpoint, patch_endpoint, delete_endpoint, rotate_secret,
                    test_endpoint, list_attempts, resend_event],
    dependencies={"tenant": Provide(provide_tenant)},
    before_request=authenticate_tenant,
    tags=["webhooks"],
)

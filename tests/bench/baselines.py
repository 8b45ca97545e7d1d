"""The two baselines of the benchmark, served exactly like the API (``broker.serve``: uvicorn,
uvloop, httptools, no access log), one process each::

    python -m tests.bench.baselines a --port P --redis-url URL --token T
    python -m tests.bench.baselines b --port P --redis-url URL --token T --openai URL --avaturn URL

A: the API floor of this machine - a bare Litestar endpoint with a bearer check and one
Redis GET. B: the seed's direct pattern - the same check, then mint and create inline in the
request (no queue, no state), with the worker's own upstream clients built once per process.
"""

from __future__ import annotations

import argparse
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Response, get, post
from litestar.datastructures import State

from broker.core.logs import configure_logging
from broker.core.redis_client import create_redis
from broker.serve import _config, run_async
from broker.core.settings import Settings

FLOOR_KEY = "bench:floor"
PLATFORM_OPENAI_KEY = "sk-bench-platform-key-0123456789"
PLATFORM_AVATURN_KEY = "avaturn-bench-platform-key-0123456789"
SESSION = {"type": "realtime", "model": "gpt-realtime", "instructions": "You are a benchmark avatar."}


def _authorized(request: Request, token: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def _unauthorized() -> Response[Any]:
    return Response({"error": {"code": "invalid_api_key", "message": "no"}}, status_code=401)


def app_a(redis_url: str, token: str) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.redis = create_redis(Settings(redis_url=redis_url))
        try:
            yield
        finally:
            await app.state.redis.aclose()

    @get("/floor")
    async def floor(request: Request, state: State) -> Response[Any]:
        if not _authorized(request, token):
            return _unauthorized()
        value = await state.redis.get(FLOOR_KEY)
        return Response({"ok": True, "value": value.decode() if value else None}, status_code=200)

    return Litestar(route_handlers=[floor], lifespan=[lifespan], debug=False, logging_config=None)


def app_b(redis_url: str, token: str, openai_url: str, avaturn_url: str) -> Litestar:
    from workers.upstreams.avaturn import AvaturnClient
    from workers.upstreams.openai import OpenAIMinter

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.redis = create_redis(Settings(redis_url=redis_url))
        app.state.minter = OpenAIMinter(openai_url, timeout=10)
        app.state.avaturn = AvaturnClient(avaturn_url, timeout=10)
        try:
            yield
        finally:
            await app.state.minter.aclose()
            await app.state.avaturn.aclose()
            await app.state.redis.aclose()

    @post("/sessions")
    async def create(request: Request, state: State) -> Response[Any]:
        if not _authorized(request, token):
            return _unauthorized()
        await state.redis.get(FLOOR_KEY)  # the tenant lookup of the direct pattern
        secret = await state.minter.mint(PLATFORM_OPENAI_KEY, SESSION, expires_seconds=600)
        created = await state.avaturn.create_session(
            PLATFORM_AVATURN_KEY, secret.value, avatar_id="jane_20240829", background="default",
            user_absent_timeout=60, max_duration=600,
        )
        return Response({"status": "ready", "avaturn": {"session_id": created.session_id, "token": created.token}},
                        status_code=201)

    return Litestar(route_handlers=[create], lifespan=[lifespan], debug=False, logging_config=None)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m tests.bench.baselines")
    p.add_argument("which", choices=("a", "b"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--openai", default="")
    p.add_argument("--avaturn", default="")
    args = p.parse_args(argv)
    settings = Settings.from_env()  # only for the log settings: logging exactly as the API's
    configure_logging(settings.log_format, settings.log_level)
    if args.which == "a":
        app = app_a(args.redis_url, args.token)
    else:
        app = app_b(args.redis_url, args.token, args.openai, args.avaturn)
    run_async(uvicorn.Server(_config(app, "127.0.0.1", args.port, settings)).serve())


if __name__ == "__main__":
    main()

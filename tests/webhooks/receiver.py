"""A webhook receiver for the tests: a real HTTP server on loopback (aiohttp.web) that verifies
every delivery with the ``standardwebhooks`` package and records it; each path is one endpoint
whose answers the test scripts (status, delay, headers)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    path: str
    webhook_id: str
    headers: dict[str, str]
    body: bytes
    event: dict[str, Any]
    status: int
    at: float
    verified_by: list[str] = field(default_factory=list)


Answer = tuple[int, float, dict[str, str]]  # status, delay (s), extra headers


class Receiver:
    def __init__(self) -> None:
        self.secrets: dict[str, list[str]] = {}       # path -> secrets that must each verify
        self.rules: dict[str, Callable[[Received, int], Answer]] = {}
        self.received: list[Received] = []
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self.unverified: list[tuple[str, str]] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def expect(self, path: str, *secrets: str, rule: Callable[[Received, int], Answer] | None = None) -> str:
        self.secrets[path] = list(secrets)
        if rule is not None:
            self.rules[path] = rule
        return self.url(path)

    def of(self, path: str, status: int | None = 200) -> list[Received]:
        return [r for r in self.received if r.path == path and (status is None or r.status == status)]

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        rec = Received(path, headers.get("webhook-id", ""), headers, body, {}, 0, time.time())
        for secret in self.secrets.get(path, []):
            try:
                rec.event = Webhook(secret).verify(body, headers)
                rec.verified_by.append(secret)
            except WebhookVerificationError as exc:
                self.unverified.append((path, str(exc)))
        if not rec.event:
            rec.event = json.loads(body) if body else {}
        nth = sum(1 for r in self.received if r.path == path and r.webhook_id == rec.webhook_id) + 1
        status, delay, extra = self.rules.get(path, lambda r, n: (200, 0.0, {}))(rec, nth)
        rec.status = status
        self.in_flight[path] = self.in_flight.get(path, 0) + 1
        self.max_in_flight[path] = max(self.max_in_flight.get(path, 0), self.in_flight[path])
        try:
            if delay:
                await asyncio.sleep(delay)
        finally:
            self.in_flight[path] -= 1
        self.received.append(rec)
        return web.Response(status=status, text="ok", headers=extra)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{path}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self.runner, sock).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

"""``session-broker tenants ...``: tenant administration straight against Redis (the same
services as the admin API). Output is JSON on stdout; errors are one line on stderr."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from .errors import BrokerError
from .redis_client import create_redis
from .settings import Settings


def add_tenant_commands(sub: Any) -> None:
    t = sub.add_parser("tenants", help="tenant administration against Redis")
    ts = t.add_subparsers(dest="tenants_command", required=True)
    c = ts.add_parser("create", help="create a tenant")
    c.add_argument("--name", required=True)
    c.add_argument("--quotas", help='JSON object, e.g. \'{"max_concurrent_sessions": 5}\'')
    c.add_argument("--openai-key", help="the tenant's OpenAI API key (else the platform key is used)")
    c.add_argument("--avaturn-key", help="the tenant's Avaturn API key (else the platform key is used)")
    c.add_argument("--json", dest="json_body", help="full create body as JSON (as POST /admin/v1/tenants)")
    ts.add_parser("list", help="list tenants")
    s = ts.add_parser("show", help="show one tenant")
    s.add_argument("tenant_id")
    u = ts.add_parser("update", help="patch a tenant with a JSON body (as PATCH /admin/v1/tenants/{id})")
    u.add_argument("tenant_id")
    u.add_argument("--json", dest="json_body", required=True)
    d = ts.add_parser("disable", help="refuse new sessions and terminate the active ones")
    d.add_argument("tenant_id")
    e = ts.add_parser("enable", help="re-enable a disabled tenant")
    e.add_argument("tenant_id")
    a = ts.add_parser("apply", help="create or update tenants from a JSON file (a list of tenant bodies)")
    a.add_argument("file")
    k = ts.add_parser("keys", help="API keys of a tenant")
    ks = k.add_subparsers(dest="keys_command", required=True)
    kc = ks.add_parser("create", help="create an API key (plaintext shown once)")
    kc.add_argument("tenant_id")
    kc.add_argument("--not-after", help="ISO 8601 time after which the key stops working")
    kl = ks.add_parser("list")
    kl.add_argument("tenant_id")
    kr = ks.add_parser("revoke")
    kr.add_argument("tenant_id")
    kr.add_argument("key_id")


@asynccontextmanager
async def _services(settings: Settings) -> AsyncIterator[tuple[Any, Any]]:
    from broker.sessions.jobs import JobQueue, new_arq_redis
    from broker.sessions.repository import SessionRepository
    from broker.sessions.service import SessionService
    from tenants.crypto import CredentialCipher
    from tenants.service import TenantService

    redis = create_redis(settings)
    try:
        cipher = CredentialCipher(settings.secret_keys) if settings.secret_keys else None
        sessions = SessionService(
            SessionRepository(redis), JobQueue(new_arq_redis(redis.connection_pool)),
            provision_deadline_s=settings.provision_deadline_seconds, cipher=cipher,
        )
        yield TenantService(redis, cipher), sessions
    finally:
        await redis.aclose()


def _out(obj: Any) -> None:
    print(json.dumps(msgspec.to_builtins(obj), indent=2))


def _view(tenant: Any) -> Any:
    from tenants.models import TenantView

    return TenantView.of(tenant)


async def _run(args: argparse.Namespace, settings: Settings) -> None:
    from tenants.service import decode_create, decode_patch

    async with _services(settings) as (tenants, sessions):
        cmd = args.tenants_command
        if cmd == "create":
            body: dict[str, Any] = json.loads(args.json_body) if args.json_body else {}
            body.setdefault("name", args.name)
            if args.quotas:
                body["quotas"] = json.loads(args.quotas)
            if args.openai_key:
                body.setdefault("openai", {})["api_key"] = args.openai_key
            if args.avaturn_key:
                body.setdefault("avaturn", {})["api_key"] = args.avaturn_key
            _out(_view(await tenants.create(decode_create(body))))
        elif cmd == "list":
            out, cursor = [], None
            while True:
                page, cursor = await tenants.list(limit=100, cursor=cursor)
                out += [_view(t) for t in page]
                if not cursor:
                    break
            _out(out)
        elif cmd == "show":
            _out(_view(await tenants.get(args.tenant_id)))
        elif cmd == "update":
            tenant = await tenants.update(args.tenant_id, decode_patch(json.loads(args.json_body)))
            if not tenant.active:
                await sessions.stop_all(tenant.id, "tenant_disabled")
            _out(_view(tenant))
        elif cmd == "disable":
            tenant = await tenants.disable(args.tenant_id)
            stopped = await sessions.stop_all(tenant.id, "tenant_disabled")
            _out({"tenant": _view(tenant), "sessions_stopped": stopped})
        elif cmd == "enable":
            _out(_view(await tenants.enable(args.tenant_id)))
        elif cmd == "apply":
            _out(await _apply(tenants, Path(args.file)))
        elif cmd == "keys":
            if args.keys_command == "create":
                not_after = datetime.fromisoformat(args.not_after) if args.not_after else None
                _out(await tenants.create_key(args.tenant_id, not_after=not_after))
            elif args.keys_command == "list":
                _out(await tenants.list_keys(args.tenant_id))
            else:
                _out(await tenants.revoke_key(args.tenant_id, args.key_id))


async def _apply(tenants: Any, path: Path) -> list[dict[str, Any]]:
    """Each entry: a create body; matched to an existing tenant by ``id`` or ``name``
    (then patched), else created."""
    from tenants.service import decode_create, decode_patch

    entries = json.loads(path.read_text())
    if isinstance(entries, dict):
        entries = [entries]
    existing: dict[str, Any] = {}
    cursor = None
    while True:
        page, cursor = await tenants.list(limit=100, cursor=cursor)
        existing.update({t.name: t for t in page})
        if not cursor:
            break
    results = []
    for entry in entries:
        tid = entry.pop("id", None) or (existing[entry["name"]].id if entry.get("name") in existing else None)
        if tid:
            tenant = await tenants.update(tid, decode_patch(entry))
            results.append({"action": "updated", "tenant": msgspec.to_builtins(_view(tenant))})
        else:
            tenant = await tenants.create(decode_create(entry))
            results.append({"action": "created", "tenant": msgspec.to_builtins(_view(tenant))})
    return results


def run_tenant_command(args: argparse.Namespace, settings: Settings) -> int:
    try:
        asyncio.run(_run(args, settings))
    except BrokerError as exc:
        field = f" ({exc.field})" if exc.field else ""
        print(f"session-broker: {exc.code}: {exc.message}{field}", file=sys.stderr)
        return 1
    except (json.JSONDecodeError, ValueError, OSError) as exc:
        print(f"session-broker: {exc}", file=sys.stderr)
        return 1
    return 0


def rotate_secrets(settings: Settings) -> int:
    """``session-broker secrets rotate``: every tenant record is checked before any is written.
    One line per tenant on stdout, ``<outcome> <tenant id> <records>`` with outcome ``rotated``,
    ``unchanged``, ``cannot-decrypt`` (the records no configured key opens) or ``rotatable``
    (the run was refused, so not written), then a summary. Exit code: 0 done (every credential
    is now under the first key), 1 nothing was written because some credential cannot be
    decrypted (the lines say which), 2 another error (Redis, settings)."""
    from tenants.service import RotationReport

    async def run() -> RotationReport:
        async with _services(settings) as (tenants, _):
            report: RotationReport = await tenants.rotate_all()
            return report

    try:
        report = asyncio.run(run())
    except BrokerError as exc:
        print(f"session-broker: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except (OSError, ConnectionError) as exc:
        print(f"session-broker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    for line in report.lines:
        print(f"{line.outcome:<14} {line.tenant_id} {', '.join(line.records)}".rstrip())
    if report.refused:
        print(f"session-broker: credentials of {len(report.refused)} tenant(s) cannot be decrypted with any "
              "configured BROKER_SECRET_KEY (add the key that encrypted them to the list): nothing was "
              "re-encrypted", file=sys.stderr)
        return 1
    rotated = sum(1 for line in report.lines if line.outcome == "rotated")
    print(f"re-encrypted credentials of {rotated} tenant(s); {len(report.lines) - rotated} unchanged")
    return 0

"""``session-broker tenants ...``: tenant administration straight against Redis (the same
services as the admin API). Output is JSON on stdout; errors are one line on stderr."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from .core.errors import BrokerError
from .core.redis_client import create_redis
from .core.settings import Settings


def add_tenant_commands(sub: Any) -> None:
    t = sub.add_parser("tenants", help="tenant administration against Redis",
                       description="Tenant administration straight against Redis (BROKER_REDIS_URL; "
                       "BROKER_SECRET_KEY encrypts credentials). For `make dev`'s instance: "
                       "set -a; . .dev/env; set +a")
    ts = t.add_subparsers(dest="tenants_command", required=True, metavar="COMMAND")
    c = ts.add_parser("create", help="create a tenant (names are unique)")
    c.add_argument("--name", required=True, help="the tenant's name, unique in the deployment")
    c.add_argument("--quotas", help='JSON object, e.g. \'{"max_concurrent_sessions": 5}\'')
    c.add_argument("--openai-key", help="the tenant's OpenAI API key (else the platform key is used)")
    c.add_argument("--avaturn-key", help="the tenant's Avaturn API key (else the platform key is used)")
    c.add_argument("--json", dest="json_body", help="full create body as JSON (as POST /admin/v1/tenants)")
    ts.add_parser("list", help="list tenants")
    s = ts.add_parser("show", help="show one tenant")
    s.add_argument("tenant_id")
    u = ts.add_parser("update", help="patch a tenant with a JSON body (as PATCH /admin/v1/tenants/{id})")
    u.add_argument("tenant_id")
    u.add_argument("--json", dest="json_body", required=True, help="the patch, e.g. '{\"quotas\": {...}}'")
    d = ts.add_parser("disable", help="refuse new sessions and terminate the active ones "
                      "(prints the tenant with sessions_stopped)")
    d.add_argument("tenant_id")
    e = ts.add_parser("enable", help="re-enable a disabled tenant")
    e.add_argument("tenant_id")
    a = ts.add_parser("apply", help="create or update tenants from a JSON file (a list of tenant bodies)",
                      description="Each entry is a create body (as POST /admin/v1/tenants), matched to an "
                      "existing tenant by `id`, else by `name`: matched ones are patched, others created. "
                      "Every entry is checked before anything is written; the output says, per entry, "
                      "created / updated / unchanged.")
    a.add_argument("file")
    k = ts.add_parser("keys", help="API keys of a tenant (create, list, revoke)")
    ks = k.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    kc = ks.add_parser("create", help="create an API key (plaintext shown once)")
    kc.add_argument("tenant_id")
    kc.add_argument("--not-after", help="ISO 8601 time after which the key stops working "
                    "(e.g. 2027-01-31T00:00:00Z; no zone: UTC)")
    kl = ks.add_parser("list", help="list a tenant's keys (prefix, created, last used, revoked; never the key)")
    kl.add_argument("tenant_id")
    kr = ks.add_parser("revoke", help="revoke a key (refused by every API process within 1 s); "
                       "prints the key's record with revoked: true")
    kr.add_argument("tenant_id")
    kr.add_argument("key_id")


class FlagError(ValueError):
    """A command-line value is malformed; the message names the flag."""


def _json_flag(flag: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FlagError(f"{flag} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def _json_object_flag(flag: str, text: str) -> dict[str, Any]:
    value = _json_flag(flag, text)
    if not isinstance(value, dict):
        raise FlagError(f"{flag} must be a JSON object")
    return value


def _time_flag(flag: str, text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise FlagError(f"{flag} must be an ISO 8601 time such as 2027-01-31T00:00:00Z, got {text[:40]!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


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
            body = _json_object_flag("--json", args.json_body) if args.json_body else {}
            body.setdefault("name", args.name)
            if args.quotas:
                body["quotas"] = _json_object_flag("--quotas", args.quotas)
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
            tenant = await tenants.update(args.tenant_id, decode_patch(_json_object_flag("--json", args.json_body)))
            if not tenant.active:
                await sessions.stop_all(tenant.id, "tenant_disabled")
            _out(_view(tenant))
        elif cmd == "disable":
            from tenants.models import disabled_view

            tenant = await tenants.disable(args.tenant_id)
            _out(disabled_view(tenant, await sessions.stop_all(tenant.id, "tenant_disabled")))
        elif cmd == "enable":
            _out(_view(await tenants.enable(args.tenant_id)))
        elif cmd == "apply":
            _out(await _apply(tenants, sessions, Path(args.file)))
        elif cmd == "keys":
            if args.keys_command == "create":
                not_after = _time_flag("--not-after", args.not_after) if args.not_after else None
                _out(await tenants.create_key(args.tenant_id, not_after=not_after))
            elif args.keys_command == "list":
                _out(await tenants.list_keys(args.tenant_id))
            else:
                from tenants.models import revoked_view

                _out(revoked_view(await tenants.revoke_key(args.tenant_id, args.key_id)))


async def _apply(tenants: Any, sessions: Any, path: Path) -> list[dict[str, Any]]:
    """tenants/apply.py; a tenant the file disables has its active sessions stopped, as ``update``."""
    from tenants.apply import apply

    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FlagError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    results = await apply(tenants, entries)
    for result in results:
        if result["action"] == "updated" and result["tenant"]["status"] == "disabled":
            await sessions.stop_all(result["tenant"]["id"], "tenant_disabled")
    return results


def run_tenant_command(args: argparse.Namespace, settings: Settings) -> int:
    from .core.redis_check import UNREACHABLE_ERRORS, unreachable_line

    try:
        asyncio.run(_run(args, settings))
    except BrokerError as exc:
        field = f" ({exc.field})" if exc.field else ""
        print(f"session-broker: {exc.code}: {exc.message}{field}", file=sys.stderr)
        return 1
    except FlagError as exc:
        print(f"session-broker: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # e.g. a Sentinel set-up with a unix:// BROKER_REDIS_URL
        print(f"session-broker: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # stdout closed early (`... | head`): Redis errors never surface as this
        return 1
    except UNREACHABLE_ERRORS as exc:  # OSError included: a file apply cannot read says so below
        if isinstance(exc, OSError) and exc.filename is not None:
            print(f"session-broker: {exc.filename}: {exc.strerror}", file=sys.stderr)
        else:
            print(f"session-broker: {unreachable_line(settings, exc)}", file=sys.stderr)
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

"""``session-broker usage export``: per-tenant usage per UTC day (sessions admitted, billable
seconds) straight from Redis, as CSV or NDJSON on stdout, for billing (issue 21; the same
rows as ``GET /admin/v1/usage``)."""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
from typing import Any

import msgspec

from .core.errors import BrokerError
from .core.redis_client import create_redis
from .core.settings import Settings

COLUMNS = ("tenant_id", "start", "sessions", "billable_seconds")


def add_usage_commands(sub: Any) -> None:
    u = sub.add_parser("usage", help="usage history for billing (BROKER_REDIS_URL)")
    us = u.add_subparsers(dest="usage_command", required=True, metavar="COMMAND")
    e = us.add_parser("export", help="per-tenant sessions and billable seconds per UTC day (CSV or NDJSON)")
    e.add_argument("--from", dest="date_from", required=True, help="first UTC day, YYYY-MM-DD")
    e.add_argument("--to", dest="date_to", required=True, help="last UTC day, YYYY-MM-DD (inclusive; <= 400 days)")
    e.add_argument("--tenant", default=None, help="only this tenant id (default: every tenant)")
    e.add_argument("--format", choices=("csv", "ndjson"), default="csv", help="output format")


async def export(settings: Settings, args: argparse.Namespace, out: Any) -> int:
    from tenants.scope import tenant_record
    from tenants.usage_history import all_tenants_history, parse_range

    rng = parse_range(args.date_from, args.date_to, "day")
    redis = create_redis(settings)
    try:
        if args.tenant is not None and not await redis.exists(tenant_record(args.tenant)):
            print(f"session-broker: tenant_not_found: no tenant {args.tenant}", file=sys.stderr)
            return 1
        rows = await all_tenants_history(redis, rng, args.tenant)
    finally:
        await redis.aclose()
    if args.format == "ndjson":
        for row in rows:
            out.write(msgspec.json.encode(row).decode() + "\n")
    else:
        w = csv.writer(out, lineterminator="\n")
        w.writerow(COLUMNS)
        for row in rows:
            w.writerow([row.tenant_id, row.start, row.sessions, row.billable_seconds])
    return 0


def run_usage_command(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return asyncio.run(export(settings, args, sys.stdout))
    except BrokerError as exc:
        print(f"session-broker: {exc.code}: {exc.message}", file=sys.stderr)
        return 2

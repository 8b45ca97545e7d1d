"""``session-broker``: the one console script, and the only place that knows every process."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from .settings import Settings, SettingsError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="session-broker", description="Multi-tenant live avatar session broker.")
    p.add_argument("--log-format", choices=("json", "console"), default=None, help="log format (default: json)")
    sub = p.add_subparsers(dest="command", required=True)

    api = sub.add_parser("api", help="run the HTTP API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--admin-port", type=int, default=None,
                     help="serve the admin API on this port only (not on --port)")

    worker = sub.add_parser("worker", help="run one arq worker process")
    worker.add_argument("--metrics-port", type=int, default=None)
    worker.add_argument("--metrics-host", default="0.0.0.0")

    sandbox = sub.add_parser("sandbox", help="fake OpenAI + Avaturn upstreams on loopback")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8100)

    dev = sub.add_parser("dev", help="everything on one machine, with a demo tenant")
    dev.add_argument("--port", type=int, default=8000)
    dev.add_argument("--sandbox-port", type=int, default=8100)
    dev.add_argument("--metrics-port", type=int, default=9100)
    dev.add_argument("--data-dir", default=".dev")

    secrets_ = sub.add_parser("secrets", help="BROKER_SECRET_KEY helpers")
    ssub = secrets_.add_subparsers(dest="secrets_command", required=True)
    ssub.add_parser("generate", help="print a new key for BROKER_SECRET_KEY")
    ssub.add_parser("rotate", help="re-encrypt every tenant credential with the first BROKER_SECRET_KEY key")

    from .cli_tenants import add_tenant_commands

    add_tenant_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"session-broker: {exc}", file=sys.stderr)
        return 2
    from .logs import configure_logging

    configure_logging(args.log_format or settings.log_format, settings.log_level, settings.library_log_level)
    try:
        return _dispatch(args, settings)
    except SettingsError as exc:
        print(f"session-broker: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    cmd = args.command
    if cmd == "api":
        settings.require_secret_key()
        from . import tracing
        from .serve import serve_api

        tracing.configure(settings, "session-broker-api")

        serve_api(settings, args.host, args.port, admin_port=args.admin_port)
        return 0
    if cmd == "worker":
        settings.require_secret_key()
        from workers.main import run_worker

        from . import tracing
        from .serve import run_async

        tracing.configure(settings, "session-broker-worker")

        run_async(run_worker(settings, args.metrics_port, args.metrics_host))
        return 0
    if cmd == "sandbox":
        from workers.sandbox import run_sandbox

        run_sandbox(args.host, args.port)
        return 0
    if cmd == "dev":
        from .dev import run_dev

        return run_dev(args)
    if cmd == "secrets":
        from tenants.crypto import generate_secret_key

        if args.secrets_command == "generate":
            print(generate_secret_key())
            return 0
        settings.require_secret_key()
        from .cli_tenants import rotate_secrets
        from .errors import BrokerError

        try:
            count = asyncio.run(rotate_secrets(settings))
        except BrokerError as exc:
            print(f"session-broker: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        print(f"re-encrypted credentials of {count} tenant(s)")
        return 0
    from .cli_tenants import run_tenant_command

    return run_tenant_command(args, settings)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

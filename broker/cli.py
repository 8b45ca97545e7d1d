"""``session-broker``: the one console script, and the only place that knows every process."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .core.settings import Settings, SettingsError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every option's help (none shown for an option off by default); the
    description and epilog (the environment variables) kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


_ENV_COMMON = """\
environment (read once at start; a malformed value stops the process with one line):
  BROKER_REDIS_URL          Redis for queue and state (default: redis://127.0.0.1:6379/0)
  BROKER_REDIS_SENTINELS    host:port,... of Redis Sentinels (then BROKER_REDIS_URL gives only
                            credentials, db, TLS); BROKER_REDIS_SENTINEL_SERVICE (default: mymaster)
  BROKER_SECRET_KEY         key(s) encrypting tenant credentials (required; `session-broker secrets generate`)
  BROKER_OPENAI_BASE_URL    default: https://api.openai.com/v1
  BROKER_AVATURN_BASE_URL   default: https://api.avaturn.live/api/v1
  BROKER_OPENAI_API_KEY, BROKER_AVATURN_API_KEY   platform credentials for tenants that bring none
  BROKER_LOG_FORMAT (json|console, default: json), BROKER_LOG_LEVEL (default: INFO),
  BROKER_LIBRARY_LOG_LEVEL (default: WARNING)
"""
_ENV_API = _ENV_COMMON + """\
  BROKER_ADMIN_TOKEN        Bearer token of /admin/v1 (default: none, the admin API is off)
  BROKER_ACCESS_LOG         all|errors|off (default: all)
  BROKER_METRICS_TOP_TENANTS   tenants with their own metric series (default: 20)
  BROKER_HTTP_MAX_HEADER_BYTES (default: 16384), BROKER_HTTP_HEADER_TIMEOUT_SECONDS (default: 10),
  BROKER_HTTP_BODY_TIMEOUT_SECONDS (default: 30)   limits of each connection (431 / dropped)
"""
_ENV_WORKER = _ENV_COMMON + """\
  BROKER_WORKER_MAX_JOBS    jobs run at once (default: 500)
  BROKER_PROVISION_DEADLINE_SECONDS (default: 60), BROKER_UPSTREAM_TIMEOUT_SECONDS (default: 10)
With Redis unreachable at start the worker waits for it, logging one line every 10 s.
"""
_ENV_DEV = """\
environment:
  BROKER_REDIS_URL          use this Redis (default: unset, an embedded redis-server keeps its AOF in
                            DATA_DIR/redis)
  BROKER_SECRET_KEY         default: generated once into DATA_DIR/secret_key
  BROKER_OPENAI_API_KEY, BROKER_AVATURN_API_KEY   default: sandbox values (the upstreams are the sandbox)
  BROKER_LOG_FORMAT         default here: console
While it runs, DATA_DIR/env holds the BROKER_* settings of this instance, so that in another
shell `set -a; . .dev/env; set +a` makes `session-broker tenants ...` work against it.
One instance per DATA_DIR (a lock); Ctrl-C stops everything (Redis last).
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="session-broker", description="Multi-tenant live avatar session broker.")
    p.add_argument("--log-format", choices=("json", "console"), default=None,
                   help="log format (default: BROKER_LOG_FORMAT, else json; `dev`: console)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    api = sub.add_parser("api", help="run the HTTP API", description="The HTTP API: tenant API, admin API,\n"
                         "/healthz, /readyz, OpenAPI under /schema; /metrics on --metrics-port only.",
                         formatter_class=_HelpFormatter, epilog=_ENV_API)
    api.add_argument("--host", default="127.0.0.1", help="address to listen on")
    api.add_argument("--port", type=int, default=8000, help="port to listen on")
    api.add_argument("--admin-port", type=int, default=None,
                     help="serve the admin API on this port only (not on --port)")
    api.add_argument("--metrics-port", type=int, default=None,
                     help="serve /metrics (and /healthz) on this port; never on --port")
    api.add_argument("--metrics-host", default=None, help="address of --metrics-port (default: --host)")

    worker = sub.add_parser("worker", help="run one arq worker process", formatter_class=_HelpFormatter,
                            description="One worker process (run several).", epilog=_ENV_WORKER)
    worker.add_argument("--metrics-port", type=int, default=None, help="serve /metrics and /healthz on this port")
    worker.add_argument("--metrics-host", default="0.0.0.0", help="address of the metrics port")

    sandbox = sub.add_parser("sandbox", help="fake OpenAI + Avaturn upstreams on loopback",
                             formatter_class=_HelpFormatter)
    sandbox.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sandbox.add_argument("--port", type=int, default=8100, help="port to listen on")

    dev = sub.add_parser("dev", help="everything on one machine, with a demo tenant", formatter_class=_HelpFormatter,
                         description="Redis (embedded unless BROKER_REDIS_URL is set), the sandbox upstreams,\n"
                         "one API and one worker; a demo tenant and a curl line.", epilog=_ENV_DEV)
    dev.add_argument("--port", type=int, default=8000, help="API port")
    dev.add_argument("--sandbox-port", type=int, default=8100, help="sandbox upstreams port")
    dev.add_argument("--metrics-port", type=int, default=9100, help="worker metrics port")
    dev.add_argument("--api-metrics-port", type=int, default=9101, help="API metrics port (its /metrics)")
    dev.add_argument("--data-dir", default=".dev", help="state: Redis AOF, secret key, admin token, env, lock")

    secrets_ = sub.add_parser("secrets", help="BROKER_SECRET_KEY helpers")
    ssub = secrets_.add_subparsers(dest="secrets_command", required=True)
    ssub.add_parser("generate", help="print a new key for BROKER_SECRET_KEY")
    ssub.add_parser(
        "rotate", help="re-encrypt every tenant credential with the first BROKER_SECRET_KEY key: all or "
        "nothing, one line per tenant; exit 0 done, 1 nothing written (a credential no key decrypts), 2 error",
    )

    from .cli_tenants import add_tenant_commands

    add_tenant_commands(sub)
    from .cli_usage import add_usage_commands

    add_usage_commands(sub)  # session-broker usage export (issue 21)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"session-broker: {exc}", file=sys.stderr)
        return 2
    from .core.logs import configure_logging

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
        from .core import tracing
        from .serve import serve_api

        tracing.configure(settings, "session-broker-api")

        serve_api(settings, args.host, args.port, admin_port=args.admin_port, metrics_port=args.metrics_port,
                  metrics_host=args.metrics_host)
        return 0
    if cmd == "worker":
        settings.require_secret_key()
        from workers.main import run_worker

        from .core import tracing
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

        return rotate_secrets(settings)
    if cmd == "usage":
        from .cli_usage import run_usage_command

        return run_usage_command(args, settings)
    from .cli_tenants import run_tenant_command

    return run_tenant_command(args, settings)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

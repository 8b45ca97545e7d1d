"""Run in a child process by test_tracing_off.py: the API and a worker of this process (threads,
tests/fixtures/stack.py) serve sessions from creation to termination with the environment's
settings (no OTEL_* variable), then print which OpenTelemetry modules this process imported and
how many spans and context attachments OpenTelemetry's API made meanwhile (Litestar imports the
API and its plugin module whenever they are installed, to look for the plugin in an app's config)."""

from __future__ import annotations

import json
import sys

from broker.core import tracing
from broker.core.settings import Settings
from tests.fixtures.stack import Admin, ApiServer, WorkerThread, tenant_client, wait_status


def _count_spans_and_attachments() -> dict[str, int]:
    """Counts every span object of OpenTelemetry's API (the SDK must not be imported at all) and
    every context attachment (what starting a current span does)."""
    from opentelemetry import context, trace

    counts = {"spans": 0, "attach": 0}
    init, attach = trace.NonRecordingSpan.__init__, context.attach

    def counting_init(self: object, *args: object, **kwargs: object) -> None:
        counts["spans"] += 1
        init(self, *args, **kwargs)  # type: ignore[arg-type]

    def counting_attach(ctx: object) -> object:
        counts["attach"] += 1
        return attach(ctx)  # type: ignore[arg-type]

    trace.NonRecordingSpan.__init__ = counting_init  # type: ignore[method-assign]
    context.attach = counting_attach  # type: ignore[assignment]
    return counts


def main() -> None:
    counts = _count_spans_and_attachments()
    settings = Settings.from_env()
    assert not tracing.configure(settings, "probe")
    api = ApiServer(settings).start()
    worker = WorkerThread(settings).start()
    admin = Admin(api.url)
    try:
        _, key = admin.tenant("probe")
        with tenant_client(api.url, key) as client:
            ids = []
            for _ in range(3):
                r = client.post("/v1/sessions", json={"ttl_seconds": 600})
                assert r.status_code == 202, r.text
                assert "traceresponse" not in r.headers
                ids.append(r.json()["id"])
            for sid in ids:
                wait_status(client, sid, {"ready"})
                assert client.delete(f"/v1/sessions/{sid}").status_code in (200, 202)
            for sid in ids:
                wait_status(client, sid, {"terminated"})
    finally:
        admin.close()
        worker.stop()
        api.stop()
    print(json.dumps({"modules": sorted(m for m in sys.modules if "opentelemetry" in m), **counts}))


if __name__ == "__main__":
    main()

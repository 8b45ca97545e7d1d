"""Ways to run the sandbox: blocking (the CLI), in a background thread, or as a subprocess.

All three serve both upstream fakes on one loopback port under uvicorn (uvloop + httptools,
no access log). ``SandboxServer`` and ``SandboxProcess`` share the sync control helpers
(``audit()``, ``configure()``, ``reset()``, ``advance_clock()``, the webhook receivers') which are plain HTTP calls
to ``/_sandbox/...``.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import uvicorn
from uvicorn.config import LOGGING_CONFIG

from broker.core.processes import free_port, stop_process
from workers.sandbox.app import SandboxApp

LOOPBACK = "127.0.0.1"


def _config(app: SandboxApp, host: str, port: int, *, log_config: bool) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        log_config=LOGGING_CONFIG if log_config else None,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=1,
        backlog=4096,
    )


def run_sandbox(host: str, port: int) -> None:
    """Serve the sandbox until interrupted (``session-broker sandbox --port P``)."""
    uvicorn.Server(_config(SandboxApp(), host, port, log_config=True)).run()


class SandboxControl:
    """URLs of a running sandbox and sync helpers for its control API."""

    base_url: str
    _control: httpx.Client | None = None

    @property
    def openai_base_url(self) -> str:
        return self.base_url + "/v1"

    @property
    def avaturn_base_url(self) -> str:
        return self.base_url + "/api/v1"

    def _client(self) -> httpx.Client:
        # One keep-alive client; plain-HTTP loopback only, so no CA bundle to load (60 ms each).
        if self._control is None:
            self._control = httpx.Client(timeout=30.0, verify=False)
        return self._control

    def _close_control(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None

    def _call(self, method: str, path: str, json: Any = None) -> Any:
        response = self._client().request(method, self.base_url + "/_sandbox/" + path, json=json)
        if response.status_code != 200:
            raise RuntimeError(f"sandbox {method} {path} answered {response.status_code}: {response.text}")
        return response.json()

    def audit(self, summary: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "audit?summary=1" if summary else "audit")
        return result

    def configure(self, config: dict[str, Any]) -> dict[str, Any]:
        """Replace the fault/latency config (see ``workers.sandbox.faults``)."""
        result: dict[str, Any] = self._call("PUT", "config", config)
        return result

    def reset(self) -> None:
        self._call("POST", "reset")

    def advance_clock(self, seconds: float) -> float:
        """Move the sandbox clock forward; returns its new ``now`` (unix seconds)."""
        result: dict[str, Any] = self._call("POST", "clock", {"advance": seconds})
        return float(result["now"])

    def webhook_url(self, name: str) -> str:
        """The URL of the webhook receiver ``name`` (see ``workers.sandbox.webhooks``)."""
        return f"{self.base_url}/_sandbox/webhooks/{name}"

    def configure_webhooks(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        """Register or replace the receiver's secrets and behaviour (the whole config)."""
        result: dict[str, Any] = self._call("PUT", f"webhooks/{name}/config", config)
        return result

    def webhook_deliveries(self, name: str, after: int = 0) -> list[dict[str, Any]]:
        """Every delivery the receiver recorded after ``seq`` ``after``, oldest first."""
        out: list[dict[str, Any]] = []
        while True:
            page = self._call("GET", f"webhooks/{name}?after={after}&limit=10000")
            out.extend(page["deliveries"])
            after = page["next_after"]
            if not page["has_more"]:
                return out

    def healthy(self) -> bool:
        try:
            return self._client().get(self.base_url + "/_sandbox/healthz", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False


class SandboxServer(SandboxControl):
    """The sandbox in a background thread with its own event loop, on a free loopback port.

    The listening socket is bound before the thread starts, so there is no port race.
    """

    def __init__(self, host: str = LOOPBACK, port: int = 0) -> None:
        self.app = SandboxApp()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = host, int(self._sock.getsockname()[1])
        self.base_url = f"http://{host}:{self.port}"
        self._server = uvicorn.Server(_config(self.app, host, self.port, log_config=False))
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> SandboxServer:
        self._thread = threading.Thread(target=self._run, name=f"sandbox-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"sandbox did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def _run(self) -> None:
        self._server.run(sockets=[self._sock])

    def stop(self) -> None:
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._thread = None
        self._sock.close()
        self._close_control()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SandboxProcess(SandboxControl):
    """The sandbox as a child process (``python -m workers.sandbox --port P``)."""

    def __init__(self, host: str = LOOPBACK, port: int | None = None) -> None:
        self.host, self.port = host, port or free_port()
        self.base_url = f"http://{host}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> SandboxProcess:
        cmd = [sys.executable, "-m", "workers.sandbox", "--host", self.host, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sandbox process did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._close_control()
        if self.proc is None:
            return
        stop_process(self.proc, 10)
        self.proc = None

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers.sandbox", description="Sandbox OpenAI + Avaturn")
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        run_sandbox(args.host, args.port)


__all__ = ["SandboxControl", "SandboxProcess", "SandboxServer", "main", "run_sandbox"]

"""Sandbox upstreams: a loopback HTTP server that behaves like OpenAI's client-secret endpoint
and Avaturn's sessions API (wire formats in /work/shared/UPSTREAMS.md), with an audit trail,
latency and failure injection under ``/_sandbox/``.

``run_sandbox(host, port)`` blocks (the CLI); ``SandboxServer`` runs it in a thread and
``SandboxProcess`` as a child process, both with sync control helpers.
"""

from workers.sandbox.app import SandboxApp
from workers.sandbox.server import SandboxControl, SandboxProcess, SandboxServer, run_sandbox
from workers.sandbox.state import fingerprint

__all__ = ["SandboxApp", "SandboxControl", "SandboxProcess", "SandboxServer", "fingerprint", "run_sandbox"]

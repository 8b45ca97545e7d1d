"""broker/core/processes.py: the one "terminate, wait, kill" of a child process."""

from __future__ import annotations

import signal
import subprocess
import sys

from broker.core.processes import stop_process

_IGNORES_SIGTERM = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                    "print('ready', flush=True); time.sleep(60)")


def test_a_child_that_exits_on_sigterm_gets_no_sigkill() -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
                          stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        stop_process(proc, 10)
        assert proc.returncode == -signal.SIGTERM
        stop_process(proc, 10)  # already gone: nothing to do, no error


def test_a_child_that_ignores_sigterm_is_killed_after_the_timeout() -> None:
    with subprocess.Popen([sys.executable, "-c", _IGNORES_SIGTERM], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        stop_process(proc, 0.3, 10)
        assert proc.returncode == -signal.SIGKILL

"""The session scripts, composed with the shared Lua functions of ``lib.lua`` (status changes
with their live-status counts, the provisioning schedule and its ring of tenants), so every
script that makes one of those changes makes it the same way."""

from __future__ import annotations

from importlib import resources

from .terminal import with_terminal_drop

_FILES = resources.files(__package__)
# TERMINAL_DROP (terminal.py) first: every script that records a terminal status drops those fields
LIB = with_terminal_drop(_FILES.joinpath("lib.lua").read_text())


def script(name: str, package: str | None = None) -> str:
    """The Lua file ``name`` (of this package, or of ``package``) with ``lib.lua`` before it."""
    files = _FILES if package is None else resources.files(package)
    return LIB + "\n" + files.joinpath(name).read_text()

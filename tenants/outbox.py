"""The event outbox's Lua (``outbox.lua``): ``append_event(session_key, type)``, prepended to
every script that changes a session's state (the admission here, the session scripts of
``broker/sessions`` through ``terminal.py``), so a state change and its event are one atomic
step. Reading and rendering the events: ``broker/sessions/outbox.py``."""

from __future__ import annotations

from importlib import resources

_SOURCE = resources.files(__package__).joinpath("outbox.lua").read_text()

EVENT_RETENTION_SECONDS = 7 * 86400


def lua_functions() -> str:
    """The Lua function ``append_event`` (and its constants), to prepend to a script."""
    return _SOURCE

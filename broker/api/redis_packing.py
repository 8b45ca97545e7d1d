"""Command packing in C for the API's Redis connections.

redis-py's asyncio ``Connection.pack_command`` is pure Python: ~1 us per argument, and the
admission script takes about 50 (keys, quotas, the session fields, the job), so packing cost
more API CPU than the round trip itself (profiled: a quarter of a ``POST /v1/sessions``). Its
synchronous client already packs with hiredis when it is installed; this gives the asyncio
connections of one client the same, by swapping the pool's connection class for a subclass
of whatever class it uses (TCP, TLS, unix socket, Sentinel-managed)."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

try:
    import hiredis
except ImportError:  # pragma: no cover - hiredis is a dependency; without it nothing changes
    hiredis = None


class _HiredisPacking:
    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str):  # "SCRIPT LOAD" and the like: literal words go separately
            args = (*first.encode().split(), *args[1:])
        elif b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # a memoryview (or None, a bool: redis-py's own DataError)
            return super().pack_command(*args)  # type: ignore[misc, no-any-return]


def use_hiredis_packing(client: aioredis.Redis) -> bool:
    """Make every connection ``client``'s pool opens from now on pack commands with hiredis."""
    if hiredis is None:
        return False
    pool = client.connection_pool
    base = pool.connection_class
    if not issubclass(base, _HiredisPacking):
        pool.connection_class = type(f"Hiredis{base.__name__}", (_HiredisPacking, base), {})
    return True

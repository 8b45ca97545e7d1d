"""A bounded tenant label for metrics, shared by the API's and the workers' metrics: at most N
named tenants, the rest ``other``."""

from __future__ import annotations

import threading
from collections.abc import Callable

OTHER = "other"
PROMOTE_FACTOR = 2     # an unnamed tenant takes a named slot once it has 2x the smallest named count
PROMOTE_MIN = 10       # ... and at least this many events (no churn on tiny numbers)


class TenantLabels:
    """Maps a tenant id to a bounded label value.

    At most ``top_n`` tenants are named at any time; every other tenant is ``other``. Slots
    go to the first tenants seen; an unnamed tenant whose event count (since process start)
    grows past ``PROMOTE_FACTOR`` times the smallest named tenant's count takes that slot,
    and the demoted tenant's series are removed (``on_demote`` callbacks), so the number of
    tenant-labelled series stays bounded by ``top_n`` x the other labels' combinations.
    Exact per-tenant numbers come from GET /v1/usage, not from metrics."""

    def __init__(self, top_n: int) -> None:
        self.top_n = top_n
        self._counts: dict[str, int] = {}
        self._named: set[str] = set()
        self._lock = threading.Lock()
        self.on_demote: list[Callable[[str], None]] = []

    @property
    def named(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._named)

    def __call__(self, tenant_id: str) -> str:
        if self.top_n <= 0:
            return OTHER
        demoted: str | None = None
        with self._lock:
            count = self._counts.get(tenant_id, 0) + 1
            self._counts[tenant_id] = count
            if tenant_id in self._named:
                return tenant_id
            if len(self._named) < self.top_n:
                self._named.add(tenant_id)
                return tenant_id
            if count < PROMOTE_MIN:  # the common case of an unnamed tenant: no scan of the named ones
                return OTHER
            smallest = min(self._named, key=lambda t: (self._counts.get(t, 0), t))
            if count > PROMOTE_FACTOR * self._counts.get(smallest, 0):
                self._named.discard(smallest)
                self._named.add(tenant_id)
                demoted = smallest
        if demoted is None:
            return OTHER
        for callback in self.on_demote:
            callback(demoted)
        return tenant_id

"""Per-source token buckets with a bounded number of sources (least recently heard forgotten first)."""

from __future__ import annotations

from collections import OrderedDict


class RateLimiter:
    """``allow(source, now)`` is True while ``source`` stays under ``rate``/s with bursts of ``burst``."""

    def __init__(self, rate: float, burst: float, *, max_sources: int = 4096) -> None:
        self.rate, self.burst, self.max_sources = rate, burst, max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source -> (tokens, updated)

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: str, now: float) -> bool:
        tokens, updated = self._buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - updated) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[source] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return allowed

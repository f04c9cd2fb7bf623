"""Records announced to this node, bounded in every dimension and expired on time.

At most ``max_keys`` keys, ``max_per_key`` records per key (one per record id: a newer announcement replaces
the older), ``max_per_ip_per_key`` records per key from one announcing IP, so a single host cannot crowd out
the real mediators under the well-known key, and ``max_per_ip`` records in all from one announcing IP, so a
single host announcing under thousands of keys of its own cannot fill the key table either (a full store
refuses new keys, the mediators' among them, and holds ~2 KB per record). A record stays charged to the IP
that first announced it, whoever re-announces it later: otherwise a second host re-announcing the first one's
records would free the first one's quota, and two hosts could fill a key. A full store refuses new records
rather than evicting live ones.

Every ``get_peers`` and ``announce_peer`` touches the store, so no operation scans it: expiry pops a heap
ordered by expiry time (amortised O(log n) per record), and ``get`` skips expired records of its own key.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from dataclasses import dataclass

from .records import PeerRecord


@dataclass(frozen=True)
class _Stored:
    record: PeerRecord
    announcer_ip: str


class PeerStore:
    def __init__(self, *, max_keys: int = 4096, max_per_key: int = 64, max_per_ip_per_key: int = 4,
                 max_per_ip: int = 64) -> None:
        self.max_keys, self.max_per_key, self.max_per_ip_per_key = max_keys, max_per_key, max_per_ip_per_key
        self.max_per_ip = max_per_ip
        self._keys: dict[bytes, dict[str, _Stored]] = {}
        self._count = 0
        self._per_ip: Counter[str] = Counter()  # announcer IP -> records charged to it, over every key
        # (expires_at, key, record id) for every stored record; an entry whose record was since replaced by a
        # later-expiring one is stale and skipped when popped (_compact bounds how many there are)
        self._expiry: list[tuple[int, bytes, str]] = []

    def __len__(self) -> int:
        return self._count

    def add(self, record: PeerRecord, announcer_ip: str, now: float) -> str | None:
        """Store a verified, fresh record; None on success, else the counter name of the refusal."""
        self.expire(now)
        records = self._keys.get(record.key)
        if records is None:
            if len(self._keys) >= self.max_keys:
                return "store_full"
            records = {}  # kept only if the record is
        old = records.get(record.id)
        if old is not None:
            if old.record.expires_at > record.expires_at:
                return "stale_record"
            announcer_ip = old.announcer_ip  # charged to the first announcer (see the module docstring)
        else:
            if len(records) >= self.max_per_key:
                return "key_full"
            per_ip = Counter(s.announcer_ip for s in records.values())
            if per_ip[announcer_ip] >= self.max_per_ip_per_key:
                return "announcer_ip_limit"
            if self._per_ip[announcer_ip] >= self.max_per_ip:
                return "announcer_ip_total"
            self._count += 1
            self._per_ip[announcer_ip] += 1
        records[record.id] = _Stored(record, announcer_ip)
        self._keys[record.key] = records
        if old is None or old.record.expires_at != record.expires_at:
            heapq.heappush(self._expiry, (record.expires_at, record.key, record.id))
            self._compact()
        return None

    def get(self, key: bytes, now: float, limit: int, rng: random.Random) -> tuple[PeerRecord, ...]:
        """Up to ``limit`` live records for ``key``, a random sample when there are more."""
        records = [s.record for s in self._keys.get(key, {}).values() if s.record.expires_at > now]
        if len(records) > limit:
            records = rng.sample(records, limit)
        return tuple(records)

    def expire(self, now: float) -> int:
        """Drop expired records (and empty keys); returns how many were dropped."""
        dropped = 0
        while self._expiry and self._expiry[0][0] <= now:
            expires_at, key, rid = heapq.heappop(self._expiry)
            records = self._keys.get(key)
            stored = records.get(rid) if records is not None else None
            if records is None or stored is None or stored.record.expires_at != expires_at:
                continue  # stale: replaced by a later-expiring record, whose own entry comes later
            del records[rid]
            self._count -= 1
            self._per_ip[stored.announcer_ip] -= 1
            if not self._per_ip[stored.announcer_ip]:
                del self._per_ip[stored.announcer_ip]
            dropped += 1
            if not records:
                del self._keys[key]
        return dropped

    def _compact(self) -> None:
        # Re-announcements with ever later expiry each leave a stale entry; rebuild once they outnumber the live
        # ones, so the heap stays O(records) at an amortised O(1) per add.
        if len(self._expiry) > 2 * self._count + 64:
            self._expiry = [(s.record.expires_at, key, rid)
                            for key, records in self._keys.items() for rid, s in records.items()]
            heapq.heapify(self._expiry)

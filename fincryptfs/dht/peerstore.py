"""Records announced to this node, bounded in every dimension and expired on time.

At most ``max_keys`` keys, ``max_per_key`` records per key (one per record id: a newer announcement replaces
the older) and ``max_per_ip_per_key`` records per key from one announcing IP, so a single host cannot crowd out
the real mediators under the well-known key. A record stays charged to the IP that first announced it, whoever
re-announces it later: otherwise a second host re-announcing the first one's records would free the first
one's quota, and two hosts could fill a key. A full store refuses new records rather than evicting live ones.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from .records import PeerRecord


@dataclass(frozen=True)
class _Stored:
    record: PeerRecord
    announcer_ip: str


class PeerStore:
    def __init__(self, *, max_keys: int = 4096, max_per_key: int = 64, max_per_ip_per_key: int = 4) -> None:
        self.max_keys, self.max_per_key, self.max_per_ip_per_key = max_keys, max_per_key, max_per_ip_per_key
        self._keys: dict[bytes, dict[str, _Stored]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._keys.values())

    def add(self, record: PeerRecord, announcer_ip: str, now: float) -> str | None:
        """Store a verified, fresh record; None on success, else the counter name of the refusal."""
        self.expire(now)
        records = self._keys.get(record.key)
        if records is None:
            if len(self._keys) >= self.max_keys:
                return "store_full"
            records = self._keys[record.key] = {}
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
        records[record.id] = _Stored(record, announcer_ip)
        return None

    def get(self, key: bytes, now: float, limit: int, rng: random.Random) -> tuple[PeerRecord, ...]:
        """Up to ``limit`` live records for ``key``, a random sample when there are more."""
        self.expire(now)
        records = [s.record for s in self._keys.get(key, {}).values()]
        if len(records) > limit:
            records = rng.sample(records, limit)
        return tuple(records)

    def expire(self, now: float) -> int:
        """Drop expired records (and empty keys); returns how many were dropped."""
        dropped = 0
        for key in list(self._keys):
            records = self._keys[key]
            for rid in [rid for rid, s in records.items() if s.record.expires_at <= now]:
                del records[rid]
                dropped += 1
            if not records:
                del self._keys[key]
        return dropped

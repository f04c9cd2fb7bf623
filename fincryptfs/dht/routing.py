"""The k-bucket routing table, pure: no sockets, no clock (callers pass ``now``), no randomness.

Bucket ``i`` holds contacts whose XOR distance from our id has bit length ``i + 1``; each holds at most ``k``,
least recently seen first. A full bucket does not drop a live old contact for a new one (old contacts that
stayed up tend to stay up, and an attacker cannot flush them with fresh ids): :meth:`RoutingTable.observe`
returns :class:`PingOldest` and the caller reports the outcome with :meth:`RoutingTable.ping_result`.

Against poisoning from one machine, an IP may hold at most ``max_per_ip_bucket`` entries in a bucket and
``max_per_ip`` in the table, an address maps to one id, and a known id never moves to a new address while
its old one answers. Ids themselves are free to mint (any key gives one), so these limits, not the ids, bound
what one address can do.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

from .contact import ID_BITS, Contact, distance

MAX_FAILURES = 3


@dataclass(frozen=True)
class Added:
    contact: Contact


@dataclass(frozen=True)
class Refreshed:
    contact: Contact


@dataclass(frozen=True)
class Rejected:
    contact: Contact
    reason: str  # a counter name: "ip_limit", "address_taken", "id_moved", "bucket_full", "self"


@dataclass(frozen=True)
class PingOldest:
    """The bucket is full: ping ``oldest``; if it is dead, ``candidate`` takes its place."""

    oldest: Contact
    candidate: Contact


Action = Added | Refreshed | Rejected | PingOldest


@dataclass
class _Entry:
    contact: Contact
    last_seen: float
    failures: int = 0


class RoutingTable:
    """Kademlia k-buckets over 256-bit ids with per-IP limits and ping-before-evict."""

    def __init__(self, own_id: bytes, *, k: int = 8, max_per_ip_bucket: int = 2, max_per_ip: int = 8) -> None:
        self.own_id = own_id
        self.k = k
        self.max_per_ip_bucket = max_per_ip_bucket
        self.max_per_ip = max_per_ip
        self._buckets: list[OrderedDict[bytes, _Entry]] = [OrderedDict() for _ in range(ID_BITS)]
        self._changed: list[float] = [0.0] * ID_BITS
        self._by_address: dict[tuple[str, int], bytes] = {}
        self._per_ip: Counter[str] = Counter()
        self._pending: dict[int, PingOldest] = {}  # bucket -> eviction check in progress

    def __len__(self) -> int:
        return len(self._by_address)

    def bucket_index(self, node_id: bytes) -> int:
        return distance(self.own_id, node_id).bit_length() - 1

    def get(self, node_id: bytes) -> Contact | None:
        if node_id == self.own_id:
            return None
        entry = self._buckets[self.bucket_index(node_id)].get(node_id)
        return entry.contact if entry else None

    def contacts(self) -> list[Contact]:
        return [e.contact for bucket in self._buckets for e in bucket.values()]

    def observe(self, contact: Contact, now: float) -> Action:
        """We heard from ``contact`` (a verified response): add it, refresh it, or say what must happen."""
        if contact.id == self.own_id:
            return Rejected(contact, "self")
        index = self.bucket_index(contact.id)
        bucket = self._buckets[index]
        entry = bucket.get(contact.id)
        if entry is not None:
            if entry.contact.address != contact.address:
                return Rejected(contact, "id_moved")
            entry.last_seen, entry.failures = now, 0
            bucket.move_to_end(contact.id)
            self._changed[index] = now
            return Refreshed(contact)
        if contact.address in self._by_address:
            return Rejected(contact, "address_taken")
        if not self._ip_allows(contact, bucket):
            return Rejected(contact, "ip_limit")
        if len(bucket) < self.k:
            self._insert(index, contact, now)
            return Added(contact)
        if index in self._pending:
            return Rejected(contact, "bucket_full")
        oldest = next(iter(bucket.values())).contact
        action = PingOldest(oldest, contact)
        self._pending[index] = action
        return action

    def ping_result(self, action: PingOldest, alive: bool, now: float) -> Action | None:
        """Finish an eviction check: keep the old contact if it answered, else replace it."""
        index = self.bucket_index(action.oldest.id)
        if self._pending.get(index) != action:
            return None
        del self._pending[index]
        if alive:
            self.observe(action.oldest, now)
            return Rejected(action.candidate, "bucket_full")
        self.remove(action.oldest.id)
        return self.observe(action.candidate, now)

    def cancel_check(self, action: PingOldest) -> Rejected | None:
        """Give up an eviction check that cannot run (no ping to spare): the candidate is turned away and the
        oldest contact stays as it was. Reporting it alive instead would reset a dead contact's failures and
        make it the most recently seen, so it would never leave while pings stay short."""
        index = self.bucket_index(action.oldest.id)
        if self._pending.get(index) != action:
            return None
        del self._pending[index]
        return Rejected(action.candidate, "bucket_full")

    def failed(self, contact: Contact) -> bool:
        """A query to ``contact`` timed out; drop it after MAX_FAILURES in a row. True if dropped.

        Counted only when ``contact`` is the table's entry, address included: a lookup queries contacts that
        other nodes merely claim exist, and a claim of a known node's id at a dead address must not cost that
        node its place.
        """
        if contact.id == self.own_id:
            return False
        entry = self._buckets[self.bucket_index(contact.id)].get(contact.id)
        if entry is None or entry.contact.address != contact.address:
            return False
        entry.failures += 1
        if entry.failures >= MAX_FAILURES:
            self.remove(contact.id)
            return True
        return False

    def remove(self, node_id: bytes) -> None:
        index = self.bucket_index(node_id)
        entry = self._buckets[index].pop(node_id, None)
        if entry is not None:
            del self._by_address[entry.contact.address]
            self._per_ip[entry.contact.host] -= 1
            if self._per_ip[entry.contact.host] <= 0:
                del self._per_ip[entry.contact.host]

    def closest(self, target: bytes, count: int | None = None) -> list[Contact]:
        """Up to ``count`` (default k) live contacts nearest ``target``, nearest first."""
        found = sorted(self.contacts(), key=lambda c: distance(c.id, target))
        return found[: self.k if count is None else count]

    def stale_buckets(self, now: float, interval: float) -> list[int]:
        """Buckets to refresh: those not changed for ``interval`` seconds, up to the farthest non-empty one."""
        filled = [i for i, b in enumerate(self._buckets) if b]
        if not filled:
            return []
        return [i for i in range(filled[0], filled[-1] + 1) if now - self._changed[i] >= interval]

    def random_id_in_bucket(self, index: int, random_bytes: bytes) -> bytes:
        """An id in bucket ``index`` (its distance has bit length index+1), drawn from ``random_bytes``."""
        noise = int.from_bytes(random_bytes[:32].rjust(32, b"\0"), "big") & ((1 << index) - 1)
        offset = (1 << index) | noise
        return (int.from_bytes(self.own_id, "big") ^ offset).to_bytes(32, "big")

    def _ip_allows(self, contact: Contact, bucket: OrderedDict[bytes, _Entry]) -> bool:
        if self._per_ip[contact.host] >= self.max_per_ip:
            return False
        same_ip = sum(1 for e in bucket.values() if e.contact.host == contact.host)
        return same_ip < self.max_per_ip_bucket

    def _insert(self, index: int, contact: Contact, now: float) -> None:
        self._buckets[index][contact.id] = _Entry(contact, now)
        self._by_address[contact.address] = contact.id
        self._per_ip[contact.host] += 1
        self._changed[index] = now

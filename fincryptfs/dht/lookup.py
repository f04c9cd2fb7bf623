"""Iterative Kademlia lookup as a pure state machine: fed responses and timeouts, it says whom to query next.

Up to ``alpha`` queries are in flight; only the ``k`` nearest candidates not known to have failed are ever
queried, and the lookup ends when all of those have answered (or failed). Contacts learned from one response
are *claims* until queried: a contact whose answer is signed by a different id counts as failed. So a
candidate is an id *at an address*: one id claimed at two addresses is two candidates, and a liar naming a
real node's id at an address where nobody answers cannot hide the node from the lookup. A responder
may name at most ``max_per_ip`` candidates per IP address and the candidate set is capped, so one host
answering with thousands of ids near the target cannot absorb the lookup. ``max_queries`` bounds the work.

``hops`` is the number of sequential round trips that led to the nearest responder (a seed's answer is hop 1).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .contact import Contact, distance

NEW, IN_FLIGHT, ANSWERED, FAILED = "new", "in_flight", "answered", "failed"


@dataclass
class _Candidate:
    contact: Contact
    depth: int
    state: str = NEW
    token: bytes | None = field(default=None)


class Lookup:
    """One lookup for ``target``; pure (the caller sends queries and waits)."""

    def __init__(self, target: bytes, seeds: list[Contact], *, own_id: bytes, k: int = 8, alpha: int = 3,
                 max_per_ip: int = 2, max_candidates: int = 64, max_queries: int = 64) -> None:
        self.target = target
        self.own_id = own_id
        self.k, self.alpha = k, alpha
        self.max_per_ip, self.max_candidates, self.max_queries = max_per_ip, max_candidates, max_queries
        self.queries_sent = 0
        self._candidates: dict[Contact, _Candidate] = {}  # an id at an address: see the module docstring
        self._per_ip: Counter[str] = Counter()
        for seed in seeds:
            self._add(seed, 1)

    def _add(self, contact: Contact, depth: int) -> None:
        if contact.id == self.own_id or contact in self._candidates:
            return
        if self._per_ip[contact.host] >= self.max_per_ip:
            return
        self._candidates[contact] = _Candidate(contact, depth)
        self._per_ip[contact.host] += 1
        if len(self._candidates) > self.max_candidates:
            self._drop_farthest_new()

    def _drop_farthest_new(self) -> None:
        new = [c for c in self._candidates.values() if c.state == NEW]
        if new:
            worst = max(new, key=lambda c: distance(c.contact.id, self.target))
            del self._candidates[worst.contact]
            self._per_ip[worst.contact.host] -= 1

    def _frontier(self) -> list[_Candidate]:
        alive = [c for c in self._candidates.values() if c.state != FAILED]
        alive.sort(key=lambda c: distance(c.contact.id, self.target))
        return alive[: self.k]

    @property
    def in_flight(self) -> int:
        return sum(1 for c in self._candidates.values() if c.state == IN_FLIGHT)

    @property
    def done(self) -> bool:
        if self.in_flight:
            return False
        if self.queries_sent >= self.max_queries:
            return True
        return all(c.state == ANSWERED for c in self._frontier())

    def next_queries(self) -> list[Contact]:
        """Contacts to query now (each is then in flight until answered or timed out)."""
        out: list[Contact] = []
        budget = self.alpha - self.in_flight
        for cand in self._frontier():
            if budget <= 0 or self.queries_sent >= self.max_queries:
                break
            if cand.state == NEW:
                cand.state = IN_FLIGHT
                self.queries_sent += 1
                budget -= 1
                out.append(cand.contact)
        return out

    def on_response(self, contact: Contact, responder: bytes, nodes: tuple[Contact, ...] = (),
                    token: bytes | None = None) -> None:
        """``contact`` answered, signed as ``responder``, naming ``nodes``."""
        cand = self._candidates.get(contact)
        if cand is None or cand.state != IN_FLIGHT:
            return
        if responder != contact.id:
            cand.state = FAILED
            return
        cand.state, cand.token = ANSWERED, token
        for node in nodes:
            self._add(node, cand.depth + 1)

    def on_timeout(self, contact: Contact) -> None:
        cand = self._candidates.get(contact)
        if cand is not None and cand.state == IN_FLIGHT:
            cand.state = FAILED

    def result(self) -> list[tuple[Contact, bytes | None]]:
        """The k nearest contacts that answered, nearest first, with the token each gave (get_peers)."""
        answered: dict[bytes, _Candidate] = {}  # one per id (a node answering at two addresses counts once)
        for c in self._candidates.values():
            if c.state == ANSWERED:
                answered.setdefault(c.contact.id, c)
        best = sorted(answered.values(), key=lambda c: distance(c.contact.id, self.target))
        return [(c.contact, c.token) for c in best[: self.k]]

    @property
    def hops(self) -> int:
        best = self.result()
        return self._candidates[best[0][0]].depth if best else 0

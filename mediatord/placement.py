"""Choosing storage nodes for an object's shares: a pure function over candidate nodes.

Rules, in order of strength:

1. never two shares of one object on one node (the caller passes the nodes already holding the object's other
   shares in ``exclude``), and never a node the client excluded;
2. only nodes online, with reputation >= the acceptance rule's minimum, and with room for the share on top of
   the bytes already promised to them by unexpired grants;
3. spread: a node whose operator or /24 (IPv4) subnet already holds a share of this object is taken only when
   no fresh-operator, fresh-subnet node is left (operators and subnets are "where known": an empty operator
   or a host name never collides);
4. cheapest first under the active pricing scheme, then higher reputation, then node id (deterministic).

Redundancy below the mediator's minimum is a PolicyError 422; too few eligible nodes a PolicyError 503 that
says how many nodes are missing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import urlsplit

from fincryptfs.core.errors import ErasureError, PolicyError
from fincryptfs.core.layout import ObjectLayout


@dataclass(frozen=True)
class Candidate:
    node_id: str
    url: str
    price: int  # under the active pricing scheme
    free_bytes: int  # announced free space minus bytes promised by unexpired grants
    operator: str
    reputation: float
    online: bool = True

    @cached_property
    def subnet(self) -> str | None:
        return subnet_of(self.url)


def subnet_of(url: str) -> str | None:
    """The /24 of an IPv4 host (the /48 of an IPv6 one); None for host names and unparsable URLs (unknown)."""
    try:
        address = ipaddress.ip_address(urlsplit(url).hostname or "")
    except ValueError:
        return None
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def check_redundancy(layout: ObjectLayout, min_expansion: float) -> None:
    try:
        layout.params.check_redundancy(min_expansion)
    except PolicyError as exc:
        raise PolicyError(str(exc), status=422) from exc
    except ErasureError as exc:
        raise PolicyError(str(exc), status=422) from exc


def eligible(candidates: Sequence[Candidate], share_size: int, exclude: Collection[str],
             min_reputation: float) -> list[Candidate]:
    return [c for c in candidates
            if c.online and c.node_id not in exclude and c.reputation >= min_reputation
            and c.free_bytes >= share_size]


def why_ineligible(candidates: Sequence[Candidate], share_size: int, exclude: Collection[str],
                   min_reputation: float) -> str:
    """Why the known nodes cannot take a share, counted by first reason, in words (e.g. "6 full")."""
    counts = {"offline": 0, "already used or failed for this object": 0, "reputation too low": 0,
              f"full (less than {share_size / 2**20:.2f} MiB free)": 0}
    reasons = list(counts)
    for c in candidates:
        if not c.online:
            counts[reasons[0]] += 1
        elif c.node_id in exclude:
            counts[reasons[1]] += 1
        elif c.reputation < min_reputation:
            counts[reasons[2]] += 1
        elif c.free_bytes < share_size:
            counts[reasons[3]] += 1
    said = [f"{count} {reason}" for reason, count in counts.items() if count]
    return f"{len(candidates)} known" + (": " + ", ".join(said) if said else "")


def place_shares(candidates: Sequence[Candidate], share_count: int, share_size: int, *,
                 exclude: Collection[str] = (), used_operators: Collection[str] = (),
                 used_subnets: Collection[str] = (), min_reputation: float = 0.0) -> list[Candidate]:
    """``share_count`` distinct nodes, best first (see the module docstring), or PolicyError 503."""
    pool = sorted(eligible(candidates, share_size, exclude, min_reputation),
                  key=lambda c: (c.price, -c.reputation, c.node_id))
    if len(pool) < share_count:
        missing = share_count - len(pool)
        raise PolicyError(f"not enough storage nodes: {share_count} shares need {share_count} distinct nodes, "
                          f"{len(pool)} can take one ({missing} missing; "
                          f"{why_ineligible(candidates, share_size, exclude, min_reputation)}); "
                          "retry later or lower n", status=503)
    operators = {o for o in used_operators if o}
    subnets = set(used_subnets)
    chosen: list[Candidate] = []
    taken: set[str] = set()
    for _ in range(share_count):
        pick = _first_fresh(pool, taken, operators, subnets)
        taken.add(pick.node_id)
        chosen.append(pick)
        if pick.operator:
            operators.add(pick.operator)
        if pick.subnet is not None:
            subnets.add(pick.subnet)
    return chosen


def _first_fresh(pool: Sequence[Candidate], taken: set[str], operators: set[str], subnets: set[str]) -> Candidate:
    fallback: Candidate | None = None
    partial: Candidate | None = None
    for c in pool:
        if c.node_id in taken:
            continue
        new_operator = not c.operator or c.operator not in operators
        new_subnet = c.subnet is None or c.subnet not in subnets
        if new_operator and new_subnet:
            return c
        if partial is None and new_operator:
            partial = c
        if fallback is None:
            fallback = c
    pick = partial or fallback
    assert pick is not None  # the pool holds at least share_count nodes
    return pick

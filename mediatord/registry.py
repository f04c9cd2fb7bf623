"""The node registry: announcements, liveness, and the view of nodes that pricing and placement use.

A node is *online* after an announcement or an answered audit, *offline* once unseen for
``node_offline_after`` seconds (its shares then stop counting as healthy and are repaired elsewhere), and back
online with its next announcement. *Unresponsive* (it announces but did not answer several audit rounds in a
row) is like offline, but announcements do not end it: only an answered audit does. *Disqualified* is final
(see :mod:`mediatord.audit`).
"""

from __future__ import annotations

from fincryptfs.core.errors import ForbiddenError, RemoteProtocolError
from fincryptfs.core.identity import PublicKey
from fincryptfs.core.messages import NodeAnnouncement, check_url

from .audit import UNRESPONSIVE_AFTER
from .db import MediatorDB, NodeRow
from .placement import Candidate
from .policies import AcceptanceRule, MarketView, PricingScheme


def announce(db: MediatorDB, signer: PublicKey, ann: NodeAnnouncement, rule: AcceptanceRule, now: float) -> None:
    """Record a signed announcement; the signer must be the node it describes."""
    if signer.id != ann.node_id:
        raise ForbiddenError("an announcement must be signed by the node it announces (node_id = signer's id)")
    rule.admit(ann.node_id, ann.capacity_bytes)
    existing = db.node(ann.node_id)
    if existing is not None and existing.state == "disqualified":
        raise ForbiddenError("this node was disqualified after repeatedly failing storage audits")
    db.upsert_node(node_id=ann.node_id, public_key=signer.raw, url=ann.url, price=ann.price,
                   capacity=ann.capacity_bytes, free=ann.free_bytes, operator=ann.operator,
                   payout_address=ann.payout_address, now=now, unresponsive_after=UNRESPONSIVE_AFTER)


def mark_offline(db: MediatorDB, now: float, offline_after: float) -> list[str]:
    return db.mark_offline(now - offline_after)


def market_view(nodes: list[NodeRow]) -> MarketView:
    online = [n for n in nodes if n.state == "online"]
    return MarketView(tuple(n.price for n in online if n.price is not None),
                      sum(n.capacity for n in online), sum(n.free for n in online))


def usable_url(url: str) -> bool:
    """Whether a stored node URL passes today's announcement check (rows written before it may not)."""
    try:
        check_url(url, "node url")
    except RemoteProtocolError:
        return False
    return True


def admitted(rule: AcceptanceRule, node: NodeRow) -> bool:
    """Whether the acceptance rule takes this node now: one it admitted may be refused by a rule changed since
    (a deny list, a capacity cap), and answered audits keep such a node online although it cannot announce."""
    try:
        rule.admit(node.node_id, node.capacity)
    except ForbiddenError:
        return False
    return True


def candidates(db: MediatorDB, pricing: PricingScheme, now: float, rule: AcceptanceRule | None = None
               ) -> list[Candidate]:
    """Every known node as placement sees it (only those ``rule`` admits, when given); one whose URL clients
    could not use counts as offline."""
    nodes = db.nodes()
    market = market_view(nodes)
    pending = db.pending_grant_bytes(now)
    return [Candidate(n.node_id, n.url, pricing.node_price(n.price, market), n.free - pending.get(n.node_id, 0),
                      n.operator, n.reputation, n.state == "online" and usable_url(n.url)) for n in nodes
            if rule is None or admitted(rule, n)]

"""The mediator's request logic: placement, commit, objects, pointers and accounts, over the database.

Callers (the HTTP app) have already authenticated the signer; every method here takes the signer's id or
key, checks what that signer may do, validates *everything* before writing, and writes in one transaction, so a
refused request changes nothing.

``happy`` (receipts needed to commit) is ``max(n - 1, k + 1)`` capped at n: an object must survive the loss of
one more node than the bare minimum before the client may forget its local copy.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from typing import Any

from fincryptfs.core.errors import AuthError, ConfigError, ForbiddenError, PolicyError, RemoteProtocolError, ReplayError
from fincryptfs.core.identity import PublicKey, SigningKey
from fincryptfs.core.ids import AccountId, NodeId, ObjectId, ShareId, parse_node_id, parse_share_id
from fincryptfs.core.layout import ObjectLayout
from fincryptfs.core.messages import (
    CommitRequest,
    ManifestPointer,
    NodeAnnouncement,
    Placement,
    PlaceRequest,
    StorageReceipt,
    UploadGrant,
    layout_to_json,
)
from fincryptfs.core.settings import MediatorSettings
from fincryptfs.core.wire import MAX_WIRE_INT, Envelope, Fields, b64encode, decode_object, origin_of

from . import billing, ledger, registry
from .audit import LossReports, OutOfTurnAudits, out_of_turn_gap
from .db import HEALTHY_SHARE_STATES, UNKNOWN_ROOT, GrantRow, MediatorDB, ObjectRow, ShareRow
from .payments import Payments
from .placement import check_redundancy, place_shares, subnet_of
from .policies import AcceptanceRule, PricingScheme, acceptance_rule, pricing_scheme

log = logging.getLogger(__name__)

GRANT_LIFETIME = 3600
# What one account may have placed (all n shares of its objects). One object is at most 2^58 bytes (256 shares
# of at most 2^50), so an account's sum, which SQLite adds up in 64 bits, stays below 2^63 with room to spare.
MAX_ACCOUNT_BYTES = 2**62


def _roots_differ(placed: bytes, given: bytes | None) -> bool:
    """Both roots known and different (a share streamed by its client is placed before its root is known)."""
    return placed != UNKNOWN_ROOT and given is not None and placed != given


def happy_for(layout: ObjectLayout) -> int:
    return min(layout.n, max(layout.n - 1, layout.k + 1))


def repair_threshold(layout: ObjectLayout, min_expansion: float) -> int:
    """Repair once fewer than this many shares are healthy.

    One loss is tolerated only while the healthy shares still hold ``min_expansion`` times the data (healthy / k
    >= min_expansion) and more than k remain: a 1-of-2 object down to one copy, or a 2-of-4 down to three shares
    (1.5x), is below the redundancy the mediator promised at placement and is repaired. Capped at n, so an
    object placed under a lower minimum is not repaired forever once all its shares are healthy."""
    k, n = layout.k, layout.n
    expansion_floor = math.ceil(round(min_expansion * k, 9))  # round: 2.2 * 5 is 11.000000000000002
    return min(n, max(n - 1, expansion_floor, k + 1))


@dataclass(frozen=True)
class ObjectHealth:
    healthy: int
    total: int
    state: str  # pending | healthy | degraded | irreparable

    def to_json(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "total": self.total, "state": self.state}


def health_state(object_state: str, k: int, n: int, healthy: int) -> str:
    """pending | healthy | degraded | irreparable, from an object's state and its healthy shares."""
    if object_state == "pending":
        return "pending"
    if healthy < k:
        return "irreparable"
    if healthy < n:
        return "degraded"
    return "healthy"


def object_health(obj: ObjectRow, shares: list[ShareRow], online_nodes: set[str]) -> ObjectHealth:
    healthy = sum(1 for s in shares if s.state in HEALTHY_SHARE_STATES and s.node_id in online_nodes)
    n, k = obj.layout.n, obj.layout.k
    return ObjectHealth(healthy, n, health_state(obj.state, k, n, healthy))


class MediatorService:
    def __init__(self, settings: MediatorSettings, key: SigningKey, db: MediatorDB) -> None:
        self.settings = settings
        self.key = key
        self.id = NodeId(key.id)
        self.db = db
        self.pricing: PricingScheme = pricing_scheme(settings.pricing)
        self.client_rule: AcceptanceRule = acceptance_rule(settings.accept_clients, "MEDIATORD_ACCEPT_CLIENTS")
        if self.client_rule.name == "min_reputation":  # clients have no reputation: it would admit everybody
            raise ConfigError(f"MEDIATORD_ACCEPT_CLIENTS={settings.accept_clients}: min_reputation applies to storage "
                              "nodes only (MEDIATORD_ACCEPT_NODES); for clients use open, allow:IDS, deny:IDS or "
                              "capacity_cap:BYTES")
        self.node_rule: AcceptanceRule = acceptance_rule(settings.accept_nodes, "MEDIATORD_ACCEPT_NODES")
        self.out_of_turn = OutOfTurnAudits(out_of_turn_gap(settings.audit_period))  # nodes clients reported
        self._round_id = 0  # the last audit round id handed out (see new_round_id)
        self.loss_reports = LossReports()  # what nodes say they lost: an out-of-turn audit each time it grows
        self.payments = Payments(settings, db, self.pricing)
        self.bound_url: str | None = None  # set once the HTTP server is bound (see audiences)

    def audiences(self) -> frozenset[str]:
        """What a signed request to this mediator may be addressed to: its id, or the origin of its public URL
        (of the address it is bound to when no public URL is set)."""
        url = self.settings.public_url or self.bound_url
        return frozenset({self.id} | ({origin_of(url)} if url else set()))

    # --- nodes ----------------------------------------------------------------------------------------------

    def announce(self, signer: PublicKey, body: object, now: float) -> dict[str, Any]:
        ann = NodeAnnouncement.from_json(body)
        registry.announce(self.db, signer, ann, self.node_rule, now)
        if self.loss_reports.note(ann.node_id, ann.boot_id, ann.shares_lost):
            log.info("node %s reports %d lost share(s): auditing it out of turn", ann.node_id[:16], ann.shares_lost)
            self.out_of_turn.request(ann.node_id)
        return {"accepted": True, "mediator_id": self.id, "public_key": self.key.public.to_text(),
                "next_announce_in": int(max(1, min(300, self.settings.node_offline_after / 3))),
                "earnings": billing.node_earnings(self.db, self.settings, ann.node_id)}

    def new_round_id(self) -> int:
        """An audit round id no other audit has had or will get. Periodic and out-of-turn audits run in
        different tasks, and the database learns of a round only when its first node is challenged: both read
        from it could get the same id, and then share one (round, node) row, nonce and pass."""
        self._round_id = max(self._round_id, self.db.next_round_id() - 1) + 1
        return self._round_id

    def online_node_ids(self) -> set[str]:
        return {n.node_id for n in self.db.nodes("online")}

    def node_list(self) -> dict[str, Any]:
        nodes = self.db.nodes()
        market = registry.market_view(nodes)
        listed = [{"node_id": n.node_id, "url": n.url, "price": self.pricing.node_price(n.price, market),
                   "free_bytes": n.free, "state": n.state, "reputation": f"{n.reputation:.3f}"} for n in nodes]
        online = [n for n in nodes if n.state == "online"]
        # each node may announce up to 2^60 bytes: a few of them can sum past what the wire carries
        return {"nodes": listed, "capacity_bytes": min(MAX_WIRE_INT, sum(n.capacity for n in online)),
                "free_bytes": min(MAX_WIRE_INT, sum(n.free for n in online))}

    def info(self) -> dict[str, Any]:
        market = registry.market_view(self.db.nodes())
        return {"mediator_id": self.id, "public_key": self.key.public.to_text(),
                "min_expansion": f"{self.settings.min_expansion:g}",
                "audit_period": f"{self.settings.audit_period:g}", "price": self.pricing.client_price(market),
                "bid": self.pricing.node_price(None, market), "pricing": self.pricing.name}

    # --- accounts -------------------------------------------------------------------------------------------

    def _admit_client(self, signer: PublicKey, extra_bytes: int) -> AccountId:
        """Check the acceptance rule; writes nothing (the account is made by the request's own transaction, so
        a request refused later on, 402, 409 or 503, leaves no account behind)."""
        account_id = AccountId(signer.id)
        stored = self.db.account_bytes(account_id, committed_only=False)
        if stored + extra_bytes > MAX_ACCOUNT_BYTES:
            raise PolicyError(f"this account would store more than {MAX_ACCOUNT_BYTES} bytes (it has {stored} placed "
                              "already): delete objects first", status=422)
        self.client_rule.admit(account_id, stored + extra_bytes)
        return account_id

    def account(self, signer: PublicKey) -> dict[str, Any]:
        """Counts and bytes by aggregate queries over this account's rows: no per-object work in Python."""
        by_state: dict[str, int] = {}
        objects = 0
        for object_state, k, n, healthy, count in self.db.account_object_health(signer.id):
            state = health_state(object_state, k, n, healthy)
            by_state[state] = by_state.get(state, 0) + count
            objects += count
        return {"account_id": signer.id, "objects": objects,
                "bytes_stored": self.db.account_bytes(signer.id, committed_only=True), "objects_by_state": by_state}

    # --- placement and commit -------------------------------------------------------------------------------

    def place(self, signer: PublicKey, body: object, now: float) -> list[Placement]:
        req = PlaceRequest.from_json(body)
        check_redundancy(req.layout, self.settings.min_expansion)
        account_id = self._admit_client(signer, req.layout.share_size * len(req.shares))
        billing.refuse_uploads_after_grace(self.db, self.settings, account_id, now)
        obj = self.db.object(req.object_id)
        if obj is not None:
            self._check_owner(obj, account_id)
            if obj.layout != req.layout:
                raise PolicyError("object already exists with a different layout", status=409)
        existing = {s.share_id: s for s in self.db.shares_of(req.object_id)} if obj else {}
        by_index = {s.idx: s for s in existing.values()}
        for spec in req.shares:
            other = self.db.share(spec.share_id)
            if other is not None and other.object_id != req.object_id:
                raise PolicyError(f"share id {spec.share_id[:16]}… belongs to another object", status=409)
            row = by_index.get(spec.index)
            if row is not None and (row.share_id != spec.share_id or _roots_differ(row.root, spec.merkle_root)):
                raise PolicyError(f"share {spec.index} of this object was placed with another id or root",
                                  status=409)
            if row is not None and row.state in HEALTHY_SHARE_STATES:
                raise PolicyError(f"share {spec.index} is already stored; nothing to place", status=409)
        replaced = {spec.index for spec in req.shares}
        others = [s for s in existing.values() if s.idx not in replaced]
        nodes = {n.node_id: n for n in self.db.nodes()}
        holding = {s.node_id for s in others}
        # as for repair: not back onto the node an audit found had lost the share, nor onto one still holding an
        # old copy of a share of this object (queued for release), which would refuse it with 409
        unfit = {s.node_id for s in existing.values() if s.idx in replaced and s.state == "lost"}
        unfit |= self.db.releasing_nodes(list(existing))
        chosen = place_shares(
            registry.candidates(self.db, self.pricing, now, self.node_rule), len(req.shares), req.layout.share_size,
            exclude=holding | unfit | set(req.exclude_nodes),
            used_operators={nodes[h].operator for h in holding if h in nodes},
            used_subnets={sn for h in holding if h in nodes if (sn := subnet_of(nodes[h].url)) is not None},
            min_reputation=self.node_rule.min_reputation)
        placements = []
        with self.db.transaction():
            self.db.ensure_account(account_id, signer.raw, now)
            if obj is None:
                self.db.insert_object(req.object_id, account_id, req.layout, now)
            for spec, node in zip(req.shares, chosen, strict=True):
                known = by_index[spec.index].root if spec.index in by_index else UNKNOWN_ROOT
                root = spec.merkle_root if spec.merkle_root is not None else known
                grant = self.issue_grant(node.node_id, account_id, spec.share_id, spec.share_size, root, now)
                self.db.put_share(ShareRow(spec.share_id, req.object_id, spec.index, node.node_id, root,
                                           spec.share_size, "placed", node.price), now)
                placements.append(Placement(spec.index, NodeId(node.node_id), node.url, grant))
        return placements

    def issue_grant(self, node_id: str, account_id: str, share_id: str, size: int, root: bytes,
                    now: float) -> Envelope:
        """Sign a single-use upload grant and remember it (its bytes count as promised to the node).

        ``root`` may be UNKNOWN_ROOT: the grant then names none and the node's receipt states it."""
        grant = UploadGrant(self.id, NodeId(node_id), AccountId(account_id), ShareId(share_id), size,
                            None if root == UNKNOWN_ROOT else root, int(now) + GRANT_LIFETIME, os.urandom(16).hex())
        self.db.insert_grant(GrantRow(grant.grant_id, share_id, node_id, account_id, size, root,
                                      grant.expires_at, False))
        return grant.seal(self.key)

    def check_receipt(self, envelope: Envelope, *, share_id: str, account_id: str, size: int,
                      root: bytes, already_committed: bool = False) -> StorageReceipt:
        """A receipt is good iff its node is the one we granted this share to, signing with its registered key,
        and its grant was not used yet: a receipt commits its share once. ``already_committed``: the share is
        recorded healthy on this very node, so a used grant is a harmless repeat of that commit."""
        receipt = StorageReceipt.open(envelope)
        if receipt.mediator_id != self.id:
            raise AuthError(f"receipt for share {share_id[:16]}… names another mediator")
        grant = self.db.grant(receipt.grant_id)
        if grant is None or grant.share_id != share_id or grant.node_id != receipt.node_id:
            raise AuthError(f"receipt for share {share_id[:16]}… answers no grant this mediator issued for that "
                            "share and node")
        if grant.used and not already_committed:
            raise ReplayError(f"receipt for share {share_id[:16]}… was already committed and the share has changed "
                              "since (lost in an audit or repaired): an old receipt cannot commit it again")
        if (grant.account_id, grant.size) != (account_id, size) or grant.root not in (UNKNOWN_ROOT, root) or (
                receipt.account_id, receipt.share_size, receipt.merkle_root) != (account_id, size, root):
            raise AuthError(f"receipt for share {share_id[:16]}… does not match its grant")
        node = self.db.node(receipt.node_id)
        if node is None or node.public_key != envelope.signer.raw:
            raise AuthError(f"receipt for share {share_id[:16]}… is not signed by the registered key of node "
                            f"{receipt.node_id[:16]}…")
        return receipt

    def commit(self, signer: PublicKey, body: object, now: float) -> dict[str, Any]:
        req = CommitRequest.from_json(body)
        account_id = AccountId(signer.id)
        obj = self._owned_object(req.object_id, account_id)
        if obj.layout != req.layout:
            raise RemoteProtocolError("commit layout differs from the layout the object was placed with")
        happy = happy_for(obj.layout)
        if len(req.shares) < happy:
            raise PolicyError(f"{len(req.shares)} receipts given; committing a {obj.layout.k}-of-{obj.layout.n} "
                              f"object needs at least {happy}", status=422)
        rows = {s.share_id: s for s in self.db.shares_of(obj.object_id)}
        grants_used = []
        for c in req.shares:
            row = rows.get(c.share_id)
            if row is None or row.idx != c.index:
                raise RemoteProtocolError(f"share {c.index} ({c.share_id[:16]}…) was never placed for this object")
            if _roots_differ(row.root, c.merkle_root) or row.size != c.share_size:
                raise RemoteProtocolError(f"share {c.index}: root or size differs from the one placed")
            same_node = row.node_id == c.node_id
            receipt = self.check_receipt(c.receipt, share_id=c.share_id, account_id=account_id, size=row.size,
                                         root=c.merkle_root,
                                         already_committed=same_node and row.state in HEALTHY_SHARE_STATES)
            if not same_node:
                raise PolicyError(f"share {c.index} is now placed on node {row.node_id[:16]}…, not on node "
                                  f"{c.node_id[:16]}… that this receipt names (re-placed or repaired since): "
                                  "commit only receipts of the current placement", status=409)
            grants_used.append(receipt.grant_id)
        committed = {c.share_id for c in req.shares}
        unknown = [row for row in rows.values() if row.root == UNKNOWN_ROOT and row.share_id not in committed]
        if unknown and req.roots is None:
            raise PolicyError(f"share {unknown[0].idx} was placed without a root and is not committed: the commit "
                              "must name every share's root (roots), so that repair can rebuild it", status=422)
        for row in rows.values():
            if req.roots is not None and _roots_differ(row.root, req.roots[row.idx]):
                raise RemoteProtocolError(f"share {row.idx}: the root in roots differs from the one placed")
        final = {row.idx: row.node_id for row in rows.values() if row.state in HEALTHY_SHARE_STATES}
        final.update({c.index: c.node_id for c in req.shares})
        if len(set(final.values())) != len(final):
            raise PolicyError("two shares of this object would sit on one node; re-place one of them", status=409)
        with self.db.transaction():
            for c in req.shares:
                row = rows[c.share_id]
                state = row.state if row.state in HEALTHY_SHARE_STATES and row.node_id == c.node_id else "stored"
                self.db.put_share(ShareRow(row.share_id, row.object_id, row.idx, c.node_id, c.merkle_root,
                                           row.size, state), now)
            for row in unknown:  # placed without a root, never stored: repair rebuilds it against this one
                assert req.roots is not None
                self.db.put_share(replace(row, root=req.roots[row.idx]), now)
            self.db.mark_grants_used(grants_used)
            if obj.state == "pending":
                self.db.set_object_state(obj.object_id, "committed")
        return {"committed": True}

    # --- objects --------------------------------------------------------------------------------------------

    def _check_owner(self, obj: ObjectRow, account_id: str) -> None:
        if obj.account_id != account_id:
            raise ForbiddenError("this object belongs to another account")

    def _owned_object(self, object_id: ObjectId, account_id: str) -> ObjectRow:
        obj = self.db.object(object_id)
        if obj is None:
            raise RemoteProtocolError(f"no object {object_id[:16]}… at this mediator", status=404)
        self._check_owner(obj, account_id)
        return obj

    def object_status(self, signer: PublicKey, object_id: ObjectId) -> dict[str, Any]:
        obj = self._owned_object(object_id, signer.id)
        shares = self.db.shares_of(object_id)
        nodes = {n.node_id: n for n in self.db.nodes()}
        online = {n for n, row in nodes.items() if row.state == "online"}
        listed = []
        for s in shares:
            node = nodes.get(s.node_id)
            state = s.state if node is None or node.state == "online" or s.state not in HEALTHY_SHARE_STATES \
                else f"node_{node.state}"
            listed.append({"index": s.idx, "share_id": s.share_id, "node_id": s.node_id,
                           "node_url": node.url if node else "", "share_size": s.size, "state": state}
                          | ({} if s.root == UNKNOWN_ROOT else {"merkle_root": b64encode(s.root)}))
        return {"object_id": obj.object_id, "layout": layout_to_json(obj.layout), "shares": listed,
                "health": object_health(obj, shares, online).to_json()}

    def delete_object(self, signer: PublicKey, object_id: ObjectId, now: float) -> None:
        self._owned_object(object_id, signer.id)
        self.db.delete_object(object_id, now)

    def report(self, signer: PublicKey, object_id: ObjectId, body: object) -> dict[str, Any]:
        self._owned_object(object_id, signer.id)
        f = Fields(body, "report")
        share_id, node_id = parse_share_id(f.raw("share_id")), parse_node_id(f.raw("node_id"))
        f.str("problem", max_len=200)
        f.done()
        share = self.db.share(share_id)
        if share is None or share.object_id != object_id or share.node_id != node_id:
            raise RemoteProtocolError("no such share of this object on that node", status=404)
        self.out_of_turn.request(node_id)
        return {"scheduled": True, "node_id": node_id}

    # --- pointers -------------------------------------------------------------------------------------------

    def get_pointer(self, signer: PublicKey) -> dict[str, Any]:
        stored = self.db.pointer(signer.id)
        if stored is None:
            raise RemoteProtocolError("this account has no manifest pointer yet", status=404)
        return {"pointer": decode_object(stored[1].encode())}

    def put_pointer(self, signer: PublicKey, body: object, now: float) -> dict[str, Any]:
        f = Fields(body, "pointer request")
        envelope = Envelope.from_json(f.raw("pointer"), kind=ManifestPointer.KIND)
        f.done()
        pointer = ManifestPointer.open(envelope)
        if pointer.account_id != signer.id:
            raise ForbiddenError("the pointer must be signed by the account that stores it")
        self._admit_client(signer, 0)
        current = self.db.put_pointer(signer.id, signer.raw, pointer.version, envelope.to_bytes().decode("ascii"),
                                      now)
        if current is not None:
            raise PolicyError(f"pointer version conflict: current version is {current}, so the next must be "
                              f"{current + 1} (got {pointer.version}); fetch the latest pointer and merge",
                              status=409)
        return {"stored": True, "version": pointer.version}

    # --- payments (docs/payments.md) ------------------------------------------------------------------------

    async def account_with_balance(self, signer: PublicKey, now: float) -> dict[str, Any]:
        """``account`` plus balance fields. A deposit address is made only for accounts that have used us (no
        wallet key for every stranger's signature), but one already recorded (``fund-test-account``) is shown."""
        address, _out, _warned = self.db.account_billing(signer.id)
        if address is None and self.db.has_account(signer.id):
            address = await self.payments.deposit_address(signer.id)
        return {**self.account(signer), **self.payments.account_fields(signer.id, address, now)}

    def account_history(self, signer: PublicKey, limit: int = 100) -> dict[str, Any]:
        rows = self.db.postings(ledger.client_account(signer.id), limit)
        return {"postings": [posting_json(seq, p) for seq, p in rows]}

    def node_earnings(self, signer: PublicKey) -> dict[str, Any]:
        if self.db.node(signer.id) is None:
            raise RemoteProtocolError("this node has never announced itself to this mediator", status=404)
        return {"node_id": signer.id, **billing.node_earnings(self.db, self.settings, signer.id)}

    def ledger_report(self, signer: PublicKey) -> dict[str, Any]:
        if signer.id != self.id:
            raise ForbiddenError("the ledger is for this mediator's operator: sign with its identity key")
        return ledger_report(self.db)

    # --- status ---------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {"mediator_id": self.id, **self.db.counts()}


def posting_json(seq: int, p: ledger.Posting) -> dict[str, Any]:
    return {"seq": seq, "key": p.key, "kind": p.kind, "source": p.source, "dest": p.dest, "amount_msat": p.amount,
            "at": int(p.at), "memo": p.memo}


def ledger_report(db: MediatorDB, history: int = 20) -> dict[str, Any]:
    """Totals of the invariant (checked), every non-zero balance, recent postings and payout batches."""
    totals = db.ledger_totals(check=True)
    return {"invariant_holds": totals.holds, **totals.to_json(),
            "balances": {a: b for a, b in db.all_balances() if b and not a.startswith("world:")},
            "recent": [posting_json(seq, p) for seq, p in db.postings(limit=history)],
            "payout_batches": [{"batch_id": b[0], "state": b[1], "created_at": int(b[2]), "fee_sat": b[3],
                                "txid": b[4], "sent_at": None if b[5] is None else int(b[5]), "detail": b[6]}
                               for b in db.payout_batches(history)]}

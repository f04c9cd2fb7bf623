"""Storage audits as pure round logic: challenges, judging answers, retries, and reputation.

One audit of one node in one round is a :class:`NodeAudit` value. It starts with a fresh 32-byte nonce
(``os.urandom``) and every share the node must hold. Each answer moves shares from *pending* to *proven* or
*lost*; a node that does not answer, or answers only part, is asked again **with the same nonce and round**,
hence for the same leaves, so a slow node gains nothing by stalling (it cannot wait for an easier question).
After ``retries`` extra attempts the shares still pending count as unanswered.

Why each cheat fails:

* keeping only the Merkle tree: the answer must carry raw leaf bytes, which the verifier hashes itself;
* replaying an old answer: the nonce (and round id) differ, so every share in it is refused;
* answering for deleted shares: the leaves cannot be produced; a share listed as not held is lost.

Reputation is Laplace-smoothed: ``(passed + 1) / (passed + failed + 2)`` over whole rounds, so a new node
starts at 0.5. A round fails if any share is lost; a round in which the node never answered is *unreachable*:
it lowers the reputation like a failure but does not count towards disqualification, because outages are
handled by the offline timer (``node_offline_after``): shares of an offline node are repaired elsewhere, and
the node is welcome back. A node that keeps announcing itself never goes offline, though, so after
``UNRESPONSIVE_AFTER`` consecutive unreachable rounds it is *unresponsive*: its shares stop counting as healthy
(and are repaired elsewhere) and it gets no new ones, whatever it announces, until it answers a round again.
``disqualify_after`` consecutive failed rounds disqualify a node for good.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

from fincryptfs.core.challenge import NONCE_BYTES, verify_share_proof
from fincryptfs.core.errors import IntegrityError
from fincryptfs.core.ids import NodeId, ShareId
from fincryptfs.core.messages import Challenge, ProofResponse


@dataclass(frozen=True)
class AuditedShare:
    share_id: str
    root: bytes
    size: int
    price: int | None = None  # the node's price when the share was placed on it (None: unknown)


@dataclass(frozen=True)
class NodeAudit:
    """The state of one node's audit in one round."""

    mediator_id: str
    node_id: str
    round_id: int
    nonce: bytes
    leaves_per_share: int
    shares: Mapping[str, AuditedShare]
    pending: frozenset[str]
    proven: frozenset[str] = frozenset()
    lost: Mapping[str, str] = field(default_factory=dict)  # share id → reason
    attempts: int = 0
    answered: bool = False

    @property
    def challenge(self) -> Challenge:
        """The challenge for the shares still pending (same nonce every attempt, so the same leaves)."""
        return self.next_challenge(len(self.pending))

    def next_challenge(self, batch: int) -> Challenge:
        """At most ``batch`` pending shares: a node holding many shares is asked in several requests."""
        share_ids = tuple(ShareId(s) for s in sorted(self.pending)[:batch])
        return Challenge(NodeId(self.mediator_id), NodeId(self.node_id), self.round_id, self.nonce,
                         self.leaves_per_share, share_ids)


def start_audit(mediator_id: str, node_id: str, round_id: int, shares: Iterable[AuditedShare],
                leaves_per_share: int, nonce: bytes | None = None) -> NodeAudit:
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    by_id = {s.share_id: s for s in shares}
    return NodeAudit(mediator_id, node_id, round_id, nonce, leaves_per_share, by_id, frozenset(by_id))


def judge_response(audit: NodeAudit, response: ProofResponse, asked: Collection[str] | None = None
                   ) -> NodeAudit:
    """Apply one (signature-checked) answer: verified shares are proven, bad or missing ones lost.

    ``asked``: the shares this answer's challenge named (default: all pending). Only an answer that leaves some
    of them unanswered spends an attempt, so a node asked in batches is not penalised for the batching.
    """
    asked = audit.pending if asked is None else frozenset(asked)
    audit = replace(audit, answered=True)
    lost = dict(audit.lost)
    if (response.node_id, response.mediator_id, response.round_id, response.nonce) != (
            audit.node_id, audit.mediator_id, audit.round_id, audit.nonce):
        for share_id in audit.pending:
            lost[share_id] = "answer is for another round, node or mediator (replayed?)"
        return replace(audit, pending=frozenset(), lost=lost)
    proven = set(audit.proven)
    pending = set(audit.pending)
    for share_id in response.missing:
        if share_id in pending:
            pending.discard(share_id)
            lost[share_id] = "node says it does not hold the share"
    for proof in response.proofs:
        if proof.share_id not in pending:
            continue
        share = audit.shares[proof.share_id]
        pending.discard(proof.share_id)
        try:
            verify_share_proof(audit.nonce, share.share_id, share.root, share.size, audit.leaves_per_share, proof)
        except IntegrityError as exc:
            lost[proof.share_id] = str(exc)
        else:
            proven.add(proof.share_id)
    attempts = audit.attempts + (1 if any(s in pending for s in asked) else 0)
    return replace(audit, pending=frozenset(pending), proven=frozenset(proven), lost=lost, attempts=attempts)


def answers(challenge: Challenge, response: ProofResponse) -> bool:
    """Whether a (signature-checked) response is this very challenge's answer: same node, mediator, round, nonce."""
    return (response.node_id, response.mediator_id, response.round_id, response.nonce) == (
        challenge.node_id, challenge.mediator_id, challenge.round_id, challenge.nonce)


def forget(audit: NodeAudit, share_ids: Collection[str]) -> NodeAudit:
    """Leave out shares the node stopped being responsible for while the audit ran (repaired elsewhere, their
    object deleted): it was told to delete them, so saying it no longer holds one is no fault, and a verdict
    on them must not touch the share's record, which may now name another node."""
    gone = frozenset(share_ids) & audit.shares.keys()
    if not gone:
        return audit
    return replace(audit, shares={s: v for s, v in audit.shares.items() if s not in gone},
                   pending=audit.pending - gone, proven=audit.proven - gone,
                   lost={s: r for s, r in audit.lost.items() if s not in gone})


def missed(audit: NodeAudit) -> NodeAudit:
    """The node could not be reached or its answer was unusable: one attempt spent."""
    return replace(audit, attempts=audit.attempts + 1)


def is_finished(audit: NodeAudit, retries: int) -> bool:
    return not audit.pending or audit.attempts > retries


@dataclass(frozen=True)
class AuditOutcome:
    result: str  # passed | failed | unreachable
    proven: frozenset[str]
    lost: Mapping[str, str]
    unanswered: frozenset[str]
    bytes_proven: int
    priced: Mapping[int, int] = field(default_factory=dict)  # bytes proven by placement price (known ones)

    @property
    def detail(self) -> str:
        if self.result == "passed":
            return f"{len(self.proven)} shares proven"
        reasons = sorted(set(self.lost.values()))[:3]
        return (f"{len(self.proven)} proven, {len(self.lost)} lost, {len(self.unanswered)} unanswered"
                + (": " + "; ".join(reasons) if reasons else ""))


def outcome(audit: NodeAudit) -> AuditOutcome:
    """The verdict once finished. Unanswered shares of a node that answered count as lost."""
    bytes_proven = sum(audit.shares[s].size for s in audit.proven)
    priced: dict[int, int] = {}
    for share in (audit.shares[s] for s in audit.proven):
        if share.price is not None:
            priced[share.price] = priced.get(share.price, 0) + share.size
    if not audit.answered:
        return AuditOutcome("unreachable", audit.proven, dict(audit.lost), audit.pending, bytes_proven, priced)
    lost = dict(audit.lost)
    for share_id in audit.pending:
        lost[share_id] = "no answer for this share after every retry"
    result = "passed" if not lost else "failed"
    return AuditOutcome(result, audit.proven, lost, frozenset(), bytes_proven, priced)


OUT_OF_TURN_MIN_GAP = 60.0  # seconds: the least time between two out-of-turn audits of one node


def out_of_turn_gap(audit_period: float) -> float:
    """Out-of-turn audits of one node are at least a quarter audit period apart, and at least a minute."""
    return max(OUT_OF_TURN_MIN_GAP, audit_period / 4)


@dataclass
class OutOfTurnAudits:
    """Nodes that clients reported, to audit out of turn (in memory only).

    Each out-of-turn audit challenges every share the node holds, in a round of its own; were each report
    served at once, one client reporting in a loop would keep a node (and the mediator) auditing without end.
    So a node is audited out of turn at most once per ``gap``: reports that arrive sooner are coalesced into
    one audit when the gap is over, and a report of a node already waiting adds nothing."""

    gap: float
    requested: set[str] = field(default_factory=set)
    last: dict[str, float] = field(default_factory=dict)  # node → when its last out-of-turn audit started

    def request(self, node_id: str) -> None:
        self.requested.add(node_id)

    def take_due(self, now: float) -> list[str]:
        """The requested nodes whose gap is over, in order; they leave the queue and their gap starts now."""
        due = sorted(n for n in self.requested if n not in self.last or now >= self.last[n] + self.gap)
        self.requested.difference_update(due)
        self.last = {n: t for n, t in self.last.items() if now < t + self.gap} | {n: now for n in due}
        return due


@dataclass
class LossReports:
    """The shares each node says it found lost (missing or corrupt) in its current run (in memory only).

    A node counts what its reads, scrubs and start-up checks find lost, per run (``boot_id``), and announces the
    count. When it grows, or a new run starts with losses, the node is worth auditing out of turn: the audit
    proves which shares are gone and repair starts at once instead of at the next round (up to a period later).
    The node's word only schedules an audit; the audit decides, as for a client's report."""

    seen: dict[str, tuple[str, int]] = field(default_factory=dict)  # node → (boot id, count) last announced

    def note(self, node_id: str, boot_id: str | None, count: int) -> bool:
        """Record an announcement's count; True if it reports losses not announced before."""
        if boot_id is None:
            return False
        previous = self.seen.get(node_id)
        self.seen[node_id] = (boot_id, count)
        if previous is None or previous[0] != boot_id:
            return count > 0
        return count > previous[1]


UNRESPONSIVE_AFTER = 3  # consecutive unreachable rounds after which a node's shares stop counting as healthy


@dataclass(frozen=True)
class NodeVerdict:
    reputation: float
    counts_toward_disqualification: bool
    disqualify: bool
    unreachable_rounds: int = 0  # consecutive unreachable rounds, this one included (0 once it answers)
    unresponsive: bool = False  # its shares stop counting as healthy until it answers a round again


def reputation(passed: int, failed: int) -> float:
    return (passed + 1) / (passed + failed + 2)


def node_verdict(result: str, passed: int, failed: int, consecutive_failures: int,
                 disqualify_after: int, unreachable_rounds: int = 0,
                 unresponsive_after: int = UNRESPONSIVE_AFTER) -> NodeVerdict:
    """How one round's result changes a node's record (see the module docstring)."""
    if result == "passed":
        return NodeVerdict(reputation(passed + 1, failed), False, False)
    counts = result == "failed"
    disqualify = counts and consecutive_failures + 1 >= disqualify_after
    silent = unreachable_rounds + 1 if result == "unreachable" else 0
    return NodeVerdict(reputation(passed, failed + 1), counts, disqualify, silent, silent >= unresponsive_after)

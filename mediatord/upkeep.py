"""The mediator's periodic work over the network: audit rounds, repairs, share releases, offline detection.

Each function does one pass and returns what it did, so tests call a pass directly and the daemon calls them
in loops. Protocol decisions live in the pure modules (:mod:`.audit`, :mod:`.repair`, :mod:`.placement`);
this module only moves bytes and records results. CPU work (proof checking, Merkle trees, zfec) runs in
threads under one CapacityLimiter.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import trio

from fincryptfs.core.errors import FincryptError, IntegrityError, ProtocolError
from fincryptfs.core.identity import PublicKey
from fincryptfs.core.layout import ObjectLayout
from fincryptfs.core.merkle import HASH_BYTES, LEAF_SIZE, verify_run
from fincryptfs.core.messages import ProofResponse, StorageReceipt
from fincryptfs.core.wire import Envelope, Fields, b64decode, decode_object
from fincryptfs.rpc import PeerError, call, read_at_most

from . import audit as audit_logic
from . import registry
from .db import HEALTHY_SHARE_STATES, NodeRow, ShareRow
from .placement import place_shares, subnet_of
from .repair import plan_repair, rebuild_range, segment_batches, share_range
from .service import MediatorService, object_health, repair_threshold

log = logging.getLogger(__name__)
CPU = trio.CapacityLimiter(2)
MAX_RELEASE_ATTEMPTS = 30
AUDIT_CONCURRENCY = 32  # nodes challenged at once: bounds memory held in proof responses
CHALLENGE_BATCH = 10_000  # shares per challenge request: one leaf each makes an answer of about 41 MB


@dataclass(frozen=True)
class UpkeepSettings:
    """Derived timings: short audit periods (tests) shrink timeouts and retry gaps with them.

    ``request_timeout`` bounds each read (httpx's timeouts are per read); ``exchange_deadline`` bounds a whole
    request and its answer, so that a node sending its answer a byte at a time (never pausing long enough for a
    per-read timeout) cannot hold up an audit round, a repair or the releases, which run one after another."""

    retry_delay: float
    request_timeout: float
    disqualify_after: int

    @property
    def exchange_deadline(self) -> float:
        return 2 * self.request_timeout

    def transfer_deadline(self, nbytes: int) -> float:
        """For an exchange carrying ``nbytes``: the above plus one second per MIN_TRANSFER_RATE bytes."""
        return self.exchange_deadline + nbytes / MIN_TRANSFER_RATE

    @classmethod
    def from_service(cls, service: MediatorService) -> UpkeepSettings:
        period = service.settings.audit_period
        return cls(retry_delay=min(30.0, period / 10), request_timeout=min(60.0, max(2.0, period)),
                   disqualify_after=service.settings.disqualify_after)


MIN_TRANSFER_RATE = 64 * 1024  # bytes/s below which a node is given up on, whatever its per-read pace
MAX_SMALL_ANSWER = 65536  # a node's answer to a DELETE or a PUT (a signed receipt is about 1 KB)


def _max_proof_bytes(share_count: int, leaves: int) -> int:
    per_leaf = 11 + LEAF_SIZE + HASH_BYTES * 64
    return 200 + share_count * (34 + leaves * per_leaf)


# --- audits -------------------------------------------------------------------------------------------------


async def audit_round(service: MediatorService, client: httpx.AsyncClient, now: float
                      ) -> dict[str, audit_logic.AuditOutcome]:
    """Challenge every online (or unresponsive) node holding shares, concurrently; record each outcome."""
    db = service.db
    round_id = service.new_round_id()
    results: dict[str, audit_logic.AuditOutcome] = {}
    limiter = trio.CapacityLimiter(AUDIT_CONCURRENCY)
    async with trio.open_nursery() as nursery:
        for node_id in db.audit_node_ids():
            nursery.start_soon(_audit_node, service, client, node_id, round_id, now, results, limiter)
    return results


async def requested_audits(service: MediatorService, client: httpx.AsyncClient, now: float
                           ) -> dict[str, audit_logic.AuditOutcome]:
    """Audit, out of turn and each in a round of its own, the nodes clients reported problems with: those not
    audited out of turn in the last gap (:class:`mediatord.audit.OutOfTurnAudits`); the others wait for it."""
    results: dict[str, audit_logic.AuditOutcome] = {}
    for node_id in service.out_of_turn.take_due(now):
        node, shares = service.db.node(node_id), service.db.audit_shares(node_id)
        if node is not None and node.state in ("online", "unresponsive") and shares:
            results[node_id] = await audit_node(service, client, node, service.new_round_id(), shares, now)
    return results


async def _audit_node(service: MediatorService, client: httpx.AsyncClient, node_id: str, round_id: int,
                      now: float, results: dict[str, audit_logic.AuditOutcome], limiter: trio.CapacityLimiter
                      ) -> None:
    async with limiter:
        node = service.db.node(node_id)
        shares = service.db.audit_shares(node_id)
        if node is not None and shares:
            results[node_id] = await audit_node(service, client, node, round_id, shares, now)
        elif node is not None and node.state == "unresponsive":
            await probe_node(service, client, node, round_id, now)


async def probe_node(service: MediatorService, client: httpx.AsyncClient, node: NodeRow, round_id: int,
                     now: float) -> bool:
    """Ask an unresponsive node that holds no shares any more an empty challenge; True if it answered.

    Its shares were moved away, so no audit would ever ask it again: a signed answer to this round and nonce is
    the answered round that makes it online (and eligible for new shares) again. No reputation changes: there
    was nothing to prove."""
    challenge = audit_logic.start_audit(service.id, node.node_id, round_id, (), 1).challenge
    try:
        timing = UpkeepSettings.from_service(service)
        response = await call(client, "POST", f"{node.url}/v1/challenges", key=service.key, json=challenge.to_json(),
                              timeout=timing.request_timeout, max_answer=_max_proof_bytes(0, 1),
                              deadline=timing.exchange_deadline)
        proof = _decode_proof(response.content, PublicKey(node.public_key), _max_proof_bytes(0, 1))
    except (PeerError, ProtocolError) as exc:
        log.info("unresponsive node %s still does not answer: %s", node.node_id[:16], exc)
        return False
    if not audit_logic.answers(challenge, proof):
        log.info("unresponsive node %s answered another challenge than this round's", node.node_id[:16])
        return False
    service.db.touch_node(node.node_id, now)
    log.info("node %s answers audits again: online", node.node_id[:16])
    return True


async def audit_node(service: MediatorService, client: httpx.AsyncClient, node: NodeRow, round_id: int,
                     shares: list[ShareRow], now: float) -> audit_logic.AuditOutcome:
    """One node's audit in one round: challenge, re-ask what is pending, judge, record."""
    timing = UpkeepSettings.from_service(service)
    settings = service.settings
    state = audit_logic.start_audit(service.id, node.node_id, round_id,
                                    (audit_logic.AuditedShare(s.share_id, s.root, s.size, s.price) for s in shares),
                                    settings.audit_leaves_per_share)
    service.db.start_round(round_id, node.node_id, state.nonce, now)
    key = PublicKey(node.public_key)
    while not audit_logic.is_finished(state, settings.audit_retries):
        challenge = state.next_challenge(CHALLENGE_BATCH)
        limit = _max_proof_bytes(len(challenge.share_ids), challenge.leaves_per_share)
        try:
            response = await call(client, "POST", f"{node.url}/v1/challenges", key=service.key, audience=node.node_id,
                                  json=challenge.to_json(), timeout=timing.request_timeout, max_answer=limit,
                                  deadline=timing.transfer_deadline(limit))
            proof = await trio.to_thread.run_sync(_decode_proof, response.content, key, limit, limiter=CPU)
        except (PeerError, ProtocolError) as exc:
            log.info("audit of node %s, attempt %d: %s", node.node_id[:16], state.attempts + 1, exc)
            state = audit_logic.missed(state)
            if not audit_logic.is_finished(state, settings.audit_retries):
                await trio.sleep(timing.retry_delay)
            continue
        state = await trio.to_thread.run_sync(audit_logic.judge_response, state, proof, challenge.share_ids,
                                              limiter=CPU)
    # no await from here to the record: a repair or delete cannot move a share in between
    state = audit_logic.forget(state, state.shares.keys() - service.db.share_ids_on(node.node_id))
    result = audit_logic.outcome(state)
    already = frozenset(s.share_id for s in shares if s.state == "proven")
    apply_outcome(service, node, round_id, state.answered, result, timing.disqualify_after, now, already)
    return result


def _decode_proof(data: bytes, key: PublicKey, limit: int) -> ProofResponse:
    return ProofResponse.decode(data, key, max_bytes=limit)


def apply_outcome(service: MediatorService, node: NodeRow, round_id: int, answered: bool,
                  result: audit_logic.AuditOutcome, disqualify_after: int, now: float,
                  already_proven: frozenset[str] = frozenset()) -> None:
    """Record a finished audit; shares already proven are not rewritten (steady-state rounds write little)."""
    db = service.db
    fresh = db.node(node.node_id) or node
    verdict = audit_logic.node_verdict(result.result, fresh.passed, fresh.failed, fresh.consecutive_failures,
                                       disqualify_after, fresh.unreachable_rounds)
    with db.transaction():
        db.finish_round(round_id, node.node_id, result.result, result.detail, now)
        db.set_share_states(sorted(result.proven - already_proven), "proven", now, node.node_id)
        db.set_share_states(sorted(result.lost), "lost", now, node.node_id)
        db.record_node_outcome(node.node_id, passed=result.result == "passed",
                               counts_toward_disqualification=verdict.counts_toward_disqualification,
                               reputation=verdict.reputation, disqualify=verdict.disqualify,
                               unreachable_rounds=verdict.unreachable_rounds, unresponsive=verdict.unresponsive)
        if result.result == "passed":
            db.record_pass(round_id, node.node_id, len(result.proven), result.bytes_proven, now, result.priced)
        if answered:
            db.touch_node(node.node_id, now)
    if verdict.unresponsive and fresh.state == "online":
        log.warning("node %s announces itself but did not answer %d audit rounds in a row: its shares no longer "
                    "count as healthy and will be repaired elsewhere until it answers again", node.node_id[:16],
                    verdict.unreachable_rounds)
    if verdict.disqualify:
        log.warning("node %s disqualified after %d consecutive failed audits; its shares will be repaired",
                    node.node_id[:16], disqualify_after)


# --- offline detection and releases -------------------------------------------------------------------------


def offline_pass(service: MediatorService, now: float) -> list[str]:
    gone = registry.mark_offline(service.db, now, service.settings.node_offline_after)
    for node_id in gone:
        log.info("node %s is offline (unseen for %g s)", node_id[:16], service.settings.node_offline_after)
    return gone


STALE_UPLOAD_AFTER = 86400.0  # an upload not committed a day after its grants expired is abandoned


def sweep_stale_uploads(service: MediatorService, now: float) -> tuple[int, int]:
    """Abandoned uploads (a client killed mid-upload, a share re-placed elsewhere): their possibly stored
    shares are queued for release and their pending objects forgotten, so nodes do not keep unpaid bytes
    forever. A day of margin after the grants expired lets a slow upload still commit."""
    grants, objects = service.db.sweep_stale_uploads(now - STALE_UPLOAD_AFTER, now)
    if grants or objects:
        log.info("swept abandoned uploads: %d grants (shares queued for release), %d pending objects", grants,
                 objects)
    return grants, objects


async def release_pass(service: MediatorService, client: httpx.AsyncClient, now: float) -> int:
    """Tell nodes to delete released shares; failures are retried with backoff. Returns releases done."""
    db = service.db
    done = 0
    for share_id, node_id, attempts in db.due_releases(now):
        node = db.node(node_id)
        if node is None:
            db.release_done(share_id, node_id)
            continue
        current = db.share(share_id)
        if current is not None and current.node_id == node_id and current.state != "lost":
            # queued when the share left this node, retried while it was away: the share has been placed on
            # it again since, so the copy there now is the one the record names (deleting it loses it)
            log.info("release of share %s on node %s dropped: the share is placed there again", share_id[:16],
                     node_id[:16])
            db.release_done(share_id, node_id)
            continue
        try:
            timing = UpkeepSettings.from_service(service)
            await call(client, "DELETE", f"{node.url}/v1/shares/{share_id}", key=service.key, audience=node.node_id,
                       timeout=timing.request_timeout, max_answer=MAX_SMALL_ANSWER, deadline=timing.exchange_deadline)
        except PeerError as exc:
            if exc.status == 404 or attempts + 1 >= MAX_RELEASE_ATTEMPTS:
                db.release_done(share_id, node_id)
            else:
                db.release_retry(share_id, node_id, now + min(3600.0, 2.0 ** attempts))
            continue
        db.release_done(share_id, node_id)
        done += 1
    return done


# --- repair -------------------------------------------------------------------------------------------------


async def repair_pass(service: MediatorService, client: httpx.AsyncClient, now: float) -> dict[str, str]:
    """Check every committed object; repair those below the threshold. Returns object id → action taken."""
    db = service.db
    actions: dict[str, str] = {}
    online = service.online_node_ids()
    disqualified = {n.node_id for n in db.nodes("disqualified")}
    for object_id in db.objects_needing_attention():
        obj = db.object(object_id)
        if obj is None:
            continue
        shares = db.shares_of(object_id)
        healthy = [s.idx for s in shares if s.state in HEALTHY_SHARE_STATES and s.node_id in online]
        plan = plan_repair(obj.layout, healthy, repair_threshold(obj.layout, service.settings.min_expansion),
                           evict=any(s.node_id in disqualified for s in shares))
        if plan.action == "irreparable":
            if obj.state != "irreparable":
                log.error("ALERT object %s is irreparable: %d of %d shares left, %d needed", object_id[:16],
                          len(healthy), obj.layout.n, obj.layout.k)
                db.set_object_state(object_id, "irreparable")
                db.record_repair(object_id, "irreparable", 0, f"{len(healthy)} healthy shares", now)
            actions[object_id] = "irreparable"
            continue
        if obj.state == "irreparable":
            log.warning("object %s recovered: %d shares reachable again", object_id[:16], len(healthy))
            db.set_object_state(object_id, "committed")
        if plan.action == "repair":
            actions[object_id] = await repair_object(service, client, object_id, now)
    return actions


REPAIR_STEP_BYTES = 4 * 2**20  # bytes of each share per repair step: bounds a repair's memory, not its size


class _RepairFailed(Exception):
    """A repair attempt cannot finish (too few readable sources); the reason is recorded, the next pass retries."""


async def _read_range(service: MediatorService, client: httpx.AsyncClient, share: ShareRow, start: int, end: int
                      ) -> bytes:
    """Bytes [start, end) of ``share``, read as whole leaves with their Merkle proof and checked against the
    root recorded at commit (PeerError if the node cannot answer, IntegrityError if the bytes are wrong)."""
    node = service.db.node(share.node_id)
    if node is None:
        raise PeerError(f"node {share.node_id[:16]} is not registered")
    first = start // LEAF_SIZE
    count = max(1, -(-end // LEAF_SIZE) - first)
    timing = UpkeepSettings.from_service(service)
    response = await call(client, "GET", f"{node.url}/v1/shares/{share.share_id}?first_leaf={first}&leaf_count="
                          f"{count}", key=service.key, audience=node.node_id, timeout=timing.request_timeout,
                          max_answer=count * LEAF_SIZE, deadline=timing.transfer_deadline(count * LEAF_SIZE))
    try:
        proof_raw = b64decode(response.headers.get("fincrypt-proof", ""), field="fincrypt-proof header",
                              max_length=128 * HASH_BYTES)
    except ProtocolError as exc:
        raise IntegrityError(f"node {share.node_id[:16]} sent a malformed proof: {exc}") from exc
    if len(proof_raw) % HASH_BYTES:
        raise IntegrityError(f"node {share.node_id[:16]} sent a proof that is not a whole number of hashes")
    proof = [proof_raw[at:at + HASH_BYTES] for at in range(0, len(proof_raw), HASH_BYTES)]
    data = response.content
    await trio.to_thread.run_sync(verify_run, share.root, share.size, first, count, data, proof, limiter=CPU)
    return data[start - first * LEAF_SIZE:end - first * LEAF_SIZE]


class _Sources:
    """The k shares a repair reads from; one that fails is replaced by the next healthy candidate (any k shares
    rebuild the same bytes, and each step reads a self-contained range, so a swap needs no rewind)."""

    def __init__(self, service: MediatorService, client: httpx.AsyncClient, candidates: list[ShareRow], k: int,
                 now: float) -> None:
        self.service, self.client, self.k, self.now = service, client, k, now
        self.waiting = list(candidates)
        self.active: list[ShareRow] = []
        self.failures: list[str] = []

    async def read(self, start: int, end: int) -> dict[int, bytes]:
        got: dict[int, bytes] = {}
        while len(got) < self.k:
            while len(self.active) < self.k and self.waiting:
                self.active.append(self.waiting.pop(0))
            pending = [s for s in self.active if s.idx not in got]
            if not pending:
                raise _RepairFailed(f"only {len(got)} of {self.k} shares could be read: "
                                    + "; ".join(self.failures[-3:]))

            async def one(share: ShareRow) -> None:
                try:
                    got[share.idx] = await _read_range(self.service, self.client, share, start, end)
                except PeerError as exc:
                    self._drop(share, f"share {share.idx}: {exc}")
                except IntegrityError as exc:
                    log.warning("repair: share %s on node %s does not match its root (%s); marked lost",
                                share.share_id[:16], share.node_id[:16], exc)
                    self.service.db.set_share_states([share.share_id], "lost", self.now, share.node_id)
                    self._drop(share, f"share {share.idx} is corrupt")
            async with trio.open_nursery() as nursery:
                for share in pending:
                    nursery.start_soon(one, share)
        return got

    def _drop(self, share: ShareRow, reason: str) -> None:
        log.info("repair: %s", reason)
        self.failures.append(reason)
        self.active.remove(share)


async def _put_stream(service: MediatorService, client: httpx.AsyncClient, url: str, node_id: str,
                      grant_header: str, share: ShareRow, account_id: str, chunks: trio.MemoryReceiveChannel[bytes],
                      receipts: dict[int, StorageReceipt], unmatched: list[tuple[str, str]]) -> None:
    """One rebuilt share, streamed to its new node as the steps produce it; its receipt lands in ``receipts``.

    A node that stored the share but whose receipt no longer matches a grant (the object was deleted meanwhile,
    taking its grants along) goes to ``unmatched``: its copy is released rather than left unaccounted for.
    """
    timing = UpkeepSettings.from_service(service)
    answer_by = trio.CancelScope()  # its deadline starts once the share's last byte is sent

    async def body() -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk
        answer_by.deadline = trio.current_time() + timing.exchange_deadline

    async with chunks:
        try:
            with answer_by:
                async with client.stream("PUT", url, content=body(), timeout=timing.request_timeout,
                                         headers={"fincrypt-grant": grant_header, "content-length": str(share.size),
                                                  "content-type": "application/octet-stream"}) as response:
                    answer, whole = await read_at_most(response, MAX_SMALL_ANSWER)
            if answer_by.cancelled_caught:
                raise PeerError(f"no answer within {timing.exchange_deadline:g} s of the share's last byte")
            if response.status_code != 201:
                raise PeerError(f"{response.status_code} {answer[:200].decode('utf-8', 'replace')}",
                                response.status_code)
            if not whole:
                raise PeerError(f"an answer longer than {MAX_SMALL_ANSWER} bytes")
        except (httpx.HTTPError, httpx.InvalidURL, PeerError) as exc:
            log.info("repair: node at %s refused share %s: %s", url, share.share_id[:16], exc)
            return
        try:
            receipts[share.idx] = service.check_receipt(_receipt_envelope(answer), share_id=share.share_id,
                                                        account_id=account_id, size=share.size, root=share.root)
        except (PeerError, ProtocolError) as exc:
            log.info("repair: node at %s stored share %s but its receipt does not match (%s); releasing it", url,
                     share.share_id[:16], exc)
            unmatched.append((share.share_id, node_id))


async def repair_object(service: MediatorService, client: httpx.AsyncClient, object_id: str, now: float) -> str:
    """Rebuild an object's missing shares on new nodes, streaming; aborts cleanly if the object changes."""
    db = service.db
    obj = db.object(object_id)
    if obj is None:
        return "aborted"
    layout: ObjectLayout = obj.layout
    online = service.online_node_ids()
    shares = db.shares_of(object_id)
    healthy = [s for s in shares if s.state in HEALTHY_SHARE_STATES and s.node_id in online]
    healthy.sort(key=lambda s: (s.state != "proven", s.idx))
    by_index = {s.idx: s for s in shares}
    healthy_idx = {s.idx for s in healthy}
    wanted = [i for i in range(layout.n) if i not in healthy_idx and i in by_index]
    if len(healthy) < layout.k:
        db.record_repair(object_id, "failed", 0, f"only {len(healthy)} of {layout.k} shares are reachable", now)
        return "failed"
    nodes = {n.node_id: n for n in db.nodes()}
    holding = {s.node_id for s in healthy}
    # a node whose old copy of one of these shares is still to be released holds it yet: it would refuse that
    # share (409), and a new share of the object would sit next to the stale one
    stale = db.releasing_nodes([s.share_id for s in shares])
    try:
        chosen = place_shares(
            registry.candidates(db, service.pricing, now, service.node_rule), len(wanted), layout.share_size,
            exclude=holding | stale | {by_index[i].node_id for i in wanted},
            used_operators={nodes[h].operator for h in holding if h in nodes},
            used_subnets={sn for h in holding if h in nodes if (sn := subnet_of(nodes[h].url)) is not None},
            min_reputation=service.node_rule.min_reputation)
    except FincryptError as exc:
        db.record_repair(object_id, "failed", 0, str(exc), now)
        return "failed"
    sources = _Sources(service, client, healthy, layout.k, now)
    receipts: dict[int, StorageReceipt] = {}
    targets: dict[int, tuple[str, int]] = {}  # index → (node, its price when placed)
    unmatched: list[tuple[str, str]] = []
    failure: str | None = None
    async with trio.open_nursery() as nursery:
        senders: dict[int, trio.MemorySendChannel[bytes]] = {}
        for index, target in zip(wanted, chosen, strict=True):
            share = by_index[index]
            grant = service.issue_grant(target.node_id, obj.account_id, share.share_id, share.size, share.root, now)
            send, receive = trio.open_memory_channel[bytes](1)
            senders[index], targets[index] = send, (target.node_id, target.price)
            nursery.start_soon(_put_stream, service, client, f"{target.url}/v1/shares/{share.share_id}",
                               target.node_id, grant.to_header(), share, obj.account_id, receive, receipts, unmatched)
        try:
            for segments in segment_batches(layout, REPAIR_STEP_BYTES):
                start, end = share_range(layout, segments)
                data = await sources.read(start, end)
                rebuilt = await trio.to_thread.run_sync(rebuild_range, layout, data, segments, wanted, limiter=CPU)
                for index in list(senders):
                    try:
                        await senders[index].send(rebuilt[index])
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        del senders[index]  # that node gave up; the others go on
                if not senders:
                    break
        except (_RepairFailed, FincryptError) as exc:
            failure = str(exc)
            nursery.cancel_scope.cancel()  # no half share is left uploading
        finally:
            for send in senders.values():
                send.close()
    for share_id, node_id in unmatched:
        db.queue_release(share_id, node_id, now)
    if failure is not None:
        db.record_repair(object_id, "failed", 0, failure, now)
        return "failed"
    stored: list[tuple[ShareRow, tuple[str, int]]] = []
    for index, receipt in sorted(receipts.items()):
        db.mark_grants_used([receipt.grant_id])
        stored.append((by_index[index], targets[index]))
    return _finish_repair(service, object_id, stored, len(wanted), now)


def _receipt_envelope(answer: bytes) -> Envelope:
    f = Fields(decode_object(answer), "upload answer")
    envelope = Envelope.from_json(f.raw("receipt"), kind=StorageReceipt.KIND)
    f.done()
    return envelope


def _finish_repair(service: MediatorService, object_id: str, stored: list[tuple[ShareRow, tuple[str, int]]],
                   wanted: int, now: float) -> str:
    """Move the repaired shares in one transaction, unless the object was deleted or changed meanwhile."""
    db = service.db
    with db.transaction():
        current = {s.share_id: s for s in db.shares_of(object_id)}
        if db.object(object_id) is None or any(
                current.get(s.share_id) is None or current[s.share_id].node_id != s.node_id for s, _ in stored):
            for share, (node_id, _price) in stored:
                db.queue_release(share.share_id, node_id, now)
            db.record_repair(object_id, "aborted", 0, "object deleted or changed during repair", now)
            return "aborted"
        for share, (node_id, price) in stored:
            db.put_share(ShareRow(share.share_id, object_id, share.idx, node_id, share.root, share.size, "stored",
                                  price), now)
            db.queue_release(share.share_id, share.node_id, now)
        result = "repaired" if len(stored) == wanted else "partial"
        db.record_repair(object_id, result, len(stored), f"{len(stored)} of {wanted} shares rebuilt", now)
    return result


__all__ = ["apply_outcome", "audit_round", "object_health", "offline_pass", "release_pass", "repair_object",
           "repair_pass", "sweep_stale_uploads"]

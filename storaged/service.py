"""The storage node's logic: accept shares against grants, serve ranges, prove storage, release, announce, scrub.

HTTP stays in app.py; this module sees parsed values, signer ids and body streams. Blocking work (file writes,
fsync, hashing, proving, SQLite commits) runs in worker threads under CapacityLimiters, with upload threads and
proof threads limited separately so that a crowd of uploads never starves a challenge.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import httpx
import trio

from fincryptfs import rpc
from fincryptfs.core.errors import (
    AuthError,
    ConfigError,
    ForbiddenError,
    IntegrityError,
    PolicyError,
    RemoteProtocolError,
    ReplayError,
    TooLargeError,
)
from fincryptfs.core.identity import PublicKey, SigningKey
from fincryptfs.core.ids import NodeId, ShareId, parse_node_id, parse_share_id
from fincryptfs.core.merkle import LEAF_SIZE, TreeFileChecker, leaf_count
from fincryptfs.core.messages import Challenge, NodeAnnouncement, StorageReceipt, UploadGrant
from fincryptfs.core.settings import StorageSettings
from fincryptfs.core.wire import Envelope, ReplayGuard, SignedRequest, decode_object, origin_of

from .db import STATE_CORRUPT, STATE_MISSING, STATE_OK, NodeDatabase, ShareRecord, TrustedMediator
from .earnings import Earnings, render_metrics
from .prover import OpenShare, ProvableShare, answer_challenge
from .store import ShareFolder, ShareStore, ShareWriter, read_exact, tree_file_size

log = logging.getLogger(__name__)

UPLOAD_FLUSH_BYTES = 1 << 20  # bytes held per upload before a worker thread writes + hashes them (one hop per MiB)
STREAM_CHUNK_BYTES = 1 << 20
MAX_CHALLENGE_BYTES = 8 << 20  # 100,000 share ids fit
MISSING_LOGGED_PER_FOLDER = 5  # share ids named in the log at start, per folder; then one line with the count
LOSS_ANNOUNCE_GAP = 10.0  # seconds between announcements made early because a share was found lost
# A mediator's answer to an announcement (its key and this node's earnings: a few KB) is read up to this many
# bytes and within this many seconds, however it is paced: a mediator found in the DHT may be anyone's.
ANNOUNCE_ANSWER_BYTES = 1 << 20
ANNOUNCE_DEADLINE = 60.0
FOLDER_CHECK_SECONDS = 30.0  # how often the share folders are looked at when no request does


_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def storage_failure(exc: OSError | sqlite3.OperationalError) -> PolicyError:
    """What to answer when storing a share failed on this node's side: 507 when the disk (or quota) is full, 503
    for any other I/O error. The uploader can place the share elsewhere; the operator finds the details in the
    log. Never a 500: the client did nothing wrong."""
    if isinstance(exc, OSError):
        code = errno.errorcode.get(exc.errno or 0, "EIO")
        full = exc.errno in _DISK_FULL
    else:
        code, full = "database error", "full" in str(exc)
    if full:
        return PolicyError(f"this node ran out of disk space while storing the share ({code}); nothing was kept: "
                           "store it on another node", status=507)
    return PolicyError(f"this node could not store the share because of a disk error ({code}); nothing was kept: "
                       "retry later or store it on another node", status=503)


@dataclass(frozen=True)
class ShareRead:
    """What a GET of a share answers: its size, the range proof (None for a whole share) and the bytes."""

    share_size: int
    proof: list[bytes] | None
    body: bytes
    stream: AsyncIterator[bytes] | None


class Metrics:
    """Counters for /metrics; gauges are read from the store and database when rendered."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.challenges_answered = 0
        self.scrub_corrupt = 0
        self.scrubbed_shares = 0
        self.announce_failures = 0

    def count_request(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1

    def render(self, shares: int, bytes_stored: int, free_bytes: int) -> str:
        lines = [
            "# TYPE storaged_bytes_stored gauge", f"storaged_bytes_stored {bytes_stored}",
            "# TYPE storaged_shares gauge", f"storaged_shares {shares}",
            "# TYPE storaged_free_bytes gauge", f"storaged_free_bytes {free_bytes}",
            "# TYPE storaged_requests_total counter",
        ]
        for (route, status), count in sorted(self.requests.items()):
            lines.append(f'storaged_requests_total{{route="{route}",status="{status}"}} {count}')
        lines += [
            "# TYPE storaged_challenges_answered_total counter",
            f"storaged_challenges_answered_total {self.challenges_answered}",
            "# TYPE storaged_scrub_corrupt_total counter", f"storaged_scrub_corrupt_total {self.scrub_corrupt}",
            "# TYPE storaged_scrubbed_shares_total counter",
            f"storaged_scrubbed_shares_total {self.scrubbed_shares}",
            "# TYPE storaged_announce_failures_total counter",
            f"storaged_announce_failures_total {self.announce_failures}",
        ]
        return "\n".join(lines) + "\n"


class StorageService:
    """One storage node. Built complete (no two-step wiring); ``advertised_url`` is known once bound."""

    def __init__(self, settings: StorageSettings, key: SigningKey, db: NodeDatabase, store: ShareStore, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.key = key
        self.node_id = NodeId(key.id)
        self.db = db
        self.store = store
        self.clock = clock
        self.metrics = Metrics()
        self.guard = ReplayGuard()
        self.advertised_url: str | None = settings.public_url
        # shares this run found lost (reads, scrubs, the start-up check): announced with a random id of the run,
        # so that the mediators audit this node out of turn and repair them without waiting for the next round
        self.boot_id = os.urandom(8).hex()
        self.shares_lost = 0
        self._loss_noted = trio.Event()
        known = db.trusted_mediators()  # oldest announcement first: the latest identity at a URL wins below
        # every mediator ever announced to: it may audit, read and release the shares it placed here
        self.trusted: dict[str, PublicKey] = {m.mediator_id: PublicKey.from_text(m.public_key) for m in known}
        # the current mediators, the only ones whose grants place new shares: URL → the id that answered there.
        # At start, the configured URLs' last known ids (so grants are accepted before the first announcement
        # answers); then whoever answers an announcement, to a configured URL or one found through the DHT.
        self._current: dict[str, str] = {m.url: m.mediator_id for m in known if m.url in settings.mediators}
        self._uploads = trio.Semaphore(settings.max_concurrent_uploads)
        self._upload_threads = trio.CapacityLimiter(4)
        self._proof_threads = trio.CapacityLimiter(1)
        self._scrub_threads = trio.CapacityLimiter(1)
        self._grants_in_flight: set[str] = set()
        self._shares_in_flight: dict[str, str] = {}  # share id being uploaded → the granting mediator's id
        self._shares_releasing: set[str] = set()
        self.announced = trio.Event()
        self.earnings: dict[str, Earnings] = {e.mediator_id: e for e in db.earnings()}

    # --- start-up -------------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Blocking start-up pass: remove leftovers, account stored bytes, flag rows whose files are gone and
        serve again those whose files are back (a disk that was away, a file restored by the operator)."""
        for recorded, key in self.store.aliases.items():  # so that the working directory never matters again
            self.db.rename_dir(recorded, key)
            log.info("share folder recorded as %s is now recorded as %s", recorded, key)
        known: set[str] = set()
        lost_in: Counter[str] = Counter()  # folder → shares found missing now: a lost disk is one line, not 10^5
        for record in self.db.iter_shares():
            known.add(record.share_id)
            self.store.account_existing(record.dir, record.size)
            if record.state == STATE_OK and not self.store.check_files(record.dir, record.share_id, record.size):
                lost_in[record.dir] += 1
                if lost_in[record.dir] <= MISSING_LOGGED_PER_FOLDER:
                    log.error("share files missing or wrong size share_id=%s dir=%s", record.share_id, record.dir)
                self.db.set_state(record.share_id, STATE_MISSING)
                self.shares_lost += 1  # announced from the first announcement on
            elif record.state == STATE_MISSING and self.store.check_files(record.dir, record.share_id, record.size):
                # the scrub and the audits check the bytes again; a share found corrupt stays corrupt
                log.warning("share files are back, serving the share again share_id=%s dir=%s", record.share_id,
                            record.dir)
                self.db.set_state(record.share_id, STATE_OK)
        for folder, count in lost_in.items():
            log.error("%d share(s) of folder %s are missing or damaged and now marked so: the mediators repair them "
                      "on other nodes%s", count, folder, "" if folder in self.store.by_key else
                      " (the folder is no longer in STORAGED_SHARE_DIRS: put it back if its disk still has them)")
        if self.db.node_id() is None:
            self._refuse_unknown_share_files(known)
            self.db.set_node_id(self.node_id)
        self.store.clean(known)
        pruned = self.db.prune_grants(int(self.clock()))
        if pruned:
            log.info("forgot expired grants count=%d", pruned)

    def _refuse_unknown_share_files(self, known: set[str]) -> None:
        """ConfigError if a database that no node has started with yet (deleted, replaced, or not the one of
        these share folders) meets share folders full of share files: the cleanup below would delete every one
        of them as files without a row. (A database that lists shares was written by a version that did not
        record its node: it is the node's own.)"""
        if known:
            return
        found = {folder: n for folder, n in self.store.count_share_files().items() if n}
        if found:
            folder, count = next(iter(found.items()))
            raise ConfigError(
                f"the node's database {self.db.path} is new and lists no shares, but share folder {folder} holds "
                f"{count} share files: the database was deleted or replaced, or STORAGED_DATA_DIR is not the folder "
                "it was (a disk not mounted?). Starting now would delete those files. Put the node's database back "
                "(with its node.key) and start again; to give those shares up for good, delete the two-character "
                "folders in the share folders: the mediators then repair the shares on other nodes")

    async def watch_folders(self) -> None:
        """Look at the share folders every FOLDER_CHECK_SECONDS, even when no request does: the operator hears at
        once of a disk that went away, and a disk that came back is used again without a restart."""
        while True:
            await trio.sleep(FOLDER_CHECK_SECONDS)
            await self.check_folders()

    async def check_folders(self) -> None:
        """Note which share folders cannot be used; serve again the shares of those that came back."""
        away = {f.key for f in self.store.folders if f.problem is not None}
        self.store.space()  # logs every change, with what to do
        back = {f.key for f in self.store.folders if f.key in away and f.problem is None}
        if back:
            await trio.to_thread.run_sync(self._serve_again, back)

    def _serve_again(self, folder_keys: set[str]) -> None:
        """Blocking: the shares of these folders marked missing (read while their disk was away) whose files are
        there again with the right sizes are held again, as at start (the scrub and the audits check the bytes)."""
        for record in self.db.iter_shares():
            if (record.state == STATE_MISSING and record.dir in folder_keys
                    and self.store.check_files(record.dir, record.share_id, record.size)):
                log.warning("share files are back, serving the share again share_id=%s dir=%s", record.share_id,
                            record.dir)
                self.db.set_state(record.share_id, STATE_OK)

    def audiences(self) -> frozenset[str]:
        """What a signed request to this node may be addressed to: its node id, or the origin of its URL."""
        return frozenset({self.node_id} | ({origin_of(self.advertised_url)} if self.advertised_url else set()))

    # --- mediators ------------------------------------------------------------------------------------------

    def trust_mediator(self, mediator_id: str, public_key: PublicKey, url: str) -> None:
        """The mediator at ``url`` (configured or found through the DHT) answered an announcement: accept its
        grants from now on, and its challenges, reads and releases for good (persisted)."""
        if public_key.id != mediator_id:
            raise RemoteProtocolError(f"mediator at {url} sent a public key that does not match its id")
        self.db.trust_mediator(TrustedMediator(mediator_id, public_key.to_text(), url), int(self.clock()))
        self.trusted[mediator_id] = public_key
        self._current[url] = mediator_id

    def is_current(self, mediator_id: str) -> bool:
        """Whether this mediator may place new shares here: it is configured (STORAGED_MEDIATORS) or was found
        through the DHT in this run. One dropped from the settings keeps only its hold on the shares it placed."""
        return mediator_id in self._current.values()

    def announcement(self) -> NodeAnnouncement:
        url = self.advertised_url or "http://{}:{}".format(*self.settings.listen)
        capacity = self.store.capacity_bytes()
        return NodeAnnouncement(self.node_id, url, self.settings.price, capacity,
                                min(capacity, self.store.free_bytes()), self.settings.operator,
                                self.settings.payout_address, self.boot_id, self.shares_lost)

    async def mark_lost(self, share_id: ShareId, state: str) -> None:
        """Mark a held share missing or corrupt, and announce it soon (``announce_loop``)."""
        await trio.to_thread.run_sync(self.db.set_state, share_id, state)
        self.shares_lost += 1
        self._loss_noted.set()  # wakes the announce loops waiting on it; later ones wait on a fresh event
        self._loss_noted = trio.Event()

    async def announce(self, client: httpx.AsyncClient, mediator_url: str) -> str:
        """Announce to one mediator and trust the key it answers with; returns its id. Raises PeerError."""
        answer = await rpc.call_json(client, "POST", f"{mediator_url}/v1/nodes/announce", key=self.key,
                                     json=self.announcement().to_json(), max_answer=ANNOUNCE_ANSWER_BYTES,
                                     deadline=ANNOUNCE_DEADLINE)
        try:
            mediator_id = parse_node_id(answer.get("mediator_id"))
            public_key = PublicKey.from_text(answer.get("public_key"))
            self.trust_mediator(mediator_id, public_key, mediator_url)
        except RemoteProtocolError as exc:
            raise rpc.PeerError(f"mediator {mediator_url} sent a malformed announce answer: {exc}") from exc
        log.info("announced mediator=%s mediator_id=%s", mediator_url, mediator_id[:16])
        if "earnings" in answer:
            self._record_earnings(mediator_id, mediator_url, answer["earnings"])
        self.announced.set()
        return mediator_id

    def _record_earnings(self, mediator_id: str, url: str, obj: object) -> None:
        """Keep the mediator's latest word on what we earned (written only when it changed)."""
        try:
            new = Earnings.from_answer(mediator_id, url, obj, int(self.clock()))
        except RemoteProtocolError as exc:
            log.warning("ignoring earnings mediator=%s error=%s", url, exc)
            return
        old = self.earnings.get(mediator_id)
        if old is None or replace(old, updated_at=new.updated_at) != new:
            self.db.set_earnings(new)
            if old is not None and new.paid_msat > old.paid_msat:
                log.info("paid by mediator=%s amount_msat=%d", mediator_id[:16], new.paid_msat - old.paid_msat)
        self.earnings[mediator_id] = new

    async def announce_all(self, client: httpx.AsyncClient) -> dict[str, str | None]:
        """Announce to every configured mediator once (tests call this); url → mediator id or None if failed."""
        results: dict[str, str | None] = {}
        for url in self.settings.mediators:
            try:
                results[url] = await self.announce(client, url)
            except rpc.PeerError as exc:
                self.metrics.announce_failures += 1
                log.warning("announce failed mediator=%s error=%s", url, exc)
                results[url] = None
        return results

    async def announce_loop(self, client: httpx.AsyncClient, mediator_url: str) -> None:
        """Re-announce every interval, and sooner (after LOSS_ANNOUNCE_GAP) once a share is found lost; failures
        back off exponentially (capped at the interval), never crash."""
        interval = self.settings.announce_interval
        delay = min(1.0, interval)
        while True:
            announced_lost = self.shares_lost
            try:
                await self.announce(client, mediator_url)
            except rpc.PeerError as exc:
                self.metrics.announce_failures += 1
                log.warning("announce failed mediator=%s retry_in=%.1fs error=%s", mediator_url, delay, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, interval)
                continue
            delay = min(1.0, interval)
            gap = min(LOSS_ANNOUNCE_GAP, interval)  # a scrub finding many in a row: one announcement per gap
            await trio.sleep(gap)
            if self.shares_lost == announced_lost:
                with trio.move_on_after(interval - gap):
                    await self._loss_noted.wait()

    def _mediator_key(self, mediator_id: str) -> PublicKey | None:
        return self.trusted.get(mediator_id)

    # --- upload ---------------------------------------------------------------------------------------------

    def check_grant(self, share_id: ShareId, grant_header: str | None) -> UploadGrant:
        """Open and authorise the grant of a PUT (401/403 as documented in docs/protocol.md)."""
        if not grant_header:
            raise AuthError("upload needs a fincrypt-grant header: ask the mediator for a grant")
        envelope = Envelope.from_header(grant_header, kind=UploadGrant.KIND)
        grant = UploadGrant.open(envelope)
        if self._mediator_key(grant.mediator_id) != envelope.signer:
            raise ForbiddenError(f"grant is signed by mediator {grant.mediator_id[:16]}…, which this node is not "
                                 "registered with")
        if not self.is_current(grant.mediator_id):
            raise ForbiddenError(f"grant is signed by mediator {grant.mediator_id[:16]}…, which is no longer one of "
                                 "this node's mediators (STORAGED_MEDIATORS, or found through the DHT): it may "
                                 "still audit, read and release the shares it placed here, but not place new ones")
        if grant.node_id != self.node_id:
            raise ForbiddenError(f"grant is for node {grant.node_id[:16]}…, not this node ({self.node_id[:16]}…)")
        if grant.share_id != share_id:
            raise ForbiddenError(f"grant is for share {grant.share_id[:16]}…, not {share_id[:16]}…")
        if grant.expires_at < self.clock():
            raise AuthError("upload grant has expired: ask the mediator for a new one")
        if grant.grant_id in self._grants_in_flight or self.db.grant_used(grant.grant_id):
            raise ReplayError("this upload grant was already used")
        return grant

    async def accept_upload(self, share_id_text: str, grant_header: str | None, content_length: int | None,
                            body: Callable[[int], AsyncIterator[bytes]]) -> Envelope:
        """Store one share sent as ``body`` against its grant; returns the signed receipt (after fsync)."""
        share_id = parse_share_id(share_id_text)
        grant = self.check_grant(share_id, grant_header)
        if content_length is not None and content_length > grant.share_size:
            raise TooLargeError(f"body of {content_length} bytes is larger than the grant's {grant.share_size}")
        if content_length is not None and content_length < grant.share_size:
            raise RemoteProtocolError(f"body of {content_length} bytes is smaller than the grant's "
                                      f"{grant.share_size}")
        if share_id in self._shares_in_flight:
            raise PolicyError("this share is being uploaded right now", status=409)
        if share_id in self._shares_releasing:
            raise PolicyError("this share is being deleted right now; retry shortly", status=409)
        if self.db.get_share(share_id) is not None:
            raise PolicyError("this node already holds this share", status=409)
        try:
            self._uploads.acquire_nowait()
        except trio.WouldBlock:
            raise PolicyError("node busy: too many uploads in progress; retry shortly", status=429) from None
        try:
            folder = self.store.reserve_space(grant.share_size)
            self._grants_in_flight.add(grant.grant_id)
            self._shares_in_flight[share_id] = grant.mediator_id
            try:
                stored = False
                try:
                    root = await self._receive(folder, grant, body)
                    stored = True
                except (OSError, sqlite3.OperationalError) as exc:
                    log.error("upload failed share_id=%s folder=%s error=%s", share_id, folder.root, exc)
                    raise storage_failure(exc) from exc
                finally:
                    self.store.release_reservation(folder, grant.share_size, stored=stored)
            finally:
                self._grants_in_flight.discard(grant.grant_id)
                self._shares_in_flight.pop(share_id, None)
        finally:
            self._uploads.release()
        log.info("share stored share_id=%s size=%d mediator=%s", share_id, grant.share_size,
                 grant.mediator_id[:16])
        receipt = StorageReceipt(self.node_id, grant.mediator_id, grant.account_id, share_id, grant.share_size,
                                 root, grant.grant_id, int(self.clock()))
        return receipt.seal(self.key)

    async def _receive(self, folder: ShareFolder, grant: UploadGrant,
                       body: Callable[[int], AsyncIterator[bytes]]) -> bytes:
        """Receive, check and durably store the share; its Merkle root (the grant's, when it names one)."""
        writer = await trio.to_thread.run_sync(ShareWriter, folder, grant.share_id, grant.grant_id)
        done = False
        try:
            await self._write_while_receiving(writer, body(grant.share_size))
            if writer.size != grant.share_size:
                raise RemoteProtocolError(f"body has {writer.size} bytes; the grant is for {grant.share_size}")
            root = await trio.to_thread.run_sync(self._finish_upload, writer, grant, folder.key,
                                                 limiter=self._upload_threads)
            done = True
            return root
        finally:
            if not done:
                writer.abort()

    async def _write_while_receiving(self, writer: ShareWriter, chunks: AsyncIterator[bytes]) -> None:
        """Receive the body while a worker thread writes and hashes the batch before (about a MiB each, in order):
        an upload keeps the network and the disk busy at once instead of taking turns."""
        batches, to_write = trio.open_memory_channel[list[bytes]](1)
        failure: BaseException | None = None

        async def write_batches() -> None:
            nonlocal failure
            async with to_write:  # closed on failure: the receiving side then stops at once
                async for batch in to_write:
                    try:
                        await trio.to_thread.run_sync(writer.write_chunks, batch, limiter=self._upload_threads)
                    except OSError as exc:  # e.g. the disk filled up
                        failure = exc
                        return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_batches)
            async with batches:
                pending: list[bytes] = []  # chunks as hypercorn delivered them: one writev, never joined
                held = 0
                try:
                    async for chunk in chunks:
                        pending.append(chunk)
                        held += len(chunk)
                        if held >= UPLOAD_FLUSH_BYTES:
                            await batches.send(pending)
                            pending, held = [], 0
                    if pending:
                        await batches.send(pending)
                except trio.BrokenResourceError:
                    pass  # the writer failed: raised below
                except Exception as exc:  # noqa: BLE001 - a bad body: raised as is below, not in a group
                    failure = exc
                    nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    def _finish_upload(self, writer: ShareWriter, grant: UploadGrant, folder_key: str) -> bytes:
        """Blocking and uncancellable: check the root, make the files durable, then commit the row."""
        root = writer.finish()
        if grant.merkle_root is not None and root != grant.merkle_root:
            raise RemoteProtocolError("share does not match its grant's Merkle root")
        record = ShareRecord(grant.share_id, grant.mediator_id, grant.account_id, grant.share_size, root,
                             folder_key, grant.grant_id, int(self.clock()), STATE_OK)
        paths = writer.folder.paths(grant.share_id)  # no row names this share (checked before the upload)
        try:
            writer.commit()
            self.db.add_share(record, grant.expires_at)
        except BaseException:
            for path in (paths.data, paths.tree):  # a commit that failed halfway may have renamed one of them
                path.unlink(missing_ok=True)
            raise
        return root

    # --- reads ----------------------------------------------------------------------------------------------

    def _held(self, share_id: ShareId) -> ShareRecord:
        record = self.db.get_share(share_id)
        if record is None:
            raise RemoteProtocolError("this node does not hold that share", status=404)
        if record.state != STATE_OK:
            raise RemoteProtocolError(f"this node's copy of the share is {record.state}", status=404)
        return record

    async def read_share(self, share_id_text: str, signed: SignedRequest, first_leaf: int | None,
                         count: int | None) -> ShareRead:
        """Bytes of a share (or of a leaf range, with its proof) for its account or its mediator."""
        share_id = parse_share_id(share_id_text)
        record = self._held(share_id)
        if signed.signer_id not in (record.account_id, record.mediator_id):
            raise ForbiddenError("only the share's account or its mediator may read it")
        self.guard.check(signed, self.clock())
        paths = self.store.paths(record.dir, share_id)
        if paths is None:
            raise RemoteProtocolError("this node's copy of the share is missing", status=404)
        total = leaf_count(record.size)
        if first_leaf is None or count is None:
            first, span, proof_wanted = 0, total, False
        else:
            first, span, proof_wanted = first_leaf, count, True
            if span < 1 or first + span > total:
                raise RemoteProtocolError(f"leaf range {first}+{span} outside the share's {total} leaves")
        try:
            opened = await trio.to_thread.run_sync(OpenShare, paths, record.size)
        except OSError as exc:
            raise await self._lost(share_id, exc) from exc
        streaming = False
        try:
            proof = opened.range_proof(first, span) if proof_wanted else None  # log2(leaves) small preads
            start = first * LEAF_SIZE
            end = min(record.size, (first + span) * LEAF_SIZE)
            if end - start <= STREAM_CHUNK_BYTES:
                data = await trio.to_thread.run_sync(opened.read_leaves, first, span)
                return ShareRead(record.size, proof, data, None)
            streaming = True
            return ShareRead(record.size, proof, b"", self._stream(share_id, opened, start, end))
        except OSError as exc:
            raise await self._lost(share_id, exc) from exc
        finally:
            if not streaming:
                opened.close()

    async def _lost(self, share_id: ShareId, exc: OSError) -> RemoteProtocolError:
        """A held share's files are gone or damaged: flag it missing (as a failed proof does) and answer 404.

        The mediators learn it from the next announcement (an out-of-turn audit proves it) and repair the share
        elsewhere; it is never served again.
        """
        log.error("share unreadable, marked missing share_id=%s error=%s", share_id, exc)
        await self.mark_lost(share_id, STATE_MISSING)
        self.store.space()  # a whole folder away? Noted (and logged) now, so its shares come back with it
        return RemoteProtocolError("this node's copy of the share is missing or damaged", status=404)

    async def _stream(self, share_id: ShareId, opened: OpenShare, start: int, end: int) -> AsyncIterator[bytes]:
        with opened:
            at = start
            while at < end:
                length = min(STREAM_CHUNK_BYTES, end - at)
                chunk = await trio.to_thread.run_sync(os.pread, opened.data_fd, length, at)
                if len(chunk) != length:  # shrunk since it was opened: too late for a 404, the answer is cut
                    await self._lost(share_id, OSError(errno.EIO, "share file shrank while being read"))
                    raise IntegrityError("share file is shorter than its record")
                at += length
                yield chunk

    # --- challenges -----------------------------------------------------------------------------------------

    async def prove(self, body: bytes, signed: SignedRequest) -> bytes:
        """Answer a challenge signed by a trusted mediator with the binary, node-signed ProofResponse."""
        signer_id = signed.signer_id
        if signer_id not in self.trusted:
            raise ForbiddenError("challenges are accepted only from mediators this node is registered with")
        self.guard.check(signed, self.clock())
        challenge = Challenge.from_json(decode_object(body, max_bytes=MAX_CHALLENGE_BYTES))
        if challenge.mediator_id != signer_id:
            raise ForbiddenError("challenge names a different mediator than the one that signed it")
        if challenge.node_id != self.node_id:
            raise ForbiddenError(f"challenge is for node {challenge.node_id[:16]}…, not this node")
        records = self.db.get_shares(set(challenge.share_ids))
        held = []
        for record in records.values():
            if record.mediator_id != signer_id or record.state != STATE_OK:
                continue
            paths = self.store.paths(record.dir, record.share_id)
            if paths is not None:
                held.append(ProvableShare(record.share_id, record.size, paths))
        unreadable: list[ShareId] = []
        answer = await trio.to_thread.run_sync(
            lambda: answer_challenge(challenge, held, self.node_id, self.key,
                                     lambda share_id, exc: unreadable.append(share_id)),
            limiter=self._proof_threads)
        for share_id in unreadable:
            await trio.to_thread.run_sync(self.db.set_state, share_id, STATE_MISSING)
        if unreadable:
            self.store.space()  # as in _lost
        self.metrics.challenges_answered += 1
        log.info("challenge answered round=%d shares=%d held=%d", challenge.round_id, len(challenge.share_ids),
                 len(held) - len(unreadable))
        return answer

    # --- release --------------------------------------------------------------------------------------------

    async def release(self, share_id_text: str, signed: SignedRequest) -> None:
        """Delete a share on the word of the mediator that granted it (row first, then files)."""
        share_id = parse_share_id(share_id_text)
        record = self.db.get_share(share_id)
        if record is None:
            if signed.signer_id in self.trusted:  # recorded, or a replay could delete a share stored later
                self.guard.check(signed, self.clock())
            if self._shares_in_flight.get(share_id) == signed.signer_id:
                # "gone" now would be a lie once the upload commits: the mediator retries the release later
                raise PolicyError("this share is being uploaded right now; retry the release when the upload "
                                  "has finished", status=409)
            return
        if signed.signer_id != record.mediator_id:
            raise ForbiddenError("only the mediator that granted a share may release it")
        self.guard.check(signed, self.clock())
        self._shares_releasing.add(share_id)  # an upload of the same id now would lose its files to our unlinks
        try:
            await trio.to_thread.run_sync(self.db.remove_share, share_id, limiter=self._upload_threads)
            try:
                await trio.to_thread.run_sync(self.store.remove, record.dir, share_id, record.size)
            except OSError as exc:  # a read-only or failing disk: the share is gone for the node all the same
                log.error("could not delete the files of released share share_id=%s dir=%s error=%s: they are "
                          "deleted at the next start", share_id, record.dir, exc)
        finally:
            self._shares_releasing.discard(share_id)
        log.info("share released share_id=%s size=%d", share_id, record.size)

    # --- scrub ----------------------------------------------------------------------------------------------

    async def scrub_once(self, rate_bytes_per_s: float) -> int:
        """Re-hash every held share against its root, at most ``rate_bytes_per_s``; returns corrupt count."""
        corrupt = 0
        for record in self.db.iter_shares():  # paged: memory stays flat however many shares
            if record.state != STATE_OK:
                continue
            paths = self.store.paths(record.dir, record.share_id)
            try:
                ok = paths is not None and await self._scrub_share(paths.data, paths.tree, record, rate_bytes_per_s)
            except OSError as exc:
                # unreadable is not corrupt: a disk that is away (or a file deleted) is missing, as for a read or
                # a proof, and served again once its files are back; a share found corrupt stays corrupt
                self.metrics.scrubbed_shares += 1
                if self.db.get_share(record.share_id) is not None:
                    await self._lost(record.share_id, exc)
                continue
            self.metrics.scrubbed_shares += 1
            if ok or self.db.get_share(record.share_id) is None:  # fine, or released meanwhile
                continue
            corrupt += 1
            self.metrics.scrub_corrupt += 1
            log.warning("scrub found corrupt share share_id=%s", record.share_id)
            await self.mark_lost(record.share_id, STATE_CORRUPT)
        return corrupt

    async def _scrub_share(self, data_path: os.PathLike[str], tree_path: os.PathLike[str], record: ShareRecord,
                           rate: float) -> bool:
        """Whether the data file hashes to the record's root and the tree file holds exactly that tree.

        The tree file is compared chunk by chunk as the data is hashed (TreeFileChecker), so memory stays bounded
        whatever the share size."""
        tree_fd = os.open(tree_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if os.fstat(tree_fd).st_size != tree_file_size(record.size):
                return False
            checker = TreeFileChecker(record.size, lambda offset, length: read_exact(tree_fd, length, offset))
            fd = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                at = 0
                while True:
                    chunk = await trio.to_thread.run_sync(os.pread, fd, STREAM_CHUNK_BYTES, at,
                                                          limiter=self._scrub_threads)
                    if not chunk:
                        break
                    await trio.to_thread.run_sync(checker.update, chunk, limiter=self._scrub_threads)
                    at += len(chunk)
                    await trio.sleep(len(chunk) / rate)
            finally:
                os.close(fd)
            if checker.size != record.size:
                return False
            root = await trio.to_thread.run_sync(checker.finish, limiter=self._scrub_threads)
        finally:
            os.close(tree_fd)
        return root == record.root

    async def scrub_loop(self, rate_bytes_per_s: float) -> None:
        while True:
            await trio.sleep(self.settings.scrub_interval)
            started = time.monotonic()
            corrupt = await self.scrub_once(rate_bytes_per_s)
            log.info("scrub done corrupt=%d seconds=%.1f", corrupt, time.monotonic() - started)

    # --- operations -----------------------------------------------------------------------------------------

    def health(self) -> dict[str, object]:
        """The node's figures; ``status`` is "degraded", with each ``problem`` in words, while a share folder
        cannot be used (the node still serves the others)."""
        shares, stored = self.db.totals()
        free = self.store.free_bytes()
        problems = self.store.problems()
        answer: dict[str, object] = {"status": "degraded" if problems else "ok", "node_id": self.node_id,
                                     "shares": shares, "bytes_stored": stored, "free_bytes": free}
        if problems:
            answer["problems"] = problems
        return answer

    def metrics_text(self) -> str:
        shares, stored = self.db.totals()
        lines = render_metrics(sorted(self.earnings.values(), key=lambda e: e.mediator_id))
        return self.metrics.render(shares, stored, self.store.free_bytes()) + "\n".join(lines) + "\n"

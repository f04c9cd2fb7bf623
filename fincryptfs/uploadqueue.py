"""Durable background work of a mount: uploads, object deletions and metadata snapshots.

Everything the queue does is driven by rows in the local SQLite tree (``fincryptfs.meta``), never by memory
alone, so a client killed at any moment resumes where it was: jobs left ``uploading`` are pending again at the
next start, and a finished upload counts only if it commits in the same transaction that marks its inode
stored. The FUSE side just commits a job and wakes the queue. The queue runs in the upload worker process
(``fincryptfs.uploadworker``), not in the mount's; the mount keeps the cache within its limit itself.

Tasks, all in the caller's nursery:

* ``workers`` upload workers: claim the oldest runnable job, ``ObjectStore.put_file`` the cache file, then
  ``meta.finish_upload`` (a stale result — the file changed meanwhile — is queued for deletion instead). Just
  before the mediator commits the object, its id is recorded (``meta.note_commit``): an upload that fails,
  is superseded or is killed after that point leaves a deletion behind instead of an object nobody knows of.
  A file of at most ``pack_threshold`` bytes is not uploaded alone: the worker waits until small files stop
  arriving (the newest job is PACK_LINGER old; at most PACK_LINGER_MAX) or a pack would be full, claims more
  small jobs and uploads them as one pack (``fincryptfs.packs``, ``meta.finish_pack``), read straight from
  the members' cache files (``uploader.MembersReader``).
  Failures are retried with exponential backoff (1 s doubling to 5 min); the error is kept in the job row
  for ``fincryptfs status``.
* one deleter: releases objects nobody references any more, but only once a snapshot without them was
  published (so the latest snapshot never points at a deleted object).
* one publisher: once the tree has been still for ``publish_delay`` seconds and no upload is pending (or at
  the latest MAX_PUBLISH_WAIT after the first unpublished change), and no sooner after the previous publish
  than ``publish_spacing`` of its cost, copies the tree with SQLite's backup API, strips what a restore does
  not need, and publishes it encrypted via ``manifest.publish_snapshot``. A flush skips both waits.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import trio

from . import meta
from .cache import CacheDir
from .core.errors import FincryptError
from .objectstore import ObjectStore
from .rpc import PeerError
from .uploader import MembersReader

log = logging.getLogger(__name__)

MAX_BACKOFF = 300.0
MAX_PUBLISH_WAIT = 30.0
PUBLISH_SHARE = 0.05  # the largest share of the time publishing snapshots may take (``publish_spacing``)
PACK_LINGER = 0.2
PACK_LINGER_MAX = 1.0  # a pack waits at most this long after its first file while more keep arriving
GATHER_CHECK = 0.05  # a gathering worker looks whether its pack is full at most this often as files arrive
FLUSH_POLL = 0.1
SUPERSEDED_POLL = 0.5  # seconds between checks that a file being uploaded was not changed or deleted
T = TypeVar("T")


def publish_spacing(last_cost: float) -> float:
    """Seconds to leave between the end of a publish that took ``last_cost`` seconds and the start of the
    next, unless a flush asks: PUBLISH_SHARE of the time at most goes to snapshots. Each publish is the whole
    tree: at a million files, 2 s to copy it, 1.5 s to compress it and 65 MiB to send, which every 30 s of
    steady writing (MAX_PUBLISH_WAIT) would have taken more upload bandwidth than a home connection has. A
    small tree (a publish well under a second) is not held back beyond the usual debounce."""
    return max(0.0, last_cost) * (1 / PUBLISH_SHARE - 1)


def backoff(attempts: int) -> float:
    """Seconds before retry number ``attempts`` (1, 2, 4, ... capped at 5 minutes)."""
    return min(MAX_BACKOFF, 2.0 ** max(0, attempts - 1))


class UploadQueue:
    def __init__(self, *, db: sqlite3.Connection, store: ObjectStore, cache: CacheDir, master_key: bytes,
                 spool_dir: Path, workers: int = 2, publish_delay: float = 2.0,
                 pack_threshold: int = 2**20,
                 pack_size: int = 16 * 2**20, pack_max_files: int = 1000, flush_seen: int | None = None) -> None:
        self.db = db
        self.store = store
        self.cache = cache
        self.master_key = master_key
        self.spool_dir = spool_dir
        self.workers = workers
        self.publish_delay = publish_delay
        self.pack_threshold = pack_threshold
        self.pack_size = pack_size
        self.pack_max_files = pack_max_files
        self._jobs_changed = trio.Event()
        self._tree_changed = trio.Event()
        self.publish_error: str | None = None
        # flush requests up to this count were made before the mount started: older ones need no answer
        self._flush_seen = meta.counter(db, "flush_requested") if flush_seen is None else flush_seen
        self._db_path = Path(db.execute("PRAGMA database_list").fetchone()[2])  # for the snapshot's own reader
        self._last_publish_end = float("-inf")  # trio time the last publish ended, and what it took (seconds):
        self._last_publish_cost = 0.0  # the next waits for ``publish_spacing`` of it
        self._flush_asked = self._flush_seen  # the latest request _retry_on_flush saw
        self._flush_came = trio.Event()  # set (and replaced) at each new request
        self._flush_time = 0.0  # when look_for_flush saw the latest request
        self._gathering = trio.Lock()  # held by the worker gathering a pack, until it has claimed its members

    def wake(self, jobs: bool = True, tree: bool = True) -> None:
        """The tree changed (``jobs``: and so did the jobs): the tasks concerned look again. ``tree=False``:
        only look for runnable jobs (a periodic poll must not restart the publisher's debounce)."""
        if tree:
            self._tree_changed.set()
            self._tree_changed = trio.Event()
        if jobs:
            self._jobs_changed.set()
            self._jobs_changed = trio.Event()

    async def _wait(self, timeout: float) -> None:
        with trio.move_on_after(max(0.0, timeout)):
            await self._jobs_changed.wait()

    async def _wait_tree(self, timeout: float) -> bool:
        """True if the tree changed within ``timeout`` seconds."""
        with trio.move_on_after(max(0.0, timeout)):
            await self._tree_changed.wait()
            return True
        return False

    def _until_next(self) -> float:
        at = meta.next_wakeup(self.db)
        return 60.0 if at is None else max(0.05, min(60.0, at - time.time()))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self.workers):
                nursery.start_soon(self._upload_worker)
            nursery.start_soon(self._deleter)
            nursery.start_soon(self._publisher)
            nursery.start_soon(self._retry_on_flush)
            task_status.started()

    async def _retry_on_flush(self) -> None:
        """A ``fincryptfs flush`` means "now": jobs waiting out a backoff (say, after the disk was full and the
        user made room) are retried at once instead of after up to five minutes, and a pack being gathered
        goes without waiting for more files (``_gather``)."""
        while True:
            await trio.sleep(FLUSH_POLL)
            self.look_for_flush()

    def look_for_flush(self) -> None:
        """Act on a flush request now (``fincryptfs put`` calls this after asking for one in its own process,
        rather than wait for the next poll)."""
        flush = meta.counter(self.db, "flush_requested")
        if flush > self._flush_asked:
            self._flush_asked = flush
            self._flush_time = time.time()
            self._flush_came.set()
            self._flush_came = trio.Event()
            meta.retry_now(self.db)
            self.wake(jobs=True, tree=True)  # workers (and a gathering one) and the publisher look again

    def _flush_waiting(self) -> bool:
        """A flush (or a put, which asks for one once it has copied everything) waits for a snapshot."""
        return self._flush_asked > self._flush_seen

    # --- uploads --------------------------------------------------------------------------------------------

    async def _upload_worker(self) -> None:
        while True:
            job = meta.next_upload(self.db, time.time())
            if job is None:
                await self._wait(self._until_next())
                continue
            if job.size <= self.pack_threshold and self._gathering.locked():
                # it belongs in the pack being gathered (or the next), not in a pack of its own: a burst of ten
                # files used to leave as a pack of nine and a pack of one
                meta.unclaim(self.db, job)
                async with self._gathering:
                    pass
                continue
            await self._upload_job(job)

    async def _upload_job(self, job: meta.UploadJob) -> None:
        """Upload one file, or a pack starting with it. An object committed at the mediator but not recorded as
        a file's content (the upload failed after the commit request, was superseded or stopped) is deleted, and
        so is one being placed when this process dies (``meta.note_placing``)."""
        noted: list[str] = []

        def note_placing(object_id: str) -> None:
            meta.note_placing(self.db, object_id)
            noted.append(object_id)

        def note_commit(object_id: str) -> None:
            meta.note_commit(self.db, object_id)
        try:
            if job.size <= self.pack_threshold:
                await self._upload_pack(job, note_placing, note_commit)
            else:
                await self._upload(job, note_placing, note_commit)
        finally:
            for object_id in noted:
                meta.abandon_commit(self.db, object_id)

    async def _upload(self, job: meta.UploadJob, note_placing: Callable[[str], None],
                      note_commit: Callable[[str], None]) -> None:
        if not meta.job_current(self.db, job):
            meta.drop_upload(self.db, job, "superseded")
            return
        path = self.cache.path(job.ino)
        started = trio.current_time()
        try:
            stored = await self._unless_superseded(job, lambda: self.store.put_file(path, before_place=note_placing,
                                                                                 before_commit=note_commit))
        except Exception as exc:  # noqa: BLE001 - any failure is retried; Cancelled is a BaseException
            if not meta.job_current(self.db, job):  # e.g. deleted (with its cache file) before the upload began
                stored = None
            elif isinstance(exc, FileNotFoundError):
                meta.fail_upload(self.db, job, "the cache file is gone: this version of the file cannot be "
                                 "uploaded; write the file again, or delete it", None)
                return
            else:
                self._retry_later([job], exc, f"inode {job.ino}")
                return
        if stored is None:
            meta.drop_upload(self.db, job, "superseded")
            log.info("upload of inode %d version %d stopped: the file was changed or deleted meanwhile", job.ino,
                     job.version)
            self.wake()
            return
        became_current = meta.finish_upload(self.db, job, stored.object_id, json.dumps(stored.to_json()))
        log.info("stored inode %d version %d (%d bytes) in %.2f s", job.ino, job.version, stored.size,
                 trio.current_time() - started)
        if not became_current:
            log.info("upload of inode %d version %d is stale; its object will be deleted", job.ino, job.version)
        self.cache.maybe_over_limit = True
        self.wake()

    def _retry_later(self, jobs: Sequence[meta.UploadJob], exc: Exception, what: str) -> None:
        """A failed attempt at ``jobs`` (one file, or a pack's members): each is retried after its backoff."""
        if not isinstance(exc, (FincryptError, OSError)):
            log.exception("unexpected error uploading %s", what)
        reason = str(exc)[:1000]
        log.warning("upload of %s failed (attempt %d, retry in %.0f s): %s", what, jobs[0].attempts,
                    backoff(jobs[0].attempts), reason)
        for job in jobs:
            meta.fail_upload(self.db, job, reason, time.time() + backoff(job.attempts))
        self.wake()

    async def _unless_superseded(self, job: meta.UploadJob, upload: Callable[[], Awaitable[T]]) -> T | None:
        """``upload()``, stopped (None) once the file is changed again or deleted: a deleted large file frees
        its disk space and the network at once instead of when an upload nobody needs any more ends."""
        outcome: list[T] = []
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                while True:
                    await trio.sleep(SUPERSEDED_POLL)
                    if not meta.job_current(self.db, job):
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(watch)
            try:
                outcome.append(await upload())
            except Exception as exc:  # noqa: BLE001 - raised as is below, not inside an exception group
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return outcome[0] if outcome else None

    async def _gather(self, first: meta.UploadJob) -> None:
        """Wait until small files stop arriving (the newest is PACK_LINGER old), the pack would be full, or
        PACK_LINGER_MAX after ``first``. Waiting only for ``first`` to be PACK_LINGER old sent the tail of a
        burst that a full pack left behind as a pack of one or two files (an object each: placement, n shares,
        commit). A waiting flush ends the wait unless files kept arriving after it was asked for: whoever
        asked has written what they meant to (a put asks once it has copied everything), so lingering would
        only delay the answer (by 0.2 s a put). New files wake the wait: a pack that fills up goes at once
        (looking only every PACK_LINGER held the first pack of a put back by up to 0.2 s)."""
        while True:
            now = time.time()
            pending, newest = meta.small_pending(self.db, now, self.pack_threshold)
            if self._flush_waiting() and max(newest, first.created) <= self._flush_time:
                return
            wait = min(max(newest, first.created) + PACK_LINGER, first.created + PACK_LINGER_MAX) - now
            if wait <= 0 or first.size + pending >= self.pack_size:
                return
            changed, flush_came = self._jobs_changed, self._flush_came
            with trio.move_on_after(min(wait, PACK_LINGER)):
                await changed.wait()  # new files (or a flush): the pack may be full now
                with trio.move_on_after(GATHER_CHECK):  # files arrive by the hundred per second
                    await flush_came.wait()

    async def _upload_pack(self, first: meta.UploadJob, note_placing: Callable[[str], None],
                           note_commit: Callable[[str], None]) -> None:
        """Upload ``first`` with the other small files pending now, as one pack object. One worker gathers at a
        time; the others upload large files or wait (``_upload_worker``)."""
        async with self._gathering:
            await self._gather(first)
            claimed = [first] + meta.next_small_uploads(self.db, time.time(), max_size=self.pack_threshold,
                                                        max_bytes=max(0, self.pack_size - first.size),
                                                        max_files=self.pack_max_files - 1)
        jobs = []
        for job in claimed:
            if meta.job_current(self.db, job):
                jobs.append(job)
            else:
                meta.drop_upload(self.db, job, "superseded")
        if not jobs:
            return
        reader = MembersReader([(self.cache.path(job.ino), job.size) for job in jobs])
        try:
            stored = await self.store.put_members(reader, before_place=note_placing, before_commit=note_commit)
        except Exception as exc:  # noqa: BLE001 - any failure is retried; Cancelled is a BaseException
            self._retry_later(jobs, exc, f"a pack of {len(jobs)} files")
            return
        members = []
        damaged = []
        for index, job in enumerate(jobs):
            if index not in reader.damaged:
                members.append((job, *reader.placement(index)))
                continue
            damaged.append((job.ino, *reader.placement(index)))  # what was read of it is zeroed in copies
            if meta.job_current(self.db, job):  # gone or cut short, yet not changed through the mount
                meta.fail_upload(self.db, job, "the cache file is gone or shorter than recorded: this version "
                                 "of the file cannot be uploaded; write the file again, or delete it", None)
            else:
                meta.drop_upload(self.db, job, "superseded")
        live = meta.finish_pack(self.db, stored.object_id, json.dumps(stored.to_json()), members, damaged)
        log.info("stored a pack of %d files (%d bytes)%s", len(members), stored.size,
                 "" if live == len(members) else f"; {len(members) - live} changed meanwhile")
        self.cache.maybe_over_limit = True
        self.wake()

    # --- deletions ------------------------------------------------------------------------------------------

    async def _deleter(self) -> None:
        while True:
            job = meta.next_delete(self.db, time.time())
            if job is None:
                await self._wait(self._until_next())
                continue
            try:
                await self.store.delete(job.object_id)
            except PeerError as exc:
                if exc.status == 404:
                    meta.finish_delete(self.db, job.object_id)
                    continue
                meta.fail_delete(self.db, job.object_id, str(exc)[:1000], time.time() + backoff(job.attempts + 1))
                continue
            except Exception as exc:  # noqa: BLE001 - any failure is retried; Cancelled is a BaseException
                if not isinstance(exc, FincryptError):
                    log.exception("unexpected error deleting object %s", job.object_id[:16])
                meta.fail_delete(self.db, job.object_id, str(exc)[:1000], time.time() + backoff(job.attempts + 1))
                continue
            meta.finish_delete(self.db, job.object_id)

    # --- snapshots ------------------------------------------------------------------------------------------

    async def _settle_snapshots(self) -> None:
        """Snapshots noted before their commit by a publish that failed or was killed: kept if the account's
        pointer names one (the pointer update landed), deleted otherwise (``meta.note_commit``)."""
        from .manifest import current_pointer

        noted = meta.snapshot_commits(self.db)
        if noted:
            pointer = await current_pointer(self.store)
            for object_id in noted:
                named = pointer is not None and pointer.object_id == object_id
                meta.settle_snapshot_commit(self.db, object_id, named=named)
                if named:
                    assert pointer is not None
                    meta.pointer_seen(self.db, pointer.version)
            self.wake(jobs=True, tree=False)

    async def _publish(self, snapshot: Path, version: int, pointer_version: int) -> int:
        """Publish ``snapshot`` (tree ``version``) and record it; returns the pointer's new version. The
        snapshot object is noted before its commit and the one it replaces is deleted through the queue, so
        neither stays stored unreferenced after a failure or a crash."""
        from .manifest import publish_snapshot

        noted: list[str] = []

        def note_commit(object_id: str) -> None:
            meta.note_commit(self.db, object_id, snapshot=True)
            noted.append(object_id)
        await self._settle_snapshots()
        stored_version = await publish_snapshot(self.store, self.master_key, snapshot, pointer_version,
                                                before_commit=note_commit,
                                                on_replaced=lambda object_id: meta.queue_delete(self.db, object_id))
        meta.set_published(self.db, version, stored_version)
        for object_id in noted:  # the pointer names it now
            meta.settle_snapshot_commit(self.db, object_id, named=True)
        return stored_version

    async def _publisher(self) -> None:
        from .manifest import SnapshotRollbackError, TreeDivergedError

        failures = 0
        while True:
            if meta.counter(self.db, "meta_version") <= meta.counter(self.db, "published_version"):
                await self._wait_tree(60.0)
                continue
            if failures:
                await trio.sleep(backoff(failures))
            await self._wait_until_quiet(not_before=self._last_publish_end + publish_spacing(self._last_publish_cost))
            snapshot = self.spool_dir / "snapshot.db"
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            started = trio.current_time()
            version = await trio.to_thread.run_sync(meta.snapshot_file, self._db_path, snapshot)
            pointer_version = meta.counter(self.db, "pointer_version")
            try:
                stored_version = await self._publish(snapshot, version, pointer_version)
            except Exception as exc:  # noqa: BLE001 - any failure is retried; Cancelled is a BaseException
                if not isinstance(exc, (FincryptError, OSError)):
                    log.exception("unexpected error publishing the snapshot")
                failures += 1
                self.publish_error = str(exc)
                blocked = isinstance(exc, (TreeDivergedError, SnapshotRollbackError))
                meta.set_publish_problem(self.db, str(exc), blocked=blocked)
                if blocked:
                    log.error("the tree snapshot cannot be published: %s", exc)
                else:
                    log.warning("publishing the metadata snapshot failed (attempt %d): %s", failures, exc)
                continue
            finally:
                snapshot.unlink(missing_ok=True)
            if self.publish_error is not None:
                meta.clear_publish_problem(self.db)
            failures = 0
            self.publish_error = None
            self._last_publish_end = trio.current_time()
            self._last_publish_cost = self._last_publish_end - started
            log.info("published metadata snapshot %d (tree version %d) in %.2f s", stored_version, version,
                     self._last_publish_cost)
            self.wake()

    async def _wait_until_quiet(self, not_before: float = 0.0) -> None:
        """Debounce: wait until the tree has been still for ``publish_delay`` and no upload is pending, but
        no longer than MAX_PUBLISH_WAIT (a snapshot costs as much as a file upload: one per burst is enough);
        and not before ``not_before`` (trio time: the spacing a costly snapshot asks for, ``publish_spacing``).

        A ``fincryptfs flush`` waiting (``meta.request_flush``, seen by ``look_for_flush``) skips the debounce
        and the spacing: the snapshot goes as soon as no upload is pending.
        """
        now = trio.current_time()
        deadline = max(now + MAX_PUBLISH_WAIT, not_before)
        still_since = now
        while now < deadline:
            if self._flush_waiting() and not meta.has_pending_uploads(self.db):
                self._flush_seen = self._flush_asked
                return
            if await self._wait_tree(min(FLUSH_POLL, deadline - now)):
                still_since = trio.current_time()
            now = trio.current_time()
            if now >= not_before and now - still_since >= self.publish_delay \
                    and not meta.has_pending_uploads(self.db):
                return

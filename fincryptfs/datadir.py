"""The client's data folder as the mount, its upload worker and ``fincryptfs put`` all use it: where the tree
database lives, the lock that lets one of them own the tree at a time, the object store they upload through, the
first use's restore of the tree, and keeping the cache within its limit.

Kept apart from ``fincryptfs.mount`` so that a command that does not mount (``put``) does not import pyfuse3 and
the FUSE operations: every command pays for its imports at each start.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from pathlib import Path

import trio

from . import meta
from .cache import PACKS, CachedEntry, CacheDir
from .core.crypto import account_signing_key
from .core.errors import ConfigError, FincryptError
from .core.settings import ClientSettings
from .lockfile import MOUNT_LOCK, held
from .objectstore import ObjectStore

log = logging.getLogger(__name__)

EVICT_INTERVAL = 2.0
EVICT_FIRST = 10.0  # seconds after the start before the first look (see ``evictor``)


def meta_path(settings: ClientSettings) -> Path:
    return settings.data_dir / "meta.db"


def open_store(settings: ClientSettings, master_key: bytes, http: object, cpu: trio.CapacityLimiter
               ) -> ObjectStore:
    if settings.mediator_url is None:
        raise ConfigError("FINCRYPT_MEDIATOR_URL is not set: name the mediator to store through (fincryptfs init "
                          "--mediator URL writes it)")
    return ObjectStore(mediator_url=settings.mediator_url, account_key=account_signing_key(master_key),
                       k=settings.k, n=settings.n, happy=settings.happy, segment_size=settings.segment_size,
                       spool_dir=settings.data_dir / "spool", http=http, cpu=cpu)  # type: ignore[arg-type]


async def load_or_restore_tree(store: ObjectStore, master_key: bytes, db_path: Path, cache_dir: Path) -> None:
    """Create the local tree from the account's latest snapshot if there is one (first mount only).

    A cache folder left from a tree this machine no longer has is set aside first: its files are named by
    inode number, and the new tree's numbers would make them another file's content."""
    if db_path.exists():
        return
    set_aside_stale_cache(cache_dir)
    from .manifest import fetch_latest_snapshot

    tmp = db_path.with_name(db_path.name + ".restoring")
    tmp.unlink(missing_ok=True)
    try:
        version = await fetch_latest_snapshot(store, master_key, tmp)
    except FincryptError as exc:
        raise FincryptError(f"cannot look for this account's existing tree at the mediator: {exc}. The first "
                            "mount needs the mediator; try again once it is reachable") from exc
    if version is None:
        log.info("no snapshot at the mediator: starting an empty tree")
        return
    meta.adopt_snapshot(tmp, version)
    os.rename(tmp, db_path)
    log.info("restored the tree from snapshot %d", version)


def set_aside_stale_cache(cache_dir: Path) -> Path | None:
    """Rename a non-empty cache folder that belongs to no tree (``meta.db`` is gone) to ``<name>.previous-<time>``
    beside it, and say so; returns the new name. Nothing is deleted: files that were never uploaded have their
    only copy there, and the tree moved away with them may be put back."""
    try:
        entries = [e for e in os.scandir(cache_dir) if not (e.name == PACKS and not any(os.scandir(e.path)))]
    except FileNotFoundError:
        return None
    if not entries:
        return None
    aside = cache_dir.with_name(f"{cache_dir.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(cache_dir, aside)
    log.warning("the cache folder held files of a tree that is no longer here (no meta.db beside it): moved to "
                "%s, out of the way of the new tree. Delete it once you no longer need it", aside)
    return aside


async def evictor(db: sqlite3.Connection, cache: CacheDir,
                  in_use: Callable[[], tuple[Collection[int], Collection[str]]]) -> None:
    """Keep the cache within its limit: after the tree changed (uploads finish in the worker), every few
    seconds, but only when the cache may be over its limit, and then down to ``cache.LOW_WATER`` of it. The
    folder is listed, and the uploaded inodes read, in a worker thread (listing and ``stat``-ing 80,000 cache
    files held the mount's event loop, hence every file operation, for half a second, and reading a million
    stored inodes 0.8 s); what to remove is decided afterwards, on the loop, from what is open and (for the
    chosen files alone) still uploaded at that moment. Files open in the mount, and the packs they read from
    (``in_use``), are never evicted. The first look is EVICT_FIRST after the start, not at it: it lists and
    ``stat``s every cached file (0.4 s of a 2 s ``put`` with 20,000 files cached), and nothing is lost by
    leaving a cache that was over its soft limit there a few seconds longer. A pass that fails (the tree
    locked by another process past the busy timeout, a disk error) is logged and tried again at the next: this
    runs in the mount's nursery, and an exception here would unmount the user's folder.

    Whenever the tree changed, cached copies of packs that no file references any more are removed at once
    (only ``packs/`` is listed): they hold nothing but the plaintext of deleted or replaced files; in the
    copies of packs that live on, the ranges of such files are zeroed (``scrub_stale_members``). Bytes that
    ``fincryptfs put`` wrote into the cache meanwhile (``meta.add_cache_bytes``) count as if written here."""
    seen = swept = -1
    db_path = Path(db.execute("PRAGMA database_list").fetchone()[2])
    added = meta.counter(db, "cache_added")
    started = trio.current_time()
    while True:
        await trio.sleep(EVICT_INTERVAL)
        try:
            if cache.restore_folders():
                log.warning("the cache folder %s was removed while mounted: made it again. Files not uploaded yet "
                            "had their only copy there: fincryptfs status names those that cannot be uploaded "
                            "(write them again)", cache.root)
            now_added = meta.counter(db, "cache_added")
            if now_added != added:
                cache.added(now_added - added)
                cache.maybe_over_limit = True
                added = now_added
            version = meta.counter(db, "meta_version")
            if version != swept:
                cache.drop_dead_packs(meta.live_packs(db), in_use()[1])
                swept = version
            await scrub_stale_members(db, cache, in_use()[0])
            if trio.current_time() - started < EVICT_FIRST:
                continue
            if (version != seen or cache.maybe_over_limit) and cache.may_exceed_limit():
                seen = version
                cache.maybe_over_limit = False
                mark = cache.usage_mark()
                entries, evictable = await trio.to_thread.run_sync(_list_for_eviction, cache, db_path)
                # chosen, checked and removed with no checkpoint in between: what is open, or was written since
                # the listing (no longer stored), stays
                open_inos, open_packs = in_use()
                victims = cache.choose_victims(entries, evictable, open_inos, open_packs)
                still = meta.stored_among(db, [v.key for v in victims if isinstance(v.key, int)])
                victims = [v for v in victims if not isinstance(v.key, int) or v.key in still]
                cache.finish_eviction(entries, victims, mark)
        except (sqlite3.Error, OSError) as exc:  # e.g. the tree locked past the busy timeout
            log.warning("cache upkeep failed, trying again in %.0f s: %s", EVICT_INTERVAL, exc)
            seen = swept = -1  # the next pass does everything again
            cache.maybe_over_limit = True


def _list_for_eviction(cache: CacheDir, db_path: Path) -> tuple[list[CachedEntry], set[int]]:
    """The cache's files and the tree's uploaded inodes (a worker thread, with its own read-only connection:
    the set of a million stored inodes took 0.8 s to build)."""
    entries = cache.list_entries()
    reader = meta.connect_readonly(db_path)
    try:
        return entries, meta.stored_inos(reader)
    finally:
        reader.close()


async def scrub_stale_members(db: sqlite3.Connection, cache: CacheDir, open_inos: Collection[int]) -> int:
    """Zero the released members of live packs (``meta.stale_members``: deleted, replaced or emptied files) in
    the cached copies of their packs, except those of files still open (a reader of a deleted file, or of the
    old version through the pack, reads on); returns how many were zeroed. Their pack-mates are still read from
    the copy. A pack with no copy now gets them zeroed when one is fetched (``packs.PackReader``). The writes
    run in a worker thread (deleting a folder of packed files notes thousands at once); a file reopened
    meanwhile reads its new content, never the released range."""
    done = [(rowid, ref) for rowid, ino, ref in meta.stale_members(db) if ino not in open_inos]
    if not done:
        return 0
    zeroed = await trio.to_thread.run_sync(
        lambda: sum(cache.scrub_member(ref.pack_id, ref.offset, ref.size) for _, ref in done))
    meta.mark_stale_zeroed(db, [rowid for rowid, _ in done])
    return zeroed


def exclusive_mount(data_dir: Path) -> AbstractContextManager[int]:
    """One mount per data folder: two would each believe they own the tree and its jobs (``fincryptfs put``
    takes it too when it runs without a mount)."""
    return held(data_dir / MOUNT_LOCK, f"another fincryptfs mount is using {data_dir}; unmount it first")

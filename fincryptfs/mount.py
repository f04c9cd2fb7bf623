"""Mounting: the tree, the cache, the object store, the upload queue and pyfuse3 in one nursery.

``run_mount`` returns when the filesystem is unmounted (``fincryptfs umount`` / ``fusermount3 -u``) or on
SIGINT/SIGTERM, after unmounting. Work left in the queue stays in the SQLite tree and resumes at the next mount.

The first mount with an empty data folder looks for the account's latest snapshot at the mediator, so a
restored key (``fincryptfs restore``) shows the whole tree; file contents are fetched on first open. That check
must succeed: mounting an empty tree over an account that has one would publish the empty tree over it.

Uploads, deletions and snapshot publishing run in a separate process (``fincryptfs.uploadworker``) that the
mount starts, supervises (restarted with backoff if it dies) and stops at unmount, so the mount's event loop
does only FUSE, SQLite and local files. The two share the SQLite tree; the mount pokes the worker through a
pipe after each burst of changes (``WorkerLink``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pyfuse3
import trio

from . import mediator_client, meta, rpc
from .cache import CacheDir
from .core.errors import ConfigError, FincryptError
from .core.settings import ClientSettings
from .datadir import evictor, exclusive_mount, load_or_restore_tree, meta_path, open_store
from .fs import Capacity, FincryptOperations, Progress
from .objectstore import StoredObject
from .packs import PackReader, Prefetcher
from .run_daemon import exit_with_parent, freeze_startup_objects, take_parent_fd
from .uploadqueue import backoff
from .uploadworker import EXIT_TREE_BUSY, encode_config

log = logging.getLogger(__name__)

CAPACITY_REFRESH = 60.0
CPU_THREADS = 2
WORKER_STOP_GRACE = 5.0
WORKER_START_TIMEOUT = 10.0
WORKER_STABLE = 30.0  # a worker that ran this long before dying is restarted without backoff
WAKE_COALESCE = 0.01  # seconds: at most one wake byte per this interval (see WorkerLink)
TREE_BUSY_RESTART = 2.0  # seconds before a worker that stopped on a locked tree database is started again
COMMIT_RETRY = 2.0  # seconds between attempts to record closes whose commit failed (FincryptOperations.retry_commits)


async def _retry_commits(ops: FincryptOperations) -> None:
    while True:
        await trio.sleep(COMMIT_RETRY)
        ops.retry_commits()


async def _refresh_capacity(ops: FincryptOperations, settings: ClientSettings, http: object) -> None:
    """statfs shows the network's free space (GET /v1/nodes) and the number of files (counted in a worker
    thread: counting them on each statfs held every file operation 0.2 s per ``df`` at a million files),
    refreshed in the background."""
    while True:
        try:
            ops.file_count = await trio.to_thread.run_sync(_count_files, meta_path(settings))
        except (sqlite3.Error, OSError) as exc:  # statfs keeps the last count
            log.warning("cannot count the tree's files: %s", exc)
        try:
            info = await rpc.call_json(http, "GET", f"{settings.mediator_url}/v1/nodes",  # type: ignore[arg-type]
                                       **mediator_client.limits())
            ops.capacity = Capacity(int(info.get("capacity_bytes", 0)), int(info.get("free_bytes", 0)))
        except (FincryptError, ValueError, TypeError) as exc:
            log.debug("capacity refresh failed: %s", exc)
        await trio.sleep(CAPACITY_REFRESH)


def _count_files(db_path: Path) -> int:
    reader = meta.connect_readonly(db_path)
    try:
        return meta.totals(reader)["files"]
    finally:
        reader.close()


async def _stop_on_signal(cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            cancel_scope.cancel()
            return


class WorkerLink:
    """The mount's side of the pipe to the upload worker: ``wake`` (called by FUSE handlers, never blocks)
    notes what changed; one sender task writes at most one byte per ``WAKE_COALESCE`` (``j`` jobs changed,
    ``t`` only the tree), covering every change since the last. A byte per change cost a pipe write here and a
    look at the queue in the worker for each file: copying 2,000 small files in, the worker spent 0.94 s of
    CPU and the mount 1.66 s; 0.67 s and 1.48 s with this, and the copy took 2.0 s instead of 2.4 s. The
    worker gathers small files for 50 ms anyway, so 10 ms later costs nothing."""

    def __init__(self) -> None:
        self._jobs = False
        self._pending = False
        self._event = trio.Event()

    def wake(self, jobs: bool = True) -> None:
        self._jobs = self._jobs or jobs
        if not self._pending:
            self._pending = True
            self._event.set()

    async def send_wakes(self, stream: trio.abc.SendStream) -> None:
        self.wake(True)  # a new worker looks at once
        while True:
            await self._event.wait()
            self._event = trio.Event()
            byte = b"j" if self._jobs else b"t"
            self._jobs = self._pending = False
            await stream.send_all(byte)
            await trio.sleep(WAKE_COALESCE)


async def supervise_worker(settings: ClientSettings, master_key: bytes, link: WorkerLink, flush_seen: int, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the upload worker process; restart it with backoff if it dies. Started once the first worker says
    it is ready (or gave up, or WORKER_START_TIMEOUT passed). Cancelled (unmount): close its stdin so it
    stops, and kill it by PID if it has not stopped after WORKER_STOP_GRACE seconds."""
    failures = 0
    config = encode_config(settings, master_key, flush_seen)
    reported = False
    while True:
        started = trio.current_time()
        # its own session: a Ctrl-C at the terminal is for the mount, which then stops it by closing its stdin
        process = await trio.lowlevel.open_process([sys.executable, "-m", "fincryptfs.uploadworker"],
                                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                   start_new_session=True)
        assert process.stdin is not None and process.stdout is not None
        try:
            await process.stdin.send_all(config)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.send_wakes, process.stdin)
                if not reported:
                    with trio.move_on_after(WORKER_START_TIMEOUT):
                        await process.stdout.receive_some(64)  # its "ready" line, or b"" if it died
                    reported = True
                    task_status.started()
                await process.wait()
                nursery.cancel_scope.cancel()
        except trio.BrokenResourceError:
            await process.wait()  # it died before reading its config
        finally:
            with trio.CancelScope(shield=True):
                await process.stdin.aclose()
                await process.stdout.aclose()
                with trio.move_on_after(WORKER_STOP_GRACE):
                    await process.wait()
                if process.returncode is None:
                    log.warning("the upload worker (pid %d) did not stop: killing it", process.pid)
                    process.kill()
                    await process.wait()
        delay, failures = restart_delay(process.returncode, failures, trio.current_time() - started)
        if process.returncode == EXIT_TREE_BUSY:
            log.warning("the upload worker (pid %d) stopped: the tree database (meta.db) is locked by another "
                        "process; restarting it in %.0f s", process.pid, delay)
        else:
            log.warning("the upload worker (pid %d) exited with status %s; restarting it in %.0f s", process.pid,
                        process.returncode, delay)
        if not reported:
            reported = True
            task_status.started()  # the mount serves anyway; uploads wait for a worker that starts
        await trio.sleep(delay)


def restart_delay(returncode: int | None, failures: int, ran: float) -> tuple[float, int]:
    """(seconds before the next worker, failures so far) after a worker that ran ``ran`` seconds exited. A worker
    stopped by a locked tree database (another process holding it past the busy timeout) is no crash: it is
    started again every TREE_BUSY_RESTART. Counted as crashes, a lock held for two minutes used to grow the
    backoff to a minute or more, so uploads stayed stopped that long after the lock was gone."""
    if returncode == EXIT_TREE_BUSY:
        return TREE_BUSY_RESTART, 0
    failures = 1 if ran > WORKER_STABLE else failures + 1
    return backoff(failures), failures


def is_dead_mount(path: Path) -> bool:
    """Whether ``path`` is the mount point of a FUSE process that is gone (killed, crashed): the kernel still
    holds the mount, but every access fails with ENOTCONN, and ``os.path.ismount`` says False."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def check_mountpoint(mountpoint: Path) -> None:
    """ConfigError unless ``mountpoint`` is an empty folder that nothing is mounted on."""
    if is_dead_mount(mountpoint):
        raise ConfigError(f"{mountpoint} is still mounted by a mount process that has stopped: unmount it first "
                          f"(fincryptfs umount {mountpoint})")
    if not mountpoint.exists():
        raise ConfigError(f"mount point {mountpoint} does not exist: create it first (mkdir {mountpoint})")
    if not mountpoint.is_dir():
        raise ConfigError(f"mount point {mountpoint} is not a folder: mount on an empty folder")
    if os.path.ismount(mountpoint):
        raise ConfigError(f"{mountpoint} is already a mount point (unmount it first: fincryptfs umount "
                          f"{mountpoint})")
    try:
        with os.scandir(mountpoint) as entries:
            empty = next(entries, None) is None
    except OSError as exc:
        raise ConfigError(f"cannot read the mount point {mountpoint}: {exc.strerror}") from exc
    if not empty:  # the mount would hide its files, which are not in the backup: they would look lost
        raise ConfigError(f"mount point {mountpoint} is not empty: move its files away (copy them into the "
                          "backup once it is mounted) or mount on an empty folder")


async def run_mount(settings: ClientSettings, mountpoint: Path, master_key: bytes, *,
                    on_ready: Callable[[], None] | None = None) -> None:
    """Mount and serve until unmounted or interrupted (or until a supervisor holding our lifeline pipe dies)."""
    parent_fd = take_parent_fd()  # before the upload worker is started: it must not inherit the variable
    check_mountpoint(mountpoint)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.data_dir, 0o700)
    (settings.data_dir / "spool").mkdir(exist_ok=True)
    async with AsyncExitStack() as stack:
        stack.enter_context(exclusive_mount(settings.data_dir))
        http = await stack.enter_async_context(rpc.new_client())
        store = open_store(settings, master_key, http, trio.CapacityLimiter(CPU_THREADS))
        db_path = meta_path(settings)
        await load_or_restore_tree(store, master_key, db_path, settings.cache_dir)
        db = meta.connect(db_path)
        stack.callback(db.close)
        cache = CacheDir(settings.cache_dir, settings.cache_limit_bytes)
        cache.remove_leftovers()
        for ino in meta.recover(db, cache.size):  # deleted while open when the client died
            cache.remove(ino)

        pack_reader = PackReader(db=db, store=store, pack_path=cache.pack_path)

        async def fetch(object_json: str, dest: Path, progress: Progress | None) -> None:
            ref = meta.pack_ref(object_json)
            if ref is not None:
                await pack_reader.fetch(ref, dest)  # small: whole packs, no partial reads
            else:  # never over a newer cache copy written meanwhile (a truncate while the fetch ran)
                await store.fetch_to_file(StoredObject.from_json(json.loads(object_json)), dest, progress=progress,
                                          clobber=False)

        flush_seen = meta.counter(db, "flush_requested")
        link = WorkerLink()
        prefetcher = Prefetcher(pack_reader, lambda ino, ref: cache.has_pack(ref.pack_id) or cache.has(ino),
                                settings.prefetch_packs, on_fetched=cache.forget_usage)
        options = set(pyfuse3.default_options) | {"fsname=fincryptfs", "default_permissions"}
        if os.geteuid() == 0:
            options.add("allow_other")
        async with trio.open_nursery() as nursery:
            ops = FincryptOperations(db=db, cache=cache, fetch=fetch, wake=link.wake, read_ahead=prefetcher.offer,
                                     spawn=nursery.start_soon,  # background fetches end with the mount
                                     pack_file=pack_reader.pack_file)
            # the worker first: a flush right after mounting should not wait for a Python process to start
            await nursery.start(supervise_worker, settings, master_key, link, flush_seen)
            pyfuse3.init(ops, str(mountpoint), options)
            try:
                nursery.start_soon(evictor, db, cache, lambda: (ops.open_inodes(), ops.open_packs()))
                nursery.start_soon(prefetcher.run)
                nursery.start_soon(_retry_commits, ops)
                nursery.start_soon(_refresh_capacity, ops, settings, http)
                nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
                nursery.start_soon(exit_with_parent, parent_fd, nursery.cancel_scope)
                log.info("mounted %s", mountpoint)
                freeze_startup_objects()
                if on_ready is not None:
                    on_ready()
                await pyfuse3.main()
                log.info("%s was unmounted", mountpoint)
                nursery.cancel_scope.cancel()
            finally:
                pyfuse3.close(unmount=True)

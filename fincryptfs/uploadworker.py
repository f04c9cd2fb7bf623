"""The upload worker: a mount's upload queue, pack building and snapshot publishing in their own OS process.

Why a process: the mount's event loop serves FUSE. Hashing, encoding and HTTP for uploads on that same loop
(and under the same GIL) made every ``create``/``write``/``close`` wait behind upload work. Here they run on the
other core, and the two processes share nothing but the SQLite tree (WAL: one writer at a time, every write
transaction short, ``busy_timeout`` to wait for the other) and the cache files.

Started and supervised by the mount (``fincryptfs.mount``), never by hand::

    python -m fincryptfs.uploadworker    # stdin: one JSON line (settings, master key), then wake bytes

Once its queue runs, the worker writes ``ready`` on stdout (its logs go to stderr). After the JSON line, the
mount writes one byte per burst of changes: ``j`` (jobs changed: look for uploads and deletions) or ``t``
(only the tree changed: the publisher's debounce restarts). End of stdin means the mount is gone (unmounted
or killed): the worker stops; unfinished jobs stay in SQLite and resume at the next start
(``meta.resume_uploads``). The worker also polls the jobs every POLL_INTERVAL, so a lost wake-up only delays
work. One worker per data folder (``upload.lock``, which holds the worker's PID).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from . import allocator, logs, meta, rpc
from .cache import CacheDir
from .core.errors import ConfigError
from .core.settings import ClientSettings
from .datadir import meta_path, open_store
from .lockfile import UPLOAD_LOCK, held
from .run_daemon import freeze_startup_objects
from .uploadqueue import UploadQueue

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5
CPU_THREADS = 2
EXIT_LOCKED = 3
EXIT_TREE_BUSY = 4  # the tree database stayed locked by another process past SQLite's busy timeout

_FIELDS = ("mediator_url", "data_dir", "cache_dir", "cache_limit_bytes", "k", "n", "happy", "segment_size",
           "upload_workers", "publish_delay", "pack_threshold", "pack_size", "pack_max_files")


def encode_config(settings: ClientSettings, master_key: bytes, flush_seen: int) -> bytes:
    """The worker's first stdin line: what it needs of the settings, the master key (never on argv) and the
    ``flush_requested`` counter when the mount started (a ``fincryptfs flush`` made after that, even before
    the worker runs, skips the publish debounce)."""
    values = {name: getattr(settings, name) for name in _FIELDS}
    values["data_dir"], values["cache_dir"] = str(settings.data_dir), str(settings.cache_dir)
    doc = {"settings": values, "master_key": master_key.hex(), "flush_seen": flush_seen}
    return json.dumps(doc).encode() + b"\n"


def decode_config(line: bytes) -> tuple[ClientSettings, bytes, int]:
    doc = json.loads(line)
    values = dict(doc["settings"])
    data_dir = Path(values.pop("data_dir"))
    settings = ClientSettings(data_dir=data_dir, key_file=data_dir / "master.key",
                              cache_dir=Path(values.pop("cache_dir")), **values)
    return settings, bytes.fromhex(doc["master_key"]), int(doc["flush_seen"])


def lock_path(data_dir: Path) -> Path:
    return data_dir / UPLOAD_LOCK


def worker_pid(data_dir: Path) -> int | None:
    """The PID of the running worker of ``data_dir`` (for tests and diagnostics), or None."""
    try:
        text = lock_path(data_dir).read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


@contextmanager
def exclusive(data_dir: Path) -> Iterator[None]:
    """One worker per data folder: two would claim the same jobs and publish over each other."""
    with held(lock_path(data_dir), f"another upload worker is using {data_dir}") as fd:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield


async def _read_wakes(stdin: trio.lowlevel.FdStream, queue: UploadQueue, done: trio.CancelScope) -> None:
    """Turn the mount's wake bytes into queue wake-ups; end of stdin (the mount is gone) stops the worker."""
    while True:
        data = await stdin.receive_some(4096)
        if not data:
            log.info("the mount closed the pipe: the upload worker stops")
            done.cancel()
            return
        queue.wake(b"j" in data)


async def _poll(queue: UploadQueue) -> None:
    while True:
        await trio.sleep(POLL_INTERVAL)
        queue.wake(jobs=True, tree=False)


async def run_queue(settings: ClientSettings, master_key: bytes, flush_seen: int, *,
                    task_status: trio.TaskStatus[UploadQueue] = trio.TASK_STATUS_IGNORED) -> None:
    """The data folder's upload queue (holding its upload lock), polled every POLL_INTERVAL; reports the queue
    once it runs. In this worker process for a mount; in its own process for ``fincryptfs put``."""
    with exclusive(settings.data_dir):
        async with rpc.new_client() as http:
            store = open_store(settings, master_key, http, trio.CapacityLimiter(CPU_THREADS))
            db = meta.connect(meta_path(settings))
            try:
                meta.resume_uploads(db)
                cache = CacheDir(settings.cache_dir, settings.cache_limit_bytes)
                queue = UploadQueue(db=db, store=store, cache=cache, master_key=master_key,
                                    spool_dir=settings.data_dir / "spool", workers=settings.upload_workers,
                                    publish_delay=settings.publish_delay, pack_threshold=settings.pack_threshold,
                                    pack_size=settings.pack_size, pack_max_files=settings.pack_max_files,
                                    flush_seen=flush_seen)
                async with trio.open_nursery() as nursery:
                    await nursery.start(queue.run)
                    nursery.start_soon(_poll, queue)
                    task_status.started(queue)
            finally:
                db.close()


async def run_worker(settings: ClientSettings, master_key: bytes, flush_seen: int,
                     stdin: trio.lowlevel.FdStream) -> None:
    async with trio.open_nursery() as nursery:
        queue = await nursery.start(run_queue, settings, master_key, flush_seen)
        freeze_startup_objects()
        try:
            os.write(1, b"ready\n")  # the mount waits for this before serving (stdout is its pipe)
        except BrokenPipeError:  # the mount stopped while this worker started
            nursery.cancel_scope.cancel()
            return
        nursery.start_soon(_read_wakes, stdin, queue, nursery.cancel_scope)


def _read_line(fd: int) -> bytes:
    """One line from ``fd``, byte by byte: a buffered reader would swallow the wake bytes that follow it."""
    out = bytearray()
    while not out.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            return b""
        out += byte
    return bytes(out)


def main() -> int:
    logs.configure(logging.INFO, tag="[worker]")
    allocator.keep_freed_memory()
    line = _read_line(0)
    if not line:
        return 0
    settings, master_key, flush_seen = decode_config(line)

    async def run() -> None:
        stdin = trio.lowlevel.FdStream(os.dup(0))
        async with stdin:
            await run_worker(settings, master_key, flush_seen, stdin)

    try:
        trio.run(run)
    except ConfigError as exc:
        print(f"upload worker: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except Exception as exc:  # noqa: BLE001 - only a locked tree is answered here; anything else is raised
        if not tree_busy(exc):
            raise
        print(f"upload worker: the tree database {settings.data_dir / 'meta.db'} is locked by another process "
              f"({exc if isinstance(exc, sqlite3.Error) else 'database is locked'}): stopping; the mount starts "
              "a new worker in a few seconds (find the process holding it with fuser)", file=sys.stderr)
        return EXIT_TREE_BUSY
    return 0


def tree_busy(exc: BaseException) -> bool:
    """Whether ``exc`` (maybe a group, from the queue's nursery) is only SQLite's "database is locked": another
    process held the tree's write lock past the busy timeout. The worker then stops and is restarted soon,
    without the growing backoff of a crash (``mount.supervise_worker``), and resumes its claimed jobs."""
    if isinstance(exc, BaseExceptionGroup):
        return all(tree_busy(inner) for inner in exc.exceptions)
    return isinstance(exc, sqlite3.OperationalError) and getattr(exc, "sqlite_errorcode", None) in (
        sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


if __name__ == "__main__":
    sys.exit(main())

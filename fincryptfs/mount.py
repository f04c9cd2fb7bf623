"""Mounting: the tree, the cache, the object store, the upload queue and pyfuse3 in one nursery.

``run_mount`` returns when the filesystem is unmounted (``fincryptfs umount`` / ``fusermount3 -u``) or on
SIGINT/SIGTERM, after unmounting. Work left in the queue stays in the SQLite tree and resumes at the next mount.

The first mount with an empty data folder looks for the account's latest snapshot at the mediator, so a
restored key (``fincryptfs restore``) shows the whole tree; file contents are fetched on first open. That check
must succeed: mounting an empty tree over an account that has one would publish the empty tree over it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path

import pyfuse3
import trio

from . import meta, rpc
from .cache import CacheDir
from .core.crypto import account_signing_key
from .core.errors import ConfigError, FincryptError
from .core.settings import ClientSettings
from .fs import Capacity, FincryptOperations
from .objectstore import ObjectStore, StoredObject
from .packs import PackReader
from .uploadqueue import UploadQueue

log = logging.getLogger(__name__)

CAPACITY_REFRESH = 60.0
CPU_THREADS = 2


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


async def load_or_restore_tree(store: ObjectStore, master_key: bytes, db_path: Path) -> None:
    """Create the local tree from the account's latest snapshot if there is one (first mount only)."""
    if db_path.exists():
        return
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


async def _refresh_capacity(ops: FincryptOperations, settings: ClientSettings, http: object) -> None:
    """statfs shows the network's free space (GET /v1/nodes), refreshed in the background."""
    while True:
        try:
            info = await rpc.call_json(http, "GET", f"{settings.mediator_url}/v1/nodes")  # type: ignore[arg-type]
            ops.capacity = Capacity(int(info.get("capacity_bytes", 0)), int(info.get("free_bytes", 0)))
        except (FincryptError, ValueError, TypeError) as exc:
            log.debug("capacity refresh failed: %s", exc)
        await trio.sleep(CAPACITY_REFRESH)


async def _stop_on_signal(cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            cancel_scope.cancel()
            return


@contextmanager
def _exclusive(data_dir: Path) -> Iterator[None]:
    """One mount per data folder: two would each believe they own the tree and its jobs."""
    fd = os.open(data_dir / "mount.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another fincryptfs mount is using {data_dir}; unmount it first") from None
        yield
    finally:
        os.close(fd)


async def run_mount(settings: ClientSettings, mountpoint: Path, master_key: bytes, *,
                    on_ready: Callable[[], None] | None = None) -> None:
    """Mount and serve until unmounted or interrupted."""
    if not mountpoint.is_dir():
        raise ConfigError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise ConfigError(f"{mountpoint} is already a mount point (unmount it first: fincryptfs umount "
                          f"{mountpoint})")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.data_dir, 0o700)
    (settings.data_dir / "spool").mkdir(exist_ok=True)
    async with AsyncExitStack() as stack:
        stack.enter_context(_exclusive(settings.data_dir))
        http = await stack.enter_async_context(rpc.new_client())
        store = open_store(settings, master_key, http, trio.CapacityLimiter(CPU_THREADS))
        db_path = meta_path(settings)
        await load_or_restore_tree(store, master_key, db_path)
        db = meta.connect(db_path)
        stack.callback(db.close)
        cache = CacheDir(settings.cache_dir, settings.cache_limit_bytes)
        meta.recover(db, cache.sizes())

        pack_reader = PackReader(db=db, store=store, cache_root=cache.root)

        async def fetch(object_json: str, dest: Path) -> None:
            ref = meta.pack_ref(object_json)
            if ref is not None:
                await pack_reader.fetch(ref, dest)
            else:
                await store.fetch_to_file(StoredObject.from_json(json.loads(object_json)), dest)

        ops_ref: list[FincryptOperations] = []
        queue = UploadQueue(db=db, store=store, cache=cache, master_key=master_key,
                            spool_dir=settings.data_dir / "spool", workers=settings.upload_workers,
                            publish_delay=settings.publish_delay, pack_threshold=settings.pack_threshold,
                            pack_size=settings.pack_size, pack_max_files=settings.pack_max_files,
                            in_use=lambda: ops_ref[0].open_inodes() if ops_ref else set())
        ops = FincryptOperations(db=db, cache=cache, fetch=fetch, wake=queue.wake)
        ops_ref.append(ops)
        options = set(pyfuse3.default_options) | {"fsname=fincryptfs", "default_permissions"}
        if os.geteuid() == 0:
            options.add("allow_other")
        pyfuse3.init(ops, str(mountpoint), options)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(queue.run)
                nursery.start_soon(_refresh_capacity, ops, settings, http)
                nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
                log.info("mounted %s", mountpoint)
                if on_ready is not None:
                    on_ready()
                await pyfuse3.main()
                log.info("%s was unmounted", mountpoint)
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)

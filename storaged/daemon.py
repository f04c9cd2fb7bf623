"""Wiring only: open the identity, database and share store, then run the HTTP app and the periodic tasks in one
nursery. ``serve`` reports the bound base URL through ``task_status`` so tests can start a node on port 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path

import trio

from fincryptfs import rpc
from fincryptfs.asgi import serve_app
from fincryptfs.core.errors import ConfigError
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.settings import StorageSettings
from fincryptfs.identity_file import load_or_create_identity as load_identity_file
from fincryptfs.lockfile import held
from fincryptfs.replayjournal import JOURNAL_FILE, ReplayJournal
from fincryptfs.run_daemon import why_not_created

from .app import build_app
from .db import NodeDatabase
from .discovery import discovery_loop
from .service import StorageService
from .store import ShareStore

log = logging.getLogger(__name__)

IDENTITY_FILE = "node.key"
DATABASE_FILE = "storaged.sqlite3"
# in the data folder and in every share folder: one node at a time (two would delete each other's files as
# leftovers of a crash at their start, and each other's uploads in flight)
LOCK_FILE = ".storaged.lock"


def load_or_create_identity(data_dir: Path, db: NodeDatabase) -> SigningKey:
    """The node's Ed25519 key; created (mode 0600, fsynced) on first start.

    Never a new one beside a database that lists the shares of another: the mediators know those shares by
    the node id that stored them, so a node under a new id could neither prove nor release them, and would
    keep them, unreported, for ever. ConfigError, with what to do, instead."""
    path = data_dir / IDENTITY_FILE
    owner = db.node_id()
    if owner is not None and not path.exists():
        raise ConfigError(f"the node's identity file {path} is missing, but its database {db.path} belongs to node "
                          f"{owner} ({db.totals()[0]} shares): restore that node's {IDENTITY_FILE} from your backup "
                          "and start again "
                          "(its id, shares and payouts belong to that key). To start afresh as a new node instead, "
                          f"move {db.path.name} away and empty the share folders")
    key = load_identity_file(path, "node")
    if owner is not None and key.id != owner:
        raise ConfigError(f"the identity file {path} is node {key.id}, but the node's database {db.path} belongs to "
                          f"node {owner} ({db.totals()[0]} shares): put back that node's {IDENTITY_FILE}, or use the "
                          "database and "
                          "share folders that belong to this one (STORAGED_DATA_DIR, STORAGED_SHARE_DIRS)")
    return key


def open_database(data_dir: Path) -> NodeDatabase:
    return NodeDatabase(data_dir / DATABASE_FILE)


def prepare_data_dir(settings: StorageSettings) -> None:
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:  # a file in the way, no permission
        raise ConfigError(f"data folder {settings.data_dir} cannot be created ({why_not_created(exc)}): fix "
                          "STORAGED_DATA_DIR or its permissions") from exc


@asynccontextmanager
async def open_service(settings: StorageSettings) -> AsyncIterator[StorageService]:
    """A StorageService over its on-disk state, recovered (leftovers cleaned) and ready to serve."""
    prepare_data_dir(settings)
    with ExitStack() as locks:
        locks.enter_context(held(settings.data_dir / LOCK_FILE, f"another storaged is running with the data "
                                 f"folder {settings.data_dir}: stop it first (a data folder serves one node at a "
                                 "time)"))
        db = open_database(settings.data_dir)
        try:
            key = load_or_create_identity(settings.data_dir, db)
            store = ShareStore(settings.share_dirs, settings.reserve_bytes, db.shares_by_dir(),
                               data_dir=settings.data_dir)
            data_real = os.path.realpath(settings.data_dir)
            for folder in store.folders:
                if os.path.realpath(folder.root) == data_real:  # its lock is the data folder's, held above
                    continue
                locks.enter_context(held(folder.root / LOCK_FILE, f"share folder {folder.root} is in use by "
                                         "another storaged: stop it, or give each node share folders of its own "
                                         "(STORAGED_SHARE_DIRS)"))
            service = StorageService(settings, key, db, store)
            journal = ReplayJournal(settings.data_dir / JOURNAL_FILE, service.guard)
            try:
                await trio.to_thread.run_sync(service.recover)
                yield service
            finally:
                journal.close()
        finally:
            db.close()


async def run_service(service: StorageService, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
                      ) -> None:
    """Serve an opened service: HTTP app, announce loops and scrub loop in one nursery."""
    settings = service.settings
    async with rpc.new_client() as client, trio.open_nursery() as nursery:
        url = await nursery.start(serve_app, build_app(service), settings.listen[0], settings.listen[1])
        if service.advertised_url is None:
            service.advertised_url = url
        for mediator_url in settings.mediators:
            nursery.start_soon(service.announce_loop, client, mediator_url)
        if settings.dht_listen is not None:
            nursery.start_soon(discovery_loop, service, client)  # never delays start-up; retries by itself
        nursery.start_soon(service.scrub_loop, float(settings.scrub_rate))
        nursery.start_soon(service.watch_folders)
        log.info("storaged listening url=%s node_id=%s", url, service.node_id)
        task_status.started(url)


async def serve(settings: StorageSettings, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
                ) -> None:
    """Run a storage node until cancelled; reports its bound base URL."""
    async with open_service(settings) as service:
        await run_service(service, task_status=task_status)

"""The mediator daemon: one nursery holding the HTTP server and the periodic upkeep loops.

``serve(settings, task_status=...)`` opens the database and identity key in ``data_dir``, starts hypercorn,
then reports the base URL through ``task_status`` (port 0 works). Loops: offline detection and share releases
every few seconds (bounded by the audit period), an audit round every ``audit_period`` followed by a repair
pass. A pass that fails unexpectedly is logged and the loop goes on (:func:`one_pass`). Cancelling the
nursery stops everything; nothing outlives it.
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import trio

from fincryptfs.asgi import serve_app
from fincryptfs.core.errors import ConfigError
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.settings import MediatorSettings
from fincryptfs.core.wire import ReplayGuard
from fincryptfs.dht.node import DhtNode, run_dht
from fincryptfs.dht.records import mediators_key
from fincryptfs.discovery import resolve_peers
from fincryptfs.identity_file import load_or_create_identity
from fincryptfs.lockfile import held
from fincryptfs.replayjournal import JOURNAL_FILE, ReplayJournal
from fincryptfs.rpc import new_client
from fincryptfs.run_daemon import why_not_created

from . import upkeep
from .app import build_app
from .db import MediatorDB
from .escrow import WALLET_FILE, EscrowError
from .payments import payments_loop
from .service import MediatorService

log = logging.getLogger(__name__)
IDENTITY_FILE = "identity.key"
DATABASE_FILE = "mediator.sqlite3"
LOCK_FILE = "mediatord.lock"  # held by the running daemon (flock: released however it ends)


def load_identity(data_dir: Path, db: MediatorDB) -> SigningKey:
    """The mediator's key, created (mode 0600) on first start.

    Never a new one beside a database that the old one wrote: the nodes hold its shares under grants that key
    signed and take challenges and releases only from it, so the mediator would go on under a new id, orphaning
    every share it placed. ConfigError, with what to do, instead."""
    path = data_dir / IDENTITY_FILE
    owner = db.mediator_id()
    if not path.exists() and (owner is not None or db.holds_state()):
        raise ConfigError(f"the mediator's identity file {path} is missing, but its database {db.path} belongs to "
                          f"{'mediator ' + owner if owner else 'a mediator that has run'}: restore {IDENTITY_FILE} "
                          "from your backup and start again (nodes keep this mediator's shares for that key only). "
                          f"To start afresh as a new mediator instead, use a new MEDIATORD_DATA_DIR")
    key = load_or_create_identity(path, "mediator")
    if owner is None:
        db.set_mediator_id(key.id)
    elif key.id != owner:
        raise ConfigError(f"the identity file {path} is mediator {key.id}, but the database {db.path} belongs to "
                          f"mediator {owner}: put back that mediator's {IDENTITY_FILE}, or set MEDIATORD_DATA_DIR to "
                          "the folder of this one")
    return key


def prepare_data_dir(settings: MediatorSettings) -> None:
    """Create the data folder, and keep it to this user (0700) even if it was made before: it holds the identity
    key and the escrow wallet, whose database bitcoinlib writes readable by all, private keys included."""
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(settings.data_dir, 0o700)
    except OSError as exc:  # a file in the way, no permission
        raise ConfigError(f"data folder {settings.data_dir} cannot be created ({why_not_created(exc)}): fix "
                          "MEDIATORD_DATA_DIR or its permissions") from exc


def open_service(settings: MediatorSettings) -> MediatorService:
    prepare_data_dir(settings)
    db = MediatorDB(settings.data_dir / DATABASE_FILE)
    try:
        return MediatorService(settings, load_identity(settings.data_dir, db), db)
    except BaseException:
        db.close()
        raise


async def check_wallet(service: MediatorService) -> None:
    """Open an existing escrow wallet now, so that one made on another network (or unreadable) stops the start.
    Opened lazily, it failed only in the payments passes, with a warning a minute, while the mediator took
    uploads it could neither bill nor pay for. A new data folder has no wallet yet: nothing to check."""
    if not (service.settings.data_dir / WALLET_FILE).exists():
        return
    try:
        await service.payments.wallet(lambda escrow: escrow.network)
    except EscrowError as exc:
        raise ConfigError(str(exc)) from exc


async def one_pass(what: str, step: Callable[[], object]) -> bool:
    """Run one pass of a periodic loop (``step`` may return an awaitable); False if it failed (logged).

    One bad row or peer must not stop audits, repairs and releases for everyone until a restart: the loop
    goes on and the next pass retries. Only ``Exception`` is caught, so cancellation (trio.Cancelled, a
    BaseException, alone or in a group) still stops the daemon."""
    try:
        result = step()
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("%s failed; the mediator goes on and retries at the next pass", what)
        return False
    return True


def first_round_delay(last_started: float | None, period: float, now: float) -> float:
    """Seconds until the first audit round after a start: one period after the last round began (at once if that
    is past), never more than a period. Counting a full period from every start, a mediator restarted more often
    than its audit period (deployments, a crash loop) never audited, and so never credited a node."""
    if last_started is None:
        return period
    return min(period, max(0.0, last_started + period - now))


async def audit_and_repair_loop(service: MediatorService, client: httpx.AsyncClient) -> None:
    delay = first_round_delay(service.db.last_round_started(), service.settings.audit_period, time.time())
    while True:
        await trio.sleep(delay)
        delay = service.settings.audit_period
        await one_pass("audit round", lambda: upkeep.audit_round(service, client, time.time()))
        await one_pass("repair pass", lambda: upkeep.repair_pass(service, client, time.time()))


SWEEP_INTERVAL = 600.0  # abandoned uploads are a day old before they count: looking every 10 minutes suffices


async def housekeeping_loop(service: MediatorService, client: httpx.AsyncClient) -> None:
    interval = min(5.0, service.settings.audit_period / 2, service.settings.node_offline_after / 4)
    swept_at = 0.0
    while True:
        await one_pass("offline pass", lambda: upkeep.offline_pass(service, time.time()))
        await one_pass("requested audits", lambda: upkeep.requested_audits(service, client, time.time()))
        if time.time() - swept_at >= SWEEP_INTERVAL:
            swept_at = time.time()
            await one_pass("stale upload sweep", partial(upkeep.sweep_stale_uploads, service, swept_at))
        await one_pass("release pass", lambda: upkeep.release_pass(service, client, time.time()))
        await trio.sleep(interval)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def announce_in_dht(service: MediatorService, url: str, *,
                          task_status: trio.TaskStatus[DhtNode] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a DHT node with the mediator's identity and announce ``url`` under the mediators key (and the
    region's key if set); the node re-announces by itself. Reports the node once the first announce is done."""
    settings = service.settings
    assert settings.dht_listen is not None
    if _is_loopback(httpx.URL(url).host) and not _is_loopback(settings.dht_listen[0]):
        log.warning("announcing the loopback URL %s in the DHT: nobody else can reach it; set MEDIATORD_PUBLIC_URL",
                    url)
    peers = await resolve_peers(settings.dht_bootstrap)
    async with trio.open_nursery() as nursery:
        node: DhtNode = await nursery.start(run_dht, service.key, settings.dht_listen, peers)
        stored = await node.announce_mediator(url)
        if settings.dht_region is not None:
            stored += await node.announce_mediator(url, key=mediators_key(settings.dht_region))
        log.info("DHT node on %s:%d announced mediator url=%s to %d node(s) (peers %d)", *node.address, url, stored,
                 len(node.table))
        task_status.started(node)


async def run_service(service: MediatorService, *, upkeep_loops: bool = True,
                      task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve an opened service; ``upkeep_loops=False`` lets tests drive audits and repairs pass by pass."""
    settings = service.settings
    guard = ReplayGuard()
    journal = ReplayJournal(settings.data_dir / JOURNAL_FILE, guard)
    try:
        await check_wallet(service)
        async with new_client() as client, trio.open_nursery() as nursery:
            url = await nursery.start(serve_app, build_app(service, guard=guard), settings.listen[0],
                                      settings.listen[1])
            service.bound_url = url
            log.info("mediator %s listening on %s", service.id[:16], url)
            if settings.dht_listen is not None:
                await nursery.start(announce_in_dht, service, settings.public_url or url)
            if upkeep_loops:
                nursery.start_soon(audit_and_repair_loop, service, client)
                nursery.start_soon(housekeeping_loop, service, client)
                nursery.start_soon(payments_loop, service.payments, client)
            task_status.started(url)
    finally:
        journal.close()
        service.payments.close()


async def serve(settings: MediatorSettings, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
                ) -> None:
    """Run the mediator until cancelled; reports its base URL once it accepts connections. The data folder's lock
    is held throughout: two mediators on one folder would both audit, bill and pay out from one ledger."""
    prepare_data_dir(settings)
    with held(settings.data_dir / LOCK_FILE, f"another mediatord is running with the data folder "
              f"{settings.data_dir}: stop it first (a data folder serves one mediator at a time)"):
        service = open_service(settings)
        try:
            await run_service(service, task_status=task_status)
        finally:
            service.db.close()

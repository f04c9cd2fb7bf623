"""Mediators found through the DHT: the node runs a DHT node with its own identity and announces itself to
every mediator it finds there whose ``/v1/info`` identity matches its signed record (see fincryptfs.discovery).

With ``STORAGED_MEDIATORS`` set the DHT is an additional source; with it empty, the DHT is the only one. Each
mediator found gets the same ``announce_loop`` (interval, backoff) as a configured one; records of mediators
already announced to are not checked again, and mediators the node registered with before are checked first
(the DHT's records come in random order: see ``fincryptfs.discovery.order_candidates``). Finding nothing is not
an error: the node logs it and looks again with exponential backoff (1 s up to the announce interval), joining
through the bootstrap peers again while its routing table is empty.
"""

from __future__ import annotations

import logging

import httpx
import trio

from fincryptfs.dht.node import DhtNode, run_dht
from fincryptfs.discovery import check_records, resolve_peers

from .service import StorageService

log = logging.getLogger(__name__)

MAX_DISCOVERED = 16  # mediators announced to through the DHT; bounds what forged records can make us do


async def discovery_loop(service: StorageService, client: httpx.AsyncClient, *,
                         task_status: trio.TaskStatus[DhtNode] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the DHT node and the announce loops of the mediators it finds, until cancelled."""
    settings = service.settings
    assert settings.dht_listen is not None
    peers = await resolve_peers(settings.dht_bootstrap)
    async with trio.open_nursery() as nursery:
        node: DhtNode = await nursery.start(run_dht, service.key, settings.dht_listen, peers)
        log.info("DHT node listening address=%s:%d peers=%d", *node.address, len(node.table))
        task_status.started(node)
        known_urls = set(settings.mediators)
        known_ids: set[str] = set()
        interval = settings.announce_interval
        delay = min(1.0, interval)
        while True:
            try:
                if settings.dht_bootstrap and not len(node.table):
                    peers = await resolve_peers(settings.dht_bootstrap)
                    await node.bootstrap(peers)
                records = await node.find_mediators()
                # mediators already announced to are not checked again; ones registered with before go first
                fresh = [r for r in records if r.url.rstrip("/") not in known_urls and r.id not in known_ids]
                found = await check_records(client, fresh, prefer=set(service.trusted))
                already_known = len(fresh) < len(records)
            except Exception as exc:  # noqa: BLE001 - discovery is an optional source of mediators: a failed
                # round (a bug, a record nobody foresaw) is logged and retried, never allowed to stop the node
                log.warning("looking for mediators through the DHT failed: %s: %s", type(exc).__name__, exc)
                found, already_known = [], False
            for mediator in found:
                if mediator.url in known_urls or mediator.mediator_id in known_ids:
                    continue
                if len(known_ids) >= MAX_DISCOVERED:
                    log.warning("not announcing to more than %d mediators found through the DHT", MAX_DISCOVERED)
                    break
                known_urls.add(mediator.url)
                known_ids.add(mediator.mediator_id)
                log.info("found mediator through the DHT url=%s mediator_id=%s", mediator.url,
                         mediator.mediator_id[:16])
                nursery.start_soon(service.announce_loop, client, mediator.url)
            if found or known_ids or already_known:
                delay = min(1.0, interval)
                await trio.sleep(interval)
            else:
                log.info("no mediator found through the DHT yet dht_peers=%d retry_in=%.1fs", len(node.table), delay)
                await trio.sleep(delay)
                delay = min(delay * 2, interval)

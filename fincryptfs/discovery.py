"""Finding mediators through the DHT, and checking each one before it is used.

A DHT record proves only that the holder of its key signed "I am a mediator at URL": anybody can sign a record
naming somebody else's URL. So a found record is used only if the server at that URL identifies itself
(``GET /v1/info``) with the record's id and public key; otherwise it is refused and logged. Storage nodes run
their own DHT node (``storaged.discovery``); the client uses :func:`discover_mediator`, a short-lived node with
a throwaway identity (so the lookup reveals nothing about the account), and writes what it found into its
settings file. See docs/dht.md.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import random
import socket as stdlib_socket
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass

import httpx
import trio

from . import rpc
from .core.errors import FincryptError
from .core.identity import PublicKey, SigningKey
from .core.wire import JSON, decode_object
from .dht.node import DhtNode, DhtParams, run_dht
from .dht.records import MEDIATORS_KEY, PeerRecord

log = logging.getLogger(__name__)

Address = tuple[str, int]
MAX_CHECKED = 16  # records checked per lookup: each costs an HTTP request
MAX_CONCURRENT_CHECKS = 8
INFO_TIMEOUT = 10.0  # for the whole /v1/info check of one record, connecting included
MAX_INFO_BYTES = 64 * 1024  # a mediator's /v1/info is well under 1 KiB
CLIENT_TIMEOUT = 30.0


class DiscoveryError(FincryptError):
    """No usable mediator was found through the DHT, or a found one failed its identity check."""


@dataclass(frozen=True)
class VerifiedMediator:
    """A mediator whose ``/v1/info`` identity matches the DHT record it announced."""

    url: str
    mediator_id: str
    public_key: PublicKey


async def resolve_peers(peers: Iterable[tuple[str, int]]) -> list[Address]:
    """DHT peers as dotted IPv4 addresses; names are resolved, and one that does not resolve is logged, skipped."""
    out: list[Address] = []
    for host, port in peers:
        try:
            out.append((str(ipaddress.IPv4Address(host)), port))
            continue
        except ValueError:
            pass
        try:
            infos = await trio.socket.getaddrinfo(host, port, family=stdlib_socket.AF_INET,
                                                  type=stdlib_socket.SOCK_DGRAM)
        except OSError as exc:
            log.warning("DHT bootstrap peer %s:%d does not resolve: %s", host, port, exc)
            continue
        out.extend((str(info[4][0]), port) for info in infos[:1])
    return out


async def verify_mediator(http: httpx.AsyncClient, record: PeerRecord) -> VerifiedMediator:
    """The mediator of ``record`` if the server at its URL has the record's identity; raises otherwise.

    The whole check, connecting included, has INFO_TIMEOUT seconds and reads at most MAX_INFO_BYTES: the URL
    comes from a stranger's record, so the server there may trickle an endless answer.
    """
    url = record.url.rstrip("/")
    try:
        with trio.fail_after(INFO_TIMEOUT):
            info = await _get_info(http, f"{url}/v1/info")
    except trio.TooSlowError:
        raise DiscoveryError(f"mediator {url} did not answer /v1/info within {INFO_TIMEOUT:.0f} s; "
                             "refusing its DHT record") from None
    if info.get("mediator_id") != record.id or info.get("public_key") != record.public_key.to_text():
        raise DiscoveryError(f"the DHT record for mediator {url} is signed by {record.id[:16]}… but the server "
                             f"there identifies as {str(info.get('mediator_id'))[:16]}…; refusing it")
    return VerifiedMediator(url, record.id, record.public_key)


async def _get_info(http: httpx.AsyncClient, url: str) -> dict[str, JSON]:
    """``GET url`` as a JSON object of at most MAX_INFO_BYTES, streamed so a larger answer is never buffered
    (and not content-decoded, so a small compressed body cannot expand in memory)."""
    try:
        async with http.stream("GET", url, headers={"accept-encoding": "identity"}) as response:
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding != "identity":
                raise DiscoveryError(f"{url} answered with content-encoding {encoding[:40]!r}; refusing it")
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > MAX_INFO_BYTES:
                    raise DiscoveryError(f"{url} answered with more than {MAX_INFO_BYTES} bytes; refusing it")
            status = response.status_code
    except httpx.HTTPError as exc:
        raise rpc.PeerError(f"{url} is unreachable: {rpc.why_unreachable(exc)}") from exc
    if status != 200:
        raise rpc.PeerError(f"{url} answered {status}", status)
    try:
        return decode_object(bytes(body), max_bytes=MAX_INFO_BYTES)
    except FincryptError as exc:
        raise rpc.PeerError(f"{url} sent a malformed answer: {exc}", status) from exc


def order_candidates(records: Iterable[PeerRecord], rng: random.Random, *, prefer: Set[str] = frozenset(),
                     limit: int = MAX_CHECKED) -> list[PeerRecord]:
    """The records worth checking, at most ``limit``: those whose id is in ``prefer`` (mediators we already
    trust) first, the rest in random order.

    Never by id or by arrival: ids are free to mint, so any fixed order lets an attacker put cheap records
    ahead of the real mediators and push those out of the ``limit`` checked.
    """
    candidates = list(records)
    rng.shuffle(candidates)
    candidates.sort(key=lambda r: r.id not in prefer)  # stable: the shuffle survives within each group
    return candidates[:limit]


def choose_mediator(found: Sequence[VerifiedMediator], rng: random.Random, *, prefer: Set[str] = frozenset()
                    ) -> VerifiedMediator:
    """One of the verified mediators, a trusted one if there is one, else at random: any fixed rule (the
    lowest id, the first to answer) is one an attacker running a mediator of its own can win every time."""
    trusted = [m for m in found if m.mediator_id in prefer]
    return rng.choice(trusted or list(found))


async def check_records(http: httpx.AsyncClient, records: Iterable[PeerRecord], *,
                        prefer: Set[str] = frozenset(), rng: random.Random | None = None
                        ) -> list[VerifiedMediator]:
    """Verify up to MAX_CHECKED records (see order_candidates), MAX_CONCURRENT_CHECKS at a time; refusals are
    logged. Each check is bounded in time and size (verify_mediator), so the whole is too."""
    chosen = order_candidates(records, rng or random.Random(), prefer=prefer)
    results: list[VerifiedMediator | None] = [None] * len(chosen)
    limiter = trio.CapacityLimiter(MAX_CONCURRENT_CHECKS)

    async def check(index: int, record: PeerRecord) -> None:
        async with limiter:
            try:
                results[index] = await verify_mediator(http, record)
            except (rpc.PeerError, DiscoveryError) as exc:
                log.warning("ignoring mediator record id=%s url=%s: %s", record.id[:16], record.url, exc)
            except Exception as exc:  # noqa: BLE001 - a record comes from a stranger: it may fail in any way,
                # and one such record must never end the search (nor the storage daemon's discovery loop)
                log.warning("ignoring mediator record id=%s url=%r: checking it failed unexpectedly: %s: %s",
                            record.id[:16], record.url[:80], type(exc).__name__, exc)

    async with trio.open_nursery() as nursery:
        for index, record in enumerate(chosen):
            nursery.start_soon(check, index, record)
    return [m for m in results if m is not None]


async def find_verified_mediators(node: DhtNode, http: httpx.AsyncClient, *, key: bytes = MEDIATORS_KEY,
                                  prefer: Set[str] = frozenset()) -> list[VerifiedMediator]:
    """Mediators announced under ``key`` whose servers confirm the announced identity (see check_records)."""
    return await check_records(http, await node.find_mediators(key=key), prefer=prefer)


def client_listen(peers: Iterable[Address]) -> Address:
    """Loopback when every peer is on loopback (the devnet), else all interfaces; port 0 either way."""
    loopback = all(ipaddress.IPv4Address(host).is_loopback for host, _ in peers)
    return ("127.0.0.1", 0) if loopback else ("0.0.0.0", 0)


async def discover_mediator(bootstrap: Iterable[tuple[str, int]], *, timeout: float = CLIENT_TIMEOUT,
                            params: DhtParams | None = None) -> VerifiedMediator:
    """Join the DHT through ``bootstrap`` with a throwaway identity and return a verified mediator."""
    given = list(bootstrap)
    peers = await resolve_peers(given)
    where = ", ".join(f"{h}:{p}" for h, p in given) or "none"
    if not peers:
        raise DiscoveryError(f"no DHT bootstrap peer could be resolved (FINCRYPT_DHT_BOOTSTRAP: {where})")
    found: list[VerifiedMediator] = []
    joined = 0
    async with rpc.new_client() as http, trio.open_nursery() as nursery:
        with trio.move_on_after(timeout):
            start = functools.partial(run_dht, params=params or DhtParams())
            node = await nursery.start(start, SigningKey.generate(), client_listen(peers), peers)
            joined = len(node.table)
            if joined:
                found = await find_verified_mediators(node, http)
        nursery.cancel_scope.cancel()
    if not joined:
        raise DiscoveryError(f"no DHT peer answered (FINCRYPT_DHT_BOOTSTRAP: {where}); check the addresses and "
                             "that UDP is not blocked, or set FINCRYPT_MEDIATOR_URL")
    if not found:
        raise DiscoveryError(f"no mediator whose identity checks out was found through the DHT (bootstrap peers: "
                             f"{where}); try again later or set FINCRYPT_MEDIATOR_URL")
    return choose_mediator(found, random.Random())

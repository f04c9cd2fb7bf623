"""The trio UDP edge of the DHT: one socket, one nursery, the pure modules doing the thinking.

Every datagram is first charged to its source IP's token bucket (a flood costs a dict lookup, not a signature
check), then decoded and authenticated by :mod:`.codec`; anything wrong is dropped and counted in
``node.counters``, never answered (no reflection) and never raised. Queries are answered inline in the
receive loop, so a burst of work can't pile up tasks. The routing table learns only from *responses* (the
sender answered a random transaction id, so its address is real): an unknown querier is pinged first, with a
bounded number of such pings in flight.

Daemons call :func:`run_dht` and use the returned :class:`DhtNode`'s ``announce_mediator`` and
``find_mediators``; see docs/dht.md.
"""

from __future__ import annotations

import logging
import os
import random
import socket as stdlib_socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from ..core.errors import AuthError, FincryptError, RemoteProtocolError, TooLargeError
from ..core.identity import SigningKey
from . import codec
from .codec import MAX_DATAGRAM, MAX_NODES, MAX_VALUES, ErrorReply, Query, Response
from .contact import Contact, parse_host
from .lookup import Lookup
from .peerstore import PeerStore
from .ratelimit import RateLimiter
from .records import MEDIATORS_KEY, PeerRecord
from .routing import PingOldest, Rejected, RoutingTable
from .tokens import SECRET_BYTES, TokenSecrets, issue_token, token_valid

log = logging.getLogger(__name__)

ERROR_GENERIC, ERROR_PROTOCOL, ERROR_BAD_TOKEN, ERROR_REFUSED = 201, 203, 204, 205
Address = tuple[str, int]
AMPLIFICATION_LIMIT = 3  # an unproven asker gets at most this many bytes back per byte of its query
PROVEN_WAIT = 0.25  # s before a lookup that found nothing asks again: the ping-backs proving our address land
MAX_PROVEN = 4096  # addresses remembered as having answered us (least recently heard from forgotten first)
MAX_ANSWERED = 4096  # (sender, txid) of recent full answers, to spot a replayed query


class DhtTimeout(FincryptError):
    """A DHT peer did not answer in time (it may be down, or the network drops UDP)."""


class DhtErrorReply(FincryptError):
    """A DHT peer answered a query with an error."""


@dataclass(frozen=True)
class DhtParams:
    """Tunables; the defaults suit the public network, tests shrink the intervals."""

    k: int = 8
    alpha: int = 3
    query_timeout: float = 2.0
    lookup_timeout: float = 15.0
    refresh_interval: float = 900.0
    maintenance_interval: float = 30.0
    token_rotation: float = 300.0
    record_ttl: int = 3600
    republish_interval: float = 1200.0
    rate: float = 50.0  # datagrams per second per source IP
    burst: float = 200.0
    max_per_ip_bucket: int = 2
    max_per_ip: int = 8
    max_background_pings: int = 64


@dataclass(frozen=True)
class LookupResult:
    contacts: tuple[Contact, ...]  # the k nearest that answered, nearest first
    hops: int
    queries: int


class _Pending:
    __slots__ = ("address", "event", "message")

    def __init__(self, address: Address) -> None:
        self.address = address
        self.event = trio.Event()
        self.message: Response | ErrorReply | None = None


class DhtNode:
    """A running DHT node; made by :func:`serve`, which owns its socket and nursery."""

    def __init__(self, identity: SigningKey, sock: trio.socket.SocketType, params: DhtParams,
                 nursery: trio.Nursery, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.identity = identity
        self.id = bytes.fromhex(identity.id)
        self.params = params
        self.counters: Counter[str] = Counter()
        self.table = RoutingTable(self.id, k=params.k, max_per_ip_bucket=params.max_per_ip_bucket,
                                  max_per_ip=params.max_per_ip)
        self.store = PeerStore()
        self._sock = sock
        self._nursery = nursery
        self._wall_clock = wall_clock
        self._limiter = RateLimiter(params.rate, params.burst)
        self._pending: dict[str, _Pending] = {}
        self._awaiting: dict[Address, set[str]] = {}  # address -> txids of our queries to it still unanswered
        self._verifying: set[Address] = set()
        self._proven: OrderedDict[Address, bytes] = OrderedDict()  # address -> the id that answered from it
        self._answered: OrderedDict[tuple[bytes, str], None] = OrderedDict()
        self._secrets = TokenSecrets(os.urandom(SECRET_BYTES), os.urandom(SECRET_BYTES), trio.current_time())
        self._rng = random.Random()
        self._announcements: dict[tuple[bytes, str], str] = {}  # (key, role) -> url, republished
        self._last_republish = trio.current_time()
        self.bootstrap_peers: list[Address] = []  # joined through again whenever the routing table is empty
        host, port = sock.getsockname()[:2]
        self.address: Address = (host, port)

    # --- public API ---------------------------------------------------------------------------------------

    async def ping(self, address: Address) -> Contact:
        """Ask ``address`` for its id; raises DhtTimeout / DhtErrorReply."""
        response = await self._request(address, "ping")
        return Contact(response.sender, *address)

    async def find_node(self, address: Address, target: bytes) -> tuple[Contact, ...]:
        return (await self._request(address, "find_node", target=target)).nodes

    async def get_peers(self, address: Address, key: bytes) -> Response:
        return await self._request(address, "get_peers", target=key)

    async def bootstrap(self, addresses: Iterable[Address]) -> int:
        """Ping the bootstrap peers, then look up our own id to fill the table; returns the table size."""
        async with trio.open_nursery() as nursery:
            for address in addresses:
                nursery.start_soon(self._ping_quietly, address)
        if len(self.table):
            await self.lookup(self.id)
        return len(self.table)

    async def lookup(self, target: bytes) -> LookupResult:
        """Iterative find_node for ``target``: the k nearest live nodes, bounded by ``lookup_timeout``."""
        lookup, _ = await self._iterate(target, "find_node")
        return LookupResult(tuple(c for c, _ in lookup.result()), lookup.hops, lookup.queries_sent)

    async def find_values(self, key: bytes) -> list[PeerRecord]:
        """Every verified, unexpired record the nodes nearest ``key`` hold for it, newest per id, in random order.

        A lookup that comes back empty is run again, up to twice, each time waiting twice as long for every
        reply and looking twice as wide (the 2k, then 4k nearest): about 1 lookup in 100 misses every holder
        when replies time out (bench/dht_lookup.py), more on an overloaded host whose replies come late; and an
        announce made while replies timed out stored the record on nodes a little farther than the k nearest,
        which a lookup as wide as the announce's can miss every time (seen under load: 1 run in 10 of a
        100-node test network found nothing in all three passes). And a node answers records only to an address
        that answered its ping-back (``_reply_budget``): a node new to the others finds nothing in its first
        pass, so the later ones wait ``PROVEN_WAIT`` (then twice that) for those pings to land.
        """
        values: dict[str, PeerRecord] = {}
        for attempt in range(3):
            if attempt:  # the nodes asked have pinged us back meanwhile: they answer us records now
                await trio.sleep(PROVEN_WAIT * 2 ** (attempt - 1))
            _, values = await self._iterate(key, "get_peers", patience=2.0 ** attempt, width=2 ** attempt)
            if values:
                break
        found = list(values.values())
        self._rng.shuffle(found)  # no order anyone can aim for: ids are free to mint (see fincryptfs.discovery)
        return found

    async def announce(self, record: PeerRecord) -> int:
        """Store ``record`` on the k nodes nearest its key; returns how many accepted it."""
        lookup, _ = await self._iterate(record.key, "get_peers")
        stored = 0

        async def store_at(contact: Contact, token: bytes) -> None:
            nonlocal stored
            try:
                response = await self._request(contact.address, "announce_peer", target=record.key,
                                               token=token, record=record)
            except (DhtTimeout, DhtErrorReply):
                return
            stored += bool(response.stored)

        async with trio.open_nursery() as nursery:
            for contact, token in lookup.result():
                if token is not None:
                    nursery.start_soon(store_at, contact, token)
        if self._store_locally_if_alone(record):
            stored += 1
        return stored

    async def announce_mediator(self, url: str, *, key: bytes = MEDIATORS_KEY) -> int:
        """Announce this node's identity as a mediator at ``url`` now and keep re-announcing it."""
        self._announcements[(key, "mediator")] = url
        return await self.announce(self._record(key, "mediator", url))

    async def find_mediators(self, *, key: bytes = MEDIATORS_KEY) -> list[PeerRecord]:
        """Mediators announced under ``key`` (verified records with role ``mediator``)."""
        return [r for r in await self.find_values(key) if r.role == "mediator"]

    # --- requests -----------------------------------------------------------------------------------------

    def _record(self, key: bytes, role: str, url: str) -> PeerRecord:
        expires_at = int(self._wall_clock()) + self.params.record_ttl
        return PeerRecord.sign(self.identity, key=key, role=role, url=url, expires_at=expires_at)

    def _store_locally_if_alone(self, record: PeerRecord) -> bool:
        # A node with no peers is its own nearest node: keep the record so whoever bootstraps from us finds it.
        if len(self.table) >= self.params.k:
            return False
        return self.store.add(record, self.address[0], self._wall_clock()) is None

    async def _request(self, address: Address, name: str, *, target: bytes | None = None,
                       token: bytes | None = None, record: PeerRecord | None = None,
                       timeout: float | None = None) -> Response:
        timeout = self.params.query_timeout if timeout is None else timeout
        txid = os.urandom(8).hex()
        data = codec.encode_query(self.identity, txid, name, target=target, token=token, record=record)
        pending = self._pending[txid] = _Pending(address)
        self._awaiting.setdefault(address, set()).add(txid)
        try:
            self.counters["queries_sent"] += 1
            await self._send(data, address)
            with trio.move_on_after(timeout):
                await pending.event.wait()
        finally:
            del self._pending[txid]
            awaited = self._awaiting[address]
            awaited.discard(txid)
            if not awaited:
                del self._awaiting[address]
        message = pending.message
        if message is None:
            self.counters["query_timeouts"] += 1
            raise DhtTimeout(f"DHT peer {address[0]}:{address[1]} did not answer {name} within {timeout} s")
        if isinstance(message, ErrorReply):
            raise DhtErrorReply(f"DHT peer {address[0]}:{address[1]} refused {name}: {message.message}")
        return message

    async def _send(self, data: bytes, address: Address) -> None:
        try:
            await self._sock.sendto(data, address)
        except OSError as exc:
            self.counters["send_errors"] += 1
            log.debug("DHT send to %s failed: %s", address, exc)

    async def _ping_quietly(self, address: Address) -> None:
        try:
            await self.ping(address)
        except (DhtTimeout, DhtErrorReply):
            pass

    async def _iterate(self, target: bytes, name: str, *, patience: float = 1.0, width: int = 1
                       ) -> tuple[Lookup, dict[str, PeerRecord]]:
        """One iterative lookup; ``patience`` multiplies the time each query (and the whole lookup) may take,
        ``width`` how many nearest nodes (in multiples of k) it must have heard from before it ends."""
        p = self.params
        lookup = Lookup(target, self.table.closest(target, p.k * width), own_id=self.id, k=p.k * width,
                        alpha=p.alpha, max_per_ip=p.max_per_ip_bucket)
        values: dict[str, PeerRecord] = {}
        if name == "get_peers":
            for record in self.store.get(target, self._wall_clock(), 10**6, self._rng):
                values[record.id] = record

        async def query(contact: Contact) -> None:
            try:
                response = await self._request(contact.address, name, target=target,
                                               timeout=p.query_timeout * patience)
            except (DhtTimeout, DhtErrorReply):
                lookup.on_timeout(contact)
                self.table.failed(contact)
            else:
                lookup.on_response(contact, response.sender, response.nodes, response.token)
                self.counters["dropped_bad_record"] += response.dropped_values
                if response.sender == contact.id:
                    self._collect(values, response.values, target)
            launch()

        def launch() -> None:
            for contact in lookup.next_queries():
                nursery.start_soon(query, contact)

        with trio.move_on_after(p.lookup_timeout * patience) as scope:
            async with trio.open_nursery() as nursery:
                launch()
        if scope.cancelled_caught:
            self.counters["lookup_timeouts"] += 1
        return lookup, values

    def _collect(self, values: dict[str, PeerRecord], records: tuple[PeerRecord, ...], key: bytes) -> None:
        now = self._wall_clock()
        for record in records:
            try:
                record.check_fresh(now, key=key)
            except RemoteProtocolError:
                self.counters["dropped_bad_record"] += 1
                continue
            old = values.get(record.id)
            if old is None or old.expires_at < record.expires_at:
                values[record.id] = record

    # --- the receive side ---------------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            try:
                data, source = await self._sock.recvfrom(MAX_DATAGRAM + 1)
            except OSError as exc:  # e.g. ICMP errors surfacing on Linux; the socket itself stays usable
                self.counters["receive_errors"] += 1
                log.debug("DHT receive error: %s", exc)
                await trio.sleep(0)
                continue
            reply = self.handle_datagram(data, (source[0], source[1]))
            if reply is not None:
                await self._send(reply, source)

    def handle_datagram(self, data: bytes, source: Address) -> bytes | None:
        """Process one datagram; returns the reply to send, if any. Never raises for bad input."""
        self.counters["received"] += 1
        if not self._limiter.allow(source[0], trio.current_time()) and not self._may_answer_us(data, source):
            self.counters["dropped_rate_limited"] += 1
            return None
        if len(data) > MAX_DATAGRAM:
            self.counters["dropped_oversized"] += 1
            return None
        try:
            message = codec.decode_message(data)
        except AuthError:
            self.counters["dropped_bad_signature"] += 1
            return None
        except TooLargeError:
            self.counters["dropped_oversized"] += 1
            return None
        except RemoteProtocolError:
            self.counters["dropped_malformed"] += 1
            return None
        try:
            return self._dispatch(message, source, len(data))
        except RemoteProtocolError:
            self.counters["dropped_malformed"] += 1
            return None
        except Exception:  # noqa: BLE001 - synchronous code, nothing to cancel; a bug must not stop the node
            self.counters["handler_errors"] += 1
            log.exception("DHT handler failed on a datagram from %s", source)
            return None

    def _may_answer_us(self, data: bytes, source: Address) -> bool:
        """Whether ``data`` may be the answer to one of our queries still waiting at ``source``: it carries that
        query's txid. Such a datagram passes the rate limit. The limit is keyed on a source IP, which proves
        nothing (spoofed, or another host behind the same NAT): without this, a flood from a node's IP made
        its answers drop, and anyone could get an honest node evicted from chosen routing tables. The txid is
        random and went only to ``source``, so an off-path flooder cannot use this; a flood from ``source``
        itself costs a substring search here, and only while we wait on it."""
        txids = self._awaiting.get(source)
        if not txids:
            return False
        return any(b'"t":"%s"' % txid.encode("ascii") in data for txid in txids)

    def _dispatch(self, message: codec.Message, source: Address, size: int) -> bytes | None:
        if message.sender == self.id:
            self.counters["dropped_from_self"] += 1
            return None
        if isinstance(message, Query):
            self.counters["queries_received"] += 1
            self._heard_query(message.sender, source)
            return self._answer(message, source, size)
        pending = self._pending.get(message.txid)
        if pending is None or pending.address != source or pending.message is not None:
            self.counters["dropped_unexpected_response"] += 1
            return None
        pending.message = message
        pending.event.set()
        self._proven[source] = message.sender  # it answered our random txid: it receives at this address
        self._proven.move_to_end(source)
        while len(self._proven) > MAX_PROVEN:
            self._proven.popitem(last=False)
        self._learn(Contact(message.sender, *source))
        return None

    def _reply_budget(self, query: Query, source: Address, size: int) -> int | None:
        """How many bytes the answer to ``query`` may have: no limit once ``source`` has answered one of our
        queries signed as the query's sender, else AMPLIFICATION_LIMIT times the query's size. A source
        address is not authenticated, so without this anyone could aim our answers at a victim; and a query
        seen before is a replay (we never reuse a txid), so it gets the small answer too."""
        known = self.table.get(query.sender)
        proven = (known is not None and known.address == source) or self._proven.get(source) == query.sender
        answered = (query.sender, query.txid)
        if proven and answered not in self._answered:
            self._answered[answered] = None
            while len(self._answered) > MAX_ANSWERED:
                self._answered.popitem(last=False)
            return None
        self.counters["replies_to_unproven"] += 1
        return AMPLIFICATION_LIMIT * size

    def _respond(self, query: Query, budget: int | None, nodes: tuple[Contact, ...],
                 values: tuple[PeerRecord, ...] = (), token: bytes | None = None) -> bytes:
        if budget is None:
            return codec.encode_response(self.identity, query.txid, nodes=nodes, values=values, token=token)
        return codec.encode_response_within(self.identity, query.txid, budget, nodes=nodes, values=values,
                                            token=token)

    def _answer(self, query: Query, source: Address, size: int) -> bytes:
        p = self.params
        if query.name == "ping":
            return codec.encode_response(self.identity, query.txid)  # no larger than the ping
        assert query.target is not None
        nodes = tuple(self.table.closest(query.target, min(p.k, MAX_NODES)))
        if query.name == "find_node":
            return self._respond(query, self._reply_budget(query, source, size), nodes)
        now = self._wall_clock()
        if query.name == "get_peers":
            budget = self._reply_budget(query, source, size)
            values = self.store.get(query.target, now, MAX_VALUES, self._rng) if budget is None else ()
            token = issue_token(self._secrets, source[0])  # useless to a spoofer: it binds the victim's IP
            return self._respond(query, budget, nodes, values, token)
        assert query.token is not None and query.record is not None
        if not token_valid(self._secrets, query.token, source[0]):
            self.counters["dropped_bad_token"] += 1
            return codec.encode_error(self.identity, query.txid, ERROR_BAD_TOKEN, "bad or expired token")
        try:
            query.record.check_fresh(now, key=query.target)
        except RemoteProtocolError as exc:
            self.counters["dropped_bad_record"] += 1
            return codec.encode_error(self.identity, query.txid, ERROR_PROTOCOL, str(exc))
        refusal = self.store.add(query.record, source[0], now)
        if refusal is not None:
            self.counters[f"refused_{refusal}"] += 1
            return codec.encode_response(self.identity, query.txid, stored=False)
        self.counters["records_stored"] += 1
        return codec.encode_response(self.identity, query.txid, stored=True)

    @property
    def verifications_pending(self) -> int:
        """Background pings still checking nodes that contacted us (they join the table once they answer)."""
        return len(self._verifying)

    def _heard_query(self, sender: bytes, source: Address) -> None:
        """Ping back a sender we cannot answer in full yet: one new to us, or a node we know that now asks from
        another address (restarted on a new port). Its answer proves the address, so its next queries get
        records; without this, a restarted node asked from an address nobody ever queried, and got none.

        A query refreshes nothing in the table: its source address is not authenticated, and anyone who once
        received a node's signed query can send it again, so it proves neither where the node is nor that it
        is still up. Counting it would let a replay keep a dead contact in the table for ever."""
        known = self.table.get(sender)
        if known is not None and known.address == source:
            return
        if self._proven.get(source) == sender:
            return
        if source in self._verifying or len(self._verifying) >= self.params.max_background_pings:
            self.counters["skipped_verification"] += 1
            return
        self._verifying.add(source)
        self._nursery.start_soon(self._verify, source)

    async def _verify(self, address: Address) -> None:
        try:
            await self._ping_quietly(address)  # a response lands in the table via _learn
        finally:
            self._verifying.discard(address)

    def _learn(self, contact: Contact) -> None:
        action = self.table.observe(contact, trio.current_time())
        if isinstance(action, PingOldest):
            if len(self._verifying) >= self.params.max_background_pings:
                self.table.cancel_check(action)  # no news of the oldest: it must not count as an answer
                self.counters["routing_rejected_bucket_full"] += 1
                return
            self._verifying.add(action.oldest.address)
            self._nursery.start_soon(self._evict_check, action)
        elif isinstance(action, Rejected):
            self.counters[f"routing_rejected_{action.reason}"] += 1

    async def _evict_check(self, action: PingOldest) -> None:
        alive = False
        try:
            contact = await self.ping(action.oldest.address)
            alive = contact.id == action.oldest.id
        except (DhtTimeout, DhtErrorReply):
            pass
        finally:
            self._verifying.discard(action.oldest.address)
            self.table.ping_result(action, alive, trio.current_time())

    # --- maintenance --------------------------------------------------------------------------------------

    async def _maintain(self) -> None:
        p = self.params
        while True:
            await trio.sleep(p.maintenance_interval)
            now = trio.current_time()
            if now - self._secrets.rotated_at >= p.token_rotation:
                self._secrets = self._secrets.rotate(os.urandom(SECRET_BYTES), now)
            expired = self.store.expire(self._wall_clock())
            self.counters["records_expired"] += expired
            if self.bootstrap_peers and not len(self.table):
                # the peers were down when we started (or every contact has died since): without this a node
                # stays out of the network for good, its own announcements kept to itself
                self.counters["rejoins"] += 1
                if await self.bootstrap(self.bootstrap_peers):
                    self._last_republish = now - p.republish_interval  # somebody to announce to at last
            for index in self.table.stale_buckets(now, p.refresh_interval)[:8]:
                self.counters["bucket_refreshes"] += 1
                await self.lookup(self.table.random_id_in_bucket(index, os.urandom(32)))
            if self._announcements and now - self._last_republish >= p.republish_interval:
                self._last_republish = now
                for (key, role), url in list(self._announcements.items()):
                    await self.announce(self._record(key, role, url))


async def serve(identity: SigningKey, listen: Address, bootstrap: Iterable[Address] = (), *,
                params: DhtParams = DhtParams(), wall_clock: Callable[[], float] = time.time,
                task_status: trio.TaskStatus[DhtNode] = trio.TASK_STATUS_IGNORED) -> None:
    """Bind a UDP socket on ``listen`` (port 0 picks one), join via ``bootstrap``, report the node, serve."""
    host = parse_host(listen[0])
    sock = trio.socket.socket(stdlib_socket.AF_INET, stdlib_socket.SOCK_DGRAM)
    with sock:
        await sock.bind((host, listen[1]))
        async with trio.open_nursery() as nursery:
            node = DhtNode(identity, sock, params, nursery, wall_clock=wall_clock)
            nursery.start_soon(node._receive_loop)
            nursery.start_soon(node._maintain)
            peers = node.bootstrap_peers = [a for a in bootstrap if tuple(a) != node.address]
            if peers:
                await node.bootstrap(peers)
            task_status.started(node)


async def run_dht(identity: SigningKey, listen: Address, bootstrap: list[Address], *,
                  params: DhtParams = DhtParams(),
                  task_status: trio.TaskStatus[DhtNode] = trio.TASK_STATUS_IGNORED) -> None:
    """The daemons' entry point: ``node = await nursery.start(run_dht, key, listen, bootstrap)``.

    With no bootstrap peers the node runs alone and ``find_mediators`` returns what was announced to it (often
    nothing): callers merge that with their configured mediators.
    """
    await serve(identity, listen, bootstrap, params=params, task_status=task_status)

"""Real DHT networks over UDP on loopback: discovery, churn, poisoning, floods and fuzzed datagrams."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import trio
from dht_netfixture import TEST_PARAMS, Network, loopback_host, total

from fincryptfs.core.identity import SigningKey
from fincryptfs.dht import codec
from fincryptfs.dht.codec import MAX_DATAGRAM, Response
from fincryptfs.dht.contact import Contact, distance
from fincryptfs.dht.node import DhtErrorReply, DhtParams, DhtTimeout
from fincryptfs.dht.records import MEDIATORS_KEY, PeerRecord, mediators_key

T = TypeVar("T")


async def searched(search: Callable[[], Awaitable[T]], ok: Callable[[T], bool], attempts: int = 7) -> T:
    """``search()`` until ``ok(result)``, at most ``attempts`` times, a little later each time (12.6 s of waits
    in all): on a loaded host (a fresh-clone CI run, two suites at once) replies can miss the query timeout and
    hide a record or a node from one search, or from every pass of searches made back to back (a fresh-clone CI
    run found nothing in three in a row; a full suite run beside other work, in five over 3 s), and the
    product's discovery loops search again later too."""
    for attempt in range(attempts - 1):
        result = await search()
        if ok(result):
            return result
        await trio.sleep(0.2 * 2 ** attempt)
    return await search()


async def test_lookups_find_announced_mediators(network: Network) -> None:
    nodes = await network.grow(100)
    m1, m2 = nodes[10], nodes[60]
    assert await m1.announce_mediator("http://127.0.0.11:8700") >= 4
    assert await m2.announce_mediator("http://127.0.0.61:8700") >= 4
    eu = await nodes[20].announce_mediator("http://127.0.0.21:8700", key=mediators_key("eu"))
    assert eu >= 4
    expected = {(m1.identity.id, "http://127.0.0.11:8700"), (m2.identity.id, "http://127.0.0.61:8700")}
    for searcher in random.Random(1).sample(nodes, 6):
        # what a node learns over a few searches, as storaged's discovery loop keeps what each pass finds (on a
        # loaded host, late replies hid one record from three searches in a row of one searcher; and a node
        # answers records to an address only once that address has answered its ping-back)
        seen: set[tuple[str, str]] = set()
        for attempt in range(8):
            seen.update((r.id, r.url) for r in await searcher.find_mediators())
            if seen == expected:
                break
            await network.settle()  # the ping-backs the search caused
            await trio.sleep(0.2 * (attempt + 1))  # as the loop does, a little later
        assert seen == expected
    eu_found = await searched(lambda: nodes[3].find_mediators(key=mediators_key("eu")), bool)
    assert [r.id for r in eu_found] == [nodes[20].identity.id]
    # an iterative lookup for a node's own id finds that node first, in a few hops
    result = await searched(lambda: nodes[0].lookup(nodes[77].id),
                            lambda r: bool(r.contacts) and r.contacts[0].id == nodes[77].id)
    assert result.contacts[0].id == nodes[77].id and result.contacts[0].address == nodes[77].address
    assert 1 <= result.hops <= 6
    assert total(nodes, "handler_errors") == 0


async def test_nodes_leaving_and_joining(network: Network) -> None:
    churn = DhtParams(query_timeout=0.5, lookup_timeout=10.0)
    nodes = await network.grow(60, params=churn)
    mediator = nodes[30]
    await mediator.announce_mediator("http://127.0.0.31:8700")
    # half of the nodes that really hold the record (the nearest first), and 20 nodes that hold nothing, leave
    now, rng = time.time(), random.Random(0)
    by_distance = sorted((n for n in nodes if n is not mediator), key=lambda n: distance(n.id, MEDIATORS_KEY))
    holders = [n for n in by_distance if n.store.get(MEDIATORS_KEY, now, 1, rng)]
    assert len(holders) >= 4
    others = [n for n in by_distance if id(n) not in set(map(id, holders))]
    leaving = set(map(id, holders[:len(holders) // 2])) | {id(n) for n in others[-20:]}
    for node in list(network.nodes):
        if id(node) in leaving and node is not mediator:
            network.stop(node)
    await trio.sleep(0.05)
    newcomers = await network.grow(15, start=100, params=churn)
    for searcher in [newcomers[-1], network.nodes[5]]:
        # Right after churn a lookup can still spend its budget on departed contacts; like storaged's discovery
        # loop, a searcher asks again a little later, and each attempt prunes the dead contacts it ran into
        # (four attempts back to back all came back empty once, in a fresh-clone CI run).
        found: list[str] = []
        for attempt in range(6):
            found = [r.id for r in await searcher.find_mediators()]
            if found:
                break
            await trio.sleep(0.2 * (attempt + 1))
        assert found == [mediator.identity.id]
    # a departed node is not reported as the nearest to its own id once the lookup has tried it
    gone = holders[0]
    result = await newcomers[0].lookup(gone.id)
    assert gone.id not in {c.id for c in result.contacts}
    # and lookups still find live nodes. A node whose reply misses the 0.5 s query timeout (an overloaded host:
    # 1 CI run in ~20) is left out of that one lookup's result, as in any Kademlia; the next lookup asks again.
    target = network.nodes[12]
    result = await searched(lambda: newcomers[3].lookup(target.id),
                            lambda r: bool(r.contacts) and r.contacts[0].id == target.id)
    assert result.contacts[0].id == target.id, "five lookups, a little later each, missed a live node"


async def test_a_poisoning_attempt_from_one_address_is_contained(network: Network) -> None:
    honest = await network.grow(50)
    mediator = honest[25]
    await mediator.announce_mediator("http://127.0.0.26:8700")
    attacker_ip = "127.66.0.1"
    sybils = [await network.add(attacker_ip, bootstrap=[honest[i % 50].address]) for i in range(60)]
    for sybil in sybils[:20]:  # each announces itself as a mediator: validly signed, but from one host
        await sybil.announce_mediator(f"http://{attacker_ip}:9999")
    await network.settle()  # the honest nodes have checked the newcomers, as they would have before long
    for node in honest:
        from_attacker = [c for c in node.table.contacts() if c.host == attacker_ip]
        assert len(from_attacker) <= 8
        per_bucket = [node.table.bucket_index(c.id) for c in from_attacker]
        assert all(per_bucket.count(b) <= 2 for b in per_bucket)
        per_key = [r for r in node.store.get(MEDIATORS_KEY, 1e12 * 0 + node._wall_clock(), 10**6, random.Random())
                   if r.url.startswith(f"http://{attacker_ip}")]
        assert len(per_key) <= 4
    assert total(honest, "routing_rejected_ip_limit") > 0
    found = await searched(honest[7].find_mediators, lambda rs: mediator.identity.id in {r.id for r in rs})
    assert mediator.identity.id in {r.id for r in found}
    target = honest[40]
    nearest = await searched(lambda: honest[2].lookup(target.id),
                             lambda r: bool(r.contacts) and r.contacts[0].id == target.id)
    assert nearest.contacts[0].id == target.id


async def test_fuzzed_datagrams_never_crash_a_node(network: Network) -> None:
    node = await network.add("127.0.0.1", params=DhtParams(rate=1e9, burst=1e9, query_timeout=0.5))
    peer = await network.add("127.0.0.2")
    rng = random.Random(2024)
    key = SigningKey.generate()
    record = PeerRecord.sign(key, key=MEDIATORS_KEY, role="mediator", url="http://x.example", expires_at=2**40)
    seeds = [
        codec.encode_query(key, "01" * 8, "ping"),
        codec.encode_query(key, "02" * 8, "find_node", target=b"\x05" * 32),
        codec.encode_query(key, "03" * 8, "get_peers", target=MEDIATORS_KEY),
        codec.encode_query(key, "04" * 8, "announce_peer", target=MEDIATORS_KEY, token=b"\x00" * 16,
                           record=record),
        codec.encode_response(key, "05" * 8, nodes=(), token=b"\x01" * 16),
    ]

    def mutate(data: bytes) -> bytes:
        choice = rng.randrange(6)
        b = bytearray(data)
        if choice == 0:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif choice == 1:
            del b[rng.randrange(len(b)):]
        elif choice == 2:
            return rng.randbytes(rng.randint(0, 300))
        elif choice == 3:
            return b"[" * rng.randint(10, 4000)
        elif choice == 4:
            return data + b" " * rng.randint(1, MAX_DATAGRAM)
        else:
            obj = json.loads(data)
            obj["body"][rng.choice(list(obj["body"]))] = rng.choice([None, 1, -1, "x", [], {}, 2**70, True])
            return json.dumps(obj, sort_keys=rng.random() < 0.5).encode()
        return bytes(b)

    with trio.socket.socket(type=trio.socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.9.1", 0))
        for i in range(1500):
            await sock.sendto(mutate(rng.choice(seeds)), node.address)
            if i % 100 == 0:
                await trio.sleep(0.01)
        await sock.sendto(b"x" * 60000, node.address)
        await trio.sleep(0.2)
    dropped = sum(v for k, v in node.counters.items() if k.startswith("dropped_"))
    assert dropped >= 1000
    assert node.counters["dropped_oversized"] >= 1 and node.counters["dropped_malformed"] >= 1
    assert node.counters["dropped_bad_signature"] >= 1
    assert node.counters["handler_errors"] == 0
    assert (await peer.ping(node.address)).id == node.id  # still serving
    # bounded state: well-formed queries among the mutations (e.g. with added whitespace) are verified by a
    # ping back to the fuzzer, at most max_background_pings at a time
    assert len(node._pending) <= node.params.max_background_pings
    assert len(node.store) == 0 and len(node.table) <= 2
    # the same mutations fed straight to the handler, many more of them
    for _ in range(3000):
        node.handle_datagram(mutate(rng.choice(seeds)), ("127.0.9.2", 1))
    assert node.counters["handler_errors"] == 0


async def test_a_flood_from_one_source_is_rate_limited(network: Network) -> None:
    node = await network.add("127.0.0.1", params=DhtParams(rate=50, burst=100, query_timeout=0.5))
    peer = await network.add("127.0.0.2")
    flooder = SigningKey.generate()
    ping = codec.encode_query(flooder, "aa" * 8, "ping")
    with trio.socket.socket(type=trio.socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.9.9", 0))
        for i in range(2000):
            await sock.sendto(ping, node.address)
            if i % 200 == 0:
                await trio.sleep(0.001)
        await trio.sleep(0.2)
    assert node.counters["dropped_rate_limited"] >= 1500
    assert node.counters["queries_received"] <= 400
    assert (await peer.ping(node.address)).id == node.id  # others are still served


async def test_bad_tokens_and_forged_records_are_refused(network: Network) -> None:
    node = await network.add("127.0.0.1")
    client = await network.add("127.0.0.2")
    mediator_key = SigningKey.generate()
    record = PeerRecord.sign(mediator_key, key=MEDIATORS_KEY, role="mediator", url="http://m.example",
                             expires_at=int(node._wall_clock()) + 600)
    try:
        await client._request(node.address, "announce_peer", target=MEDIATORS_KEY, token=b"\x00" * 16,
                              record=record)
        raise AssertionError("a bad token was accepted")
    except DhtErrorReply as exc:
        assert "token" in str(exc)
    assert node.counters["dropped_bad_token"] == 1 and len(node.store) == 0
    # a token issued to another IP is no good either
    token = (await client.get_peers(node.address, MEDIATORS_KEY)).token
    assert token is not None
    third = await network.add("127.0.0.3")
    try:
        await third._request(node.address, "announce_peer", target=MEDIATORS_KEY, token=token, record=record)
        raise AssertionError("a token for another IP was accepted")
    except DhtErrorReply:
        pass
    # with its own token, a relayed record signed by the mediator is stored and verifies on retrieval
    stored = await client._request(node.address, "announce_peer", target=MEDIATORS_KEY, token=token,
                                   record=record)
    assert stored.stored is True
    assert [r.id for r in (await third.get_peers(node.address, MEDIATORS_KEY)).values] == [mediator_key.id]
    # an expired record is refused
    old = PeerRecord.sign(mediator_key, key=MEDIATORS_KEY, role="mediator", url="http://m.example",
                          expires_at=int(node._wall_clock()) - 1)
    try:
        await client._request(node.address, "announce_peer", target=MEDIATORS_KEY, token=token, record=old)
        raise AssertionError("an expired record was accepted")
    except DhtErrorReply:
        assert node.counters["dropped_bad_record"] == 1


async def test_lookups_time_out_cleanly(network: Network) -> None:
    params = DhtParams(query_timeout=0.2, lookup_timeout=1.0)
    with trio.socket.socket(type=trio.socket.SOCK_DGRAM) as silent:
        await silent.bind(("127.0.5.1", 0))
        node = await network.add("127.0.0.1", params=params, bootstrap=[silent.getsockname()])
        assert len(node.table) == 0
        with trio.fail_after(1):
            try:
                await node.ping(silent.getsockname())
                raise AssertionError("a silent peer answered")
            except DhtTimeout as exc:
                assert "did not answer" in str(exc)
    # a lookup whose peers all went away ends with an empty result, not a hang
    alive = await network.add("127.0.0.2", params=params, bootstrap=[node.address])
    await trio.sleep(0.05)
    assert node.table.get(alive.id) is not None
    network.stop(alive)
    with trio.fail_after(2):
        result = await node.lookup(b"\x01" * 32)
    assert result.contacts == () and node.counters["query_timeouts"] >= 1


async def test_a_node_without_bootstrap_peers_works_alone_and_serves_joiners(network: Network) -> None:
    mediator = await network.add(loopback_host(1), bootstrap=[])
    assert await mediator.announce_mediator("http://127.0.0.2:8700") == 1  # kept locally
    assert [r.url for r in await mediator.find_mediators()] == ["http://127.0.0.2:8700"]
    joiner = await network.add(loopback_host(2), bootstrap=[mediator.address])
    assert [r.id for r in await joiner.find_mediators()] == [mediator.identity.id]
    assert TEST_PARAMS.k == 8


async def test_claims_of_a_known_id_at_a_dead_address_do_not_evict_it(network: Network,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A node answers lookups naming an honest node's id at an address where nobody answers: the timeouts
    there are the claim's, not the honest node's, which stays in the table."""
    params = DhtParams(k=2, query_timeout=0.3, lookup_timeout=5.0)
    keys = [SigningKey.generate() for _ in range(3)]
    target = bytes(a ^ b for a, b in zip(bytes.fromhex(keys[0].id), b"\0" * 31 + b"\1", strict=True))
    liar_key, silent_key, honest_key = sorted(keys, key=lambda k: distance(bytes.fromhex(k.id), target))
    victim = await network.add("127.6.0.1", bootstrap=[], params=params)
    honest = await network.add("127.6.0.2", key=honest_key, bootstrap=[], params=params)
    liar = await network.add("127.6.0.3", key=liar_key, bootstrap=[], params=params)
    claim = Contact(honest.id, "127.6.0.99", 9)
    monkeypatch.setattr(liar, "_answer", lambda query, *_: codec.encode_response(
        liar.identity, query.txid, nodes=(claim,)))
    now = trio.current_time()
    victim.table.observe(Contact(honest.id, *honest.address), now)
    victim.table.observe(Contact(liar.id, *liar.address), now)
    victim.table.observe(Contact(bytes.fromhex(silent_key.id), "127.6.0.4", 9), now)  # nearer, never answers
    for _ in range(3):
        await victim.lookup(target)
    assert victim.table.get(honest.id) == Contact(honest.id, *honest.address)
    assert await victim.ping(honest.address)


async def test_answers_to_an_unproven_address_are_no_larger_than_three_queries(network: Network) -> None:
    """A get_peers with a forged source address (or replayed) must not make a node a traffic amplifier."""
    node = await network.add("127.7.0.1", bootstrap=[])
    now = int(time.time())
    for i in range(8):
        node.table.observe(Contact(bytes.fromhex(SigningKey.generate().id), f"203.0.113.{100 + i}", 65535),
                           trio.current_time())
    for i in range(5):
        url = "https://" + ".".join(["m" * 63] * 3) + f".example{i}.com/" + "p" * 30  # long, as DNS allows
        record = PeerRecord.sign(SigningKey.generate(), key=MEDIATORS_KEY, role="mediator", url=url[:256],
                                 expires_at=now + 3600)
        assert node.store.add(record, f"198.18.0.{i}", now) is None
    query = codec.encode_query(SigningKey.generate(), "0123456789abcdef", "get_peers", target=MEDIATORS_KEY)
    victim = ("192.0.2.77", 53)
    replies = [node.handle_datagram(query, victim) for _ in range(20)]
    assert all(r is not None and len(r) <= 3 * len(query) for r in replies)
    first = codec.decode_message(replies[0] or b"")
    assert isinstance(first, Response) and first.token and first.nodes and not first.values
    find = codec.encode_query(SigningKey.generate(), "0123456789abcdef", "find_node", target=MEDIATORS_KEY)
    assert len(node.handle_datagram(find, victim) or b"") <= 3 * len(find)


async def test_a_proven_asker_gets_full_answers_but_not_for_a_replayed_query(network: Network) -> None:
    node = await network.add("127.7.0.2", bootstrap=[])
    asker = await network.add("127.7.0.3", bootstrap=[])
    mediator = await network.add("127.7.0.4", bootstrap=[])
    await mediator.announce_mediator("http://127.7.0.4:8700")  # alone: kept in its own store
    first = await asker.get_peers(mediator.address, MEDIATORS_KEY)
    assert first.token is not None and first.values == ()  # first contact: the asker's address is unproven
    with trio.fail_after(10):
        while mediator.verifications_pending:  # the mediator pings the asker back, which answers
            await trio.sleep(0.01)
    again = await asker.get_peers(mediator.address, MEDIATORS_KEY)
    assert [r.url for r in again.values] == ["http://127.7.0.4:8700"]
    # the same signed query arriving twice is a replay (a node never reuses a txid): small answer
    query = codec.encode_query(asker.identity, "fedcba9876543210", "get_peers", target=MEDIATORS_KEY)
    answers = [codec.decode_message(mediator.handle_datagram(query, asker.address) or b"") for _ in range(2)]
    assert [len(a.values) for a in answers if isinstance(a, Response)] == [1, 0]
    assert node.counters["handler_errors"] == mediator.counters["handler_errors"] == 0


async def test_a_node_restarted_on_another_port_finds_the_mediator_again(network: Network) -> None:
    """Same identity, new address (storaged binds its DHT port afresh at each start): the nodes that knew it at
    its old address must not keep answering it as an unproven stranger, with no records, for ever."""
    mediator = await network.add(loopback_host(1), bootstrap=[])
    assert await mediator.announce_mediator("http://127.0.0.2:8700") == 1
    key = SigningKey.generate()
    node = await network.add(loopback_host(2), key=key, bootstrap=[mediator.address])
    assert [r.id for r in await node.find_mediators()] == [mediator.identity.id]
    await network.settle()
    network.stop(node)
    again = await network.add(loopback_host(2), key=key, bootstrap=[mediator.address])
    assert again.address != node.address
    with trio.fail_after(10):
        while not await again.find_mediators():
            await trio.sleep(0.1)
    assert [r.id for r in await again.find_mediators()] == [mediator.identity.id]


def _id_in_top_bucket(of: bytes) -> SigningKey:
    """A key whose id falls in the farthest bucket (255) of ``of``'s table."""
    while True:
        key = SigningKey.generate()
        if (bytes.fromhex(key.id)[0] ^ of[0]) & 0x80:
            return key


async def test_a_dead_contact_is_not_kept_while_background_pings_are_all_taken(network: Network) -> None:
    """A newcomer for a full bucket when no ping can be spared is turned away; that is no news about the
    bucket's oldest contact, which must not count as having answered (its timeouts would start again from 0,
    and a dead contact would never leave while the pings stay taken, as a flood of queries can keep them)."""
    params = DhtParams(k=1, query_timeout=1.0, lookup_timeout=3.0, max_background_pings=0)
    node = await network.add("127.8.0.1", bootstrap=[], params=params)
    newcomer = await network.add("127.8.0.2", key=_id_in_top_bucket(node.id), bootstrap=[])
    dead = Contact(bytes([node.id[0] ^ 0x80]) + node.id[1:], "127.8.0.9", 9)  # bucket 255, nobody answers
    node.table.observe(dead, trio.current_time())
    for _ in range(2):
        await node.lookup(newcomer.id)  # the only contact times out: two failures in a row
    assert await node.ping(newcomer.address)  # its answer finds bucket 255 full, and no ping to spare
    assert node.table.get(newcomer.id) is None and node.counters["routing_rejected_bucket_full"] == 1
    await node.lookup(newcomer.id)  # the third timeout in a row
    assert node.table.get(dead.id) is None
    assert node.counters["handler_errors"] == 0


async def test_a_replayed_query_does_not_keep_a_dead_contact(network: Network) -> None:
    """A query proves neither its source address (UDP) nor that its sender is up (anyone who received it can
    send it again): a dead node's query replayed from its old address must not reset its timeouts."""
    params = DhtParams(query_timeout=1.0, lookup_timeout=3.0)
    node = await network.add("127.8.1.1", bootstrap=[], params=params)
    peer = await network.add("127.8.1.2", bootstrap=[node.address])
    await network.settle()
    address = peer.address
    assert node.table.get(peer.id) == Contact(peer.id, *address)
    captured = codec.encode_query(peer.identity, "0123456789abcdef", "find_node", target=node.id)
    network.stop(peer)
    for _ in range(2):
        await node.lookup(peer.id)  # two timeouts in a row at the dead peer
    spoofer = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    with spoofer, trio.fail_after(5):
        while True:  # the dead node's socket closes as its task unwinds
            try:
                await spoofer.bind(address)
                break
            except OSError:
                await trio.sleep(0.05)
        received = node.counters["queries_received"]
        await spoofer.sendto(captured, node.address)
        while node.counters["queries_received"] == received:
            await trio.sleep(0.01)
    await node.lookup(peer.id)  # the third timeout in a row
    assert node.table.get(peer.id) is None
    assert node.counters["handler_errors"] == 0


async def test_a_node_whose_bootstrap_peer_was_down_joins_once_it_is_up(network: Network) -> None:
    """A mediator started while its bootstrap peer is down (both restarted together) runs alone at first; it
    must join, and announce, once the peer is up, not stay out of the network with its record kept to itself."""
    params = DhtParams(query_timeout=0.3, lookup_timeout=3.0, maintenance_interval=0.2)
    probe = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    with probe:
        await probe.bind(("127.8.2.1", 0))
        peer_address = probe.getsockname()
    mediator = await network.add("127.8.2.2", bootstrap=[peer_address], params=params)
    assert len(mediator.table) == 0
    assert await mediator.announce_mediator("http://127.8.2.2:8700") == 1  # kept in its own store only
    await network.add(peer_address[0], port=peer_address[1], bootstrap=[])  # the bootstrap peer comes up
    client = await network.add("127.8.2.3", bootstrap=[peer_address])
    found = await searched(client.find_mediators, bool)
    assert [r.id for r in found] == [mediator.identity.id]
    assert mediator.table.get(network.nodes[1].id) is not None


async def test_a_flood_from_a_nodes_ip_does_not_silence_its_answers(network: Network) -> None:
    """The rate limit is keyed on the source IP, which proves nothing (spoofed, or another host behind the
    same NAT). A flood from a node's IP must not make its answers to our own queries drop, or anyone could
    get an honest node evicted from chosen routing tables at 50 datagrams/s."""
    node = await network.add("127.8.3.1", bootstrap=[], params=DhtParams(rate=50, burst=100, query_timeout=0.5))
    honest = await network.add("127.8.3.2", bootstrap=[])
    junk = codec.encode_query(SigningKey.generate(), "bb" * 8, "ping")

    async def flood(sock: trio.socket.SocketType) -> None:
        while True:
            for _ in range(20):
                await sock.sendto(junk, node.address)
            await trio.sleep(0.005)  # ~4,000 datagrams/s, far over the limit

    with trio.socket.socket(type=trio.socket.SOCK_DGRAM) as sock:
        await sock.bind((honest.address[0], 0))  # the honest node's IP, another port
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood, sock)
            await trio.sleep(0.1)
            for _ in range(3):
                assert (await node.ping(honest.address)).id == honest.id
            nursery.cancel_scope.cancel()
    assert node.counters["dropped_rate_limited"] >= 100  # the flood itself is still limited
    assert node.counters["handler_errors"] == 0

"""The pure DHT modules: routing table, iterative lookup, tokens, peer store, rate limiter."""

import hashlib
import random
import time
from collections.abc import Set

from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs.core.identity import SigningKey
from fincryptfs.dht.contact import Contact, distance
from fincryptfs.dht.lookup import Lookup
from fincryptfs.dht.peerstore import PeerStore
from fincryptfs.dht.ratelimit import RateLimiter
from fincryptfs.dht.records import MEDIATORS_KEY, PeerRecord
from fincryptfs.dht.routing import Added, PingOldest, Refreshed, Rejected, RoutingTable
from fincryptfs.dht.tokens import TokenSecrets, issue_token, token_valid

OWN = b"\x00" * 32


def nid(n: int) -> bytes:
    return hashlib.sha256(n.to_bytes(8, "big")).digest()


def far(n: int) -> bytes:
    """Ids that all fall in the farthest bucket (255) of OWN."""
    return bytes([0x80 | (n & 0x7F)]) + nid(n)[1:]


# --- routing table ------------------------------------------------------------------------------------------


def test_adds_refreshes_and_orders_by_distance() -> None:
    table = RoutingTable(OWN)
    contacts = [Contact(nid(i), f"10.0.{i}.1", 4000) for i in range(40)]
    for c in contacts:
        table.observe(c, 0.0)
    assert isinstance(table.observe(contacts[0], 1.0), Refreshed)
    target = nid(999)
    closest = table.closest(target)
    assert len(closest) == 8
    assert closest == sorted(table.contacts(), key=lambda c: distance(c.id, target))[:8]
    assert isinstance(table.observe(Contact(OWN, "10.9.9.9", 1), 0), Rejected)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=120, unique=True),
       st.binary(min_size=32, max_size=32))
def test_closest_is_the_true_nearest_of_the_table(ids: list[bytes], target: bytes) -> None:
    table = RoutingTable(OWN, k=8, max_per_ip=10**6, max_per_ip_bucket=10**6)
    for i, node_id in enumerate(ids):
        table.observe(Contact(node_id, "10.0.0.1", 1 + i), 0.0)
    assert all(len([c for c in table.contacts() if table.bucket_index(c.id) == b]) <= 8 for b in range(256))
    held = table.contacts()
    assert table.closest(target, 5) == sorted(held, key=lambda c: distance(c.id, target))[:5]


def test_per_ip_limits_contain_one_host() -> None:
    table = RoutingTable(OWN, max_per_ip_bucket=2, max_per_ip=8)
    actions = [table.observe(Contact(nid(i), "6.6.6.6", 1000 + i), 0.0) for i in range(500)]
    assert sum(isinstance(a, Added) for a in actions) == 8
    assert all(a.reason == "ip_limit" for a in actions if isinstance(a, Rejected))
    # two per bucket: the farthest bucket (half of all random ids) holds only two from that host
    assert len([c for c in table.contacts() if table.bucket_index(c.id) == 255]) == 2


def test_an_address_keeps_its_id_and_an_id_keeps_its_address() -> None:
    table = RoutingTable(OWN)
    table.observe(Contact(nid(1), "10.0.0.1", 5), 0.0)
    assert table.observe(Contact(nid(2), "10.0.0.1", 5), 0.0) == Rejected(Contact(nid(2), "10.0.0.1", 5),
                                                                          "address_taken")
    moved = table.observe(Contact(nid(1), "10.0.0.2", 5), 0.0)
    assert isinstance(moved, Rejected) and moved.reason == "id_moved"
    assert table.get(nid(1)) == Contact(nid(1), "10.0.0.1", 5)


def test_full_bucket_pings_oldest_and_keeps_it_if_alive() -> None:
    table = RoutingTable(OWN, k=8)
    olds = [Contact(far(i), f"10.1.0.{i}", 1) for i in range(8)]
    for c in olds:
        assert isinstance(table.observe(c, float(len(table))), Added)
    newcomer = Contact(far(100), "10.2.0.1", 1)
    action = table.observe(newcomer, 10.0)
    assert action == PingOldest(olds[0], newcomer)
    # a second newcomer while the check runs is turned away: one check per bucket at a time
    assert isinstance(table.observe(Contact(far(101), "10.2.0.2", 1), 10.0), Rejected)
    table.ping_result(action, True, 11.0)
    assert table.get(newcomer.id) is None and table.get(olds[0].id) == olds[0]
    # now olds[1] is the least recently seen; if it is dead the newcomer replaces it
    action = table.observe(newcomer, 12.0)
    assert isinstance(action, PingOldest) and action.oldest == olds[1]
    assert isinstance(table.ping_result(action, False, 13.0), Added)
    assert table.get(olds[1].id) is None and table.get(newcomer.id) == newcomer


def test_repeated_failures_drop_a_contact() -> None:
    table = RoutingTable(OWN)
    c = Contact(nid(5), "10.0.0.5", 1)
    table.observe(c, 0)
    assert not table.failed(c) and not table.failed(c)
    assert table.failed(c)
    assert table.get(c.id) is None and len(table) == 0


def test_failures_at_another_address_do_not_count_against_a_contact() -> None:
    """A lookup candidate claiming a known node's id at a dead address: its timeouts are not the node's."""
    table = RoutingTable(OWN)
    honest = Contact(nid(5), "10.0.0.5", 1)
    table.observe(honest, 0)
    impostor = Contact(honest.id, "10.0.0.99", 9)
    assert not any(table.failed(impostor) for _ in range(10))
    assert table.get(honest.id) == honest
    assert not table.failed(honest) and not table.failed(honest) and table.failed(honest)


def test_refresh_picks_stale_buckets_and_ids_inside_them() -> None:
    table = RoutingTable(OWN)
    table.observe(Contact(far(1), "10.0.0.1", 1), 0.0)
    table.observe(Contact(b"\x00" * 31 + b"\x10", "10.0.0.2", 1), 100.0)  # bucket 4
    assert table.stale_buckets(150.0, 100.0) == list(range(5, 256))
    rng = random.Random(1)
    for index in (0, 4, 100, 255):
        node_id = table.random_id_in_bucket(index, rng.randbytes(32))
        assert table.bucket_index(node_id) == index


# --- lookup -------------------------------------------------------------------------------------------------


def simulated_network(n: int, k: int = 8) -> dict[bytes, RoutingTable]:
    """Every node has heard of every other once: full k-buckets, as a settled Kademlia network has."""
    rng = random.Random(7)
    ids = [rng.randbytes(32) for _ in range(n)]
    tables = {i: RoutingTable(i, k=k, max_per_ip=10**6, max_per_ip_bucket=10**6) for i in ids}
    for table in tables.values():
        for port, other in enumerate(ids, 1):
            table.observe(Contact(other, "10.0.0.1", port), 0.0)
    return tables


def run_lookup(tables: dict[bytes, RoutingTable], start: bytes, target: bytes, dead: Set[bytes] = frozenset()
               ) -> Lookup:
    lookup = Lookup(target, tables[start].closest(target), own_id=start, max_per_ip=10**6)
    while not lookup.done:
        batch = lookup.next_queries()
        assert batch and len(batch) <= 3
        for c in batch:
            if c.id in dead:
                lookup.on_timeout(c)
            else:
                lookup.on_response(c, c.id, tuple(tables[c.id].closest(target)))
    return lookup


def test_lookup_finds_the_true_nearest_nodes() -> None:
    tables = simulated_network(200)
    ids = sorted(tables)
    for target in (ids[5], nid(77), nid(78)):
        lookup = run_lookup(tables, ids[0], target)
        expected = sorted((i for i in ids if i != ids[0]), key=lambda i: distance(i, target))[:8]
        assert [c.id for c, _ in lookup.result()] == expected
        assert 1 <= lookup.hops <= 6 and lookup.queries_sent <= 64


def test_lookup_routes_around_dead_nodes() -> None:
    tables = simulated_network(200)
    ids = sorted(tables)
    target = nid(123)
    dead = set(sorted(ids, key=lambda i: distance(i, target))[:4])
    lookup = run_lookup(tables, ids[1], target, dead)
    result = [c.id for c, _ in lookup.result()]
    assert not dead & set(result)
    expected = sorted((i for i in ids if i not in dead and i != ids[1]), key=lambda i: distance(i, target))[:8]
    # the dead nodes still fill slots in their neighbours' buckets, so the far end of the k may differ
    assert result[0] == expected[0] and len(set(result) & set(expected)) >= 6


def test_lookup_contains_one_host_answering_with_many_ids() -> None:
    target = nid(1)
    honest = [Contact(nid(100 + i), f"10.0.{i}.1", 1) for i in range(8)]
    lookup = Lookup(target, honest[:3], own_id=OWN, max_per_ip=2)
    first = lookup.next_queries()[0]
    # the attacker at 6.6.6.6 claims 1,000 ids, all nearer the target than anyone honest
    sybils = tuple(Contact(bytes(target[:-2]) + i.to_bytes(2, "big"), "6.6.6.6", 1000 + i) for i in range(1000))
    lookup.on_response(first, first.id, sybils[:8])
    queued = [c for c in lookup.next_queries()]
    assert len([c for c in queued if c.host == "6.6.6.6"]) <= 2


def test_a_claim_of_a_nodes_id_at_a_false_address_does_not_hide_the_node() -> None:
    """A liar answering first names the node nearest the target at an address where nobody answers. The lookup
    must still query that node where honest nodes say it is: else one liar on the path hides every holder of
    a key (a claim is only a claim until the address answers, signed by the id)."""
    target = nid(1)
    holder = Contact(target[:-1] + bytes([target[-1] ^ 1]), "10.0.9.1", 1)
    liar, honest = Contact(nid(50), "6.6.6.6", 1), Contact(nid(51), "10.0.1.1", 1)
    lookup = Lookup(target, [liar, honest], own_id=OWN)
    assert set(lookup.next_queries()) == {liar, honest}
    lookup.on_response(liar, liar.id, (Contact(holder.id, "192.0.2.1", 9),))
    lookup.on_response(honest, honest.id, (holder,))
    asked: list[Contact] = []
    while not lookup.done:
        for contact in lookup.next_queries():
            asked.append(contact)
            if contact == holder:
                lookup.on_response(contact, contact.id, ())
            else:
                lookup.on_timeout(contact)
    assert holder in asked
    assert [c for c, _ in lookup.result()] == [holder, honest, liar]
    assert lookup.hops == 2


def test_a_response_signed_by_another_id_counts_as_failure() -> None:
    c = Contact(nid(1), "10.0.0.1", 1)
    lookup = Lookup(nid(2), [c], own_id=OWN)
    assert lookup.next_queries() == [c]
    lookup.on_response(c, nid(3), (Contact(nid(4), "10.0.0.4", 1),))
    assert lookup.done and lookup.result() == []


# --- tokens, store, rate limiter ----------------------------------------------------------------------------


def test_tokens_bind_the_ip_and_survive_one_rotation() -> None:
    secrets = TokenSecrets(b"a" * 32, b"b" * 32, 0.0)
    token = issue_token(secrets, "10.0.0.1")
    assert token_valid(secrets, token, "10.0.0.1")
    assert not token_valid(secrets, token, "10.0.0.2")
    secrets = secrets.rotate(b"c" * 32, 300.0)
    assert token_valid(secrets, token, "10.0.0.1")
    secrets = secrets.rotate(b"d" * 32, 600.0)
    assert not token_valid(secrets, token, "10.0.0.1")


def test_peer_store_bounds_and_expiry() -> None:
    now = 1_000_000
    store = PeerStore(max_keys=2, max_per_key=5, max_per_ip_per_key=2)
    keys = [SigningKey(bytes([i]) * 32) for i in range(1, 9)]

    def rec(k: SigningKey, exp: int = now + 100, key: bytes = MEDIATORS_KEY) -> PeerRecord:
        return PeerRecord.sign(k, key=key, role="mediator", url="http://m.example", expires_at=exp)

    assert store.add(rec(keys[0]), "10.0.0.1", now) is None
    assert store.add(rec(keys[1]), "10.0.0.1", now) is None
    assert store.add(rec(keys[2]), "10.0.0.1", now) == "announcer_ip_limit"
    assert store.add(rec(keys[0], now + 50), "10.0.0.1", now) == "stale_record"
    assert store.add(rec(keys[0], now + 200), "10.0.0.1", now) is None  # re-announce replaces
    for i, k in enumerate(keys[2:5]):
        assert store.add(rec(k, now + 10), f"10.0.1.{i}", now) is None
    assert store.add(rec(keys[5]), "10.0.2.1", now) == "key_full"
    assert store.add(rec(keys[5], key=b"\x01" * 32), "10.0.2.1", now) is None
    assert store.add(rec(keys[5], key=b"\x02" * 32), "10.0.2.1", now) == "store_full"
    assert len(store.get(MEDIATORS_KEY, now, 3, random.Random(0))) == 3
    assert len(store.get(MEDIATORS_KEY, now + 20, 10, random.Random(0))) == 2  # three expired
    assert store.expire(now + 20) == 3 and len(store) == 3
    assert store.expire(now + 1000) == 3 and len(store) == 0


def test_re_announcing_from_another_ip_does_not_free_the_first_ips_quota() -> None:
    """A second host re-announcing the first one's records must not move them to its own IP: else two hosts
    take turns and fill the key."""
    now = 1_000_000
    store = PeerStore(max_per_key=64, max_per_ip_per_key=4)

    def rec(i: int, exp: int = now + 100) -> PeerRecord:
        return PeerRecord.sign(SigningKey(bytes([i]) * 32), key=MEDIATORS_KEY, role="mediator",
                               url=f"http://m{i}.example", expires_at=exp)

    for i in range(1, 5):
        assert store.add(rec(i), "10.0.0.1", now) is None
    for i in range(1, 5):  # the same records, and newer ones, from a second host: accepted as re-announcements
        assert store.add(rec(i), "10.0.0.2", now) is None
        assert store.add(rec(i, now + 200), "10.0.0.2", now) is None
    assert store.add(rec(5), "10.0.0.1", now) == "announcer_ip_limit"  # still charged to the first host
    for i in range(5, 9):  # and the second host's own quota is untouched
        assert store.add(rec(i), "10.0.0.2", now) is None
    assert store.add(rec(9), "10.0.0.2", now) == "announcer_ip_limit"
    assert len(store) == 8


def test_one_ip_announcing_under_many_keys_cannot_fill_the_store() -> None:
    """Keys are free to choose: without a limit over all keys, one host announcing a record under each of
    max_keys keys of its own fills the key table, and the node then refuses the mediators' key."""
    now = 1_000_000
    store = PeerStore(max_keys=256)  # the other limits at their defaults
    attacker = SigningKey(b"\x07" * 32)
    accepted = 0
    for i in range(256):
        record = PeerRecord.sign(attacker, key=hashlib.sha256(b"junk%d" % i).digest(), role="junk",
                                 url="http://x.example", expires_at=now + 100)
        accepted += store.add(record, "10.9.9.9", now) is None
    assert accepted == store.max_per_ip < store.max_keys
    mediator = PeerRecord.sign(SigningKey(b"\x08" * 32), key=MEDIATORS_KEY, role="mediator",
                               url="http://m.example", expires_at=now + 200)
    assert store.add(mediator, "10.0.0.1", now) is None
    # the quota is the host's again once its records expire
    assert store.expire(now + 150) == store.max_per_ip
    record = PeerRecord.sign(attacker, key=b"\x05" * 32, role="junk", url="http://x.example",
                             expires_at=now + 300)
    assert store.add(record, "10.9.9.9", now + 150) is None


def test_rate_limiter_is_per_source_and_bounded() -> None:
    limiter = RateLimiter(rate=10, burst=5, max_sources=100)
    assert [limiter.allow("a", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow("b", 0.0)
    assert limiter.allow("a", 0.1) and not limiter.allow("a", 0.1)
    for i in range(1000):
        limiter.allow(f"s{i}", 1.0)
    assert len(limiter) == 100


_SIGNER = SigningKey(b"\x05" * 32)
_ENVELOPE = PeerRecord.sign(_SIGNER, key=MEDIATORS_KEY, role="mediator", url="http://m.example",
                            expires_at=1).envelope


def _unverified(key: bytes, expires_at: int, signer: SigningKey = _SIGNER) -> PeerRecord:
    """A record built without signing (the store checks nothing): thousands are cheap to make."""
    return PeerRecord(key, signer.public, "mediator", "http://m.example", expires_at, _ENVELOPE)


def test_peer_store_work_per_query_does_not_grow_with_the_store() -> None:
    """get_peers and announce_peer must not scan the whole store: a busy node holds thousands of records."""
    now = 1_000_000
    small, big = PeerStore(), PeerStore()
    small.add(_unverified(b"\x00" * 32, now + 3600), "10.0.0.1", now)
    for i in range(2000):
        big.add(_unverified(i.to_bytes(32, "big"), now + 3600), f"10.{i // 250}.{i % 250}.1", now)
    assert len(big) == 2000
    rng = random.Random(0)

    def cost(store: PeerStore) -> float:
        best = float("inf")
        for round_ in range(5):
            renewed = [_unverified(b"\x00" * 32, now + 3600 + 200 * round_ + j) for j in range(200)]
            start = time.perf_counter()
            for record in renewed:
                store.get(b"\x00" * 32, now + 1, 5, rng)
                store.add(record, "10.9.9.9", now + 1)
            best = min(best, time.perf_counter() - start)
        return best

    assert cost(big) < 10 * cost(small)  # a scan of 2,000 records per call costs hundreds of times more


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(0, 30), st.integers(0, 10)),
                max_size=60))
def test_peer_store_expires_exactly_what_a_full_scan_would(ops: list[tuple[int, int, int, int]]) -> None:
    """Against a plain model: adds (key, signer, lifetime) at advancing times; the store holds and returns
    exactly the latest unexpired record per (key, id), and its expiry heap stays bounded."""
    signers = [SigningKey(bytes([i + 1]) * 32) for i in range(6)]
    store = PeerStore(max_per_ip_per_key=100)
    model: dict[tuple[bytes, str], int] = {}
    now = 1_000_000
    for key_index, signer_index, lifetime, step in ops:
        now += step
        key = bytes([key_index]) * 32
        record = _unverified(key, now + lifetime, signers[signer_index])
        model = {k: e for k, e in model.items() if e > now}
        refused = store.add(record, "10.0.0.1", now)
        if model.get((key, record.id), -1) > record.expires_at:
            assert refused == "stale_record"
        else:
            assert refused is None
            model[(key, record.id)] = record.expires_at
        for k in {k for k, _ in model} | {key}:
            got = {(r.key, r.id, r.expires_at) for r in store.get(k, now, 100, random.Random(0))}
            assert got == {(kk, rid, e) for (kk, rid), e in model.items() if kk == k and e > now}
        assert len(store._expiry) <= 2 * len(store) + 65
    store.expire(now + 100)
    assert len(store) == 0 and not store._keys

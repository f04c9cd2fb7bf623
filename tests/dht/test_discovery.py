"""Checking mediators found through the DHT: a stranger's record must never stop the search, hold it forever,
or decide which mediator is chosen."""

from __future__ import annotations

import functools
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from netfixtures import DEFAULT_NODE_CAPACITY, start_network, wait_listed

from fincryptfs import discovery, rpc
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.settings import StorageSettings
from fincryptfs.dht.node import DhtParams, run_dht
from fincryptfs.dht.records import MEDIATORS_KEY, PeerRecord
from fincryptfs.discovery import (
    MAX_CHECKED,
    DiscoveryError,
    VerifiedMediator,
    check_records,
    choose_mediator,
    find_verified_mediators,
    order_candidates,
    verify_mediator,
)

FAST = DhtParams(query_timeout=1.0, lookup_timeout=5.0)
Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def _serve_http(handler: Handler, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """A bare HTTP/1.1 server on loopback: reads one request head, lets ``handler`` write the answer."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")

    async def connection(stream: trio.SocketStream) -> None:
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                head += chunk
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    await trio.serve_listeners(connection, listeners)


async def info_server(nursery: trio.Nursery, key: SigningKey) -> str:
    """A server whose /v1/info identifies as ``key``: what a real mediator answers."""
    async def answer(stream: trio.SocketStream) -> None:
        body = json.dumps({"mediator_id": key.id, "public_key": key.public.to_text()}).encode()
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                              b"connection: close\r\n\r\n%s" % (len(body), body))
    return str(await nursery.start(_serve_http, answer))


def signed(key: SigningKey, url: str) -> PeerRecord:
    return PeerRecord.sign(key, key=MEDIATORS_KEY, role="mediator", url=url, expires_at=int(time.time()) + 3600)


# --- a record that fails in an unforeseen way ---------------------------------------------------------------


async def test_a_record_whose_url_cannot_be_used_is_skipped(nursery: trio.Nursery) -> None:
    real = SigningKey.generate()
    good = signed(real, await info_server(nursery, real))
    # what a node that predates the URL check at decode may still hand out (and what any new, unforeseen way
    # for a check to fail looks like): built directly, since decoding now refuses it
    bad = PeerRecord(MEDIATORS_KEY, good.public_key, "mediator", "http://a:b:c", good.expires_at, good.envelope)
    async with rpc.new_client() as http:
        found = await check_records(http, [bad, good])
    assert [m.mediator_id for m in found] == [real.id]


async def test_any_exception_while_checking_a_record_only_skips_that_record(
        nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [SigningKey.generate() for _ in range(3)]
    records = [signed(k, await info_server(nursery, k)) for k in keys]
    real_verify = discovery.verify_mediator

    async def flaky(http: object, record: PeerRecord) -> VerifiedMediator:
        if record.id == keys[0].id:
            raise RuntimeError("a bug nobody foresaw")
        return await real_verify(http, record)  # type: ignore[arg-type]

    monkeypatch.setattr(discovery, "verify_mediator", flaky)
    async with rpc.new_client() as http:
        found = await check_records(http, records)
    assert {m.mediator_id for m in found} == {keys[1].id, keys[2].id}


async def test_a_storage_node_survives_a_record_whose_check_blows_up(
        tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first checks raise something unexpected; the node keeps running, retries, and then registers with
    the mediator it found through the DHT."""
    from storaged.daemon import serve

    port = await trio.to_thread.run_sync(_free_udp_port)
    net = await start_network(tmp_path, nursery, nodes=0, MEDIATORD_DHT_LISTEN=f"127.0.0.1:{port}")
    real_verify = discovery.verify_mediator
    calls = 0

    async def blows_up_twice(http: object, record: PeerRecord) -> VerifiedMediator:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise ValueError("unforeseen")
        return await real_verify(http, record)  # type: ignore[arg-type]

    monkeypatch.setattr(discovery, "verify_mediator", blows_up_twice)
    root = tmp_path / "node0"
    env = {"STORAGED_LISTEN": "127.0.0.1:0", "STORAGED_DATA_DIR": str(root),
           "STORAGED_SHARE_DIRS": f"{root / 'shares'}:{DEFAULT_NODE_CAPACITY}", "STORAGED_RESERVE_BYTES": "0",
           "STORAGED_MEDIATORS": "", "STORAGED_ANNOUNCE_INTERVAL": "1", "STORAGED_OPERATOR": "op0",
           "STORAGED_DHT_LISTEN": "127.0.3.10:0", "STORAGED_DHT_BOOTSTRAP": f"127.0.0.1:{port}"}
    await nursery.start(serve, StorageSettings.from_env(env, home=root))
    await wait_listed(net.mediator_url, 1, timeout=20)
    assert calls >= 3


def _free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- /v1/info is bounded in size and time -------------------------------------------------------------------


async def _endless(stream: trio.SocketStream) -> None:
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n"
                          b"\r\n1\r\n[\r\n")
    pad = b" " * 65536
    while True:
        await stream.send_all(b"%x\r\n%s\r\n" % (len(pad), pad))
        await trio.sleep(0.01)


async def _trickle(stream: trio.SocketStream) -> None:
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n"
                          b"\r\n1\r\n[\r\n")
    while True:
        await stream.send_all(b"1\r\n \r\n")
        await trio.sleep(0.05)


@pytest.mark.parametrize("handler, error", [(_endless, "more than"), (_trickle, "did not answer")])
async def test_an_endless_info_answer_is_cut_off(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch,
                                                 handler: Handler, error: str) -> None:
    monkeypatch.setattr(discovery, "INFO_TIMEOUT", 1.0)
    record = signed(SigningKey.generate(), await nursery.start(_serve_http, handler))
    async with rpc.new_client() as http:
        with trio.fail_after(5):
            with pytest.raises(DiscoveryError, match=error):
                await verify_mediator(http, record)


# --- which mediator is checked and chosen -------------------------------------------------------------------


def _key_below(prefix: str) -> SigningKey:
    while True:
        key = SigningKey.generate()
        if key.id < prefix:
            return key


async def test_low_ids_neither_hide_the_real_mediator_nor_win(nursery: trio.Nursery) -> None:
    node = await nursery.start(functools.partial(run_dht, params=FAST), SigningKey.generate(), ("127.0.4.1", 0), [])
    now = time.time()
    real = SigningKey.generate()
    while real.id < "8":
        real = SigningKey.generate()
    assert node.store.add(signed(real, await info_server(nursery, real)), "127.0.4.2", now) is None
    # MAX_CHECKED records with ids ground below the real one's, from 4 IPs, at URLs where nothing answers
    for i in range(MAX_CHECKED):
        record = signed(_key_below("8"), f"http://127.0.0.1:9/x{i}")
        assert node.store.add(record, f"10.0.0.{i // 4}", now) is None
    async with rpc.new_client() as http:
        rounds = [await find_verified_mediators(node, http) for _ in range(4)]
    # each round checks 16 of the 17 at random: the real one is missed with probability 1/17 per round
    assert any(found and found[0].mediator_id == real.id for found in rounds)


def test_candidates_are_random_and_trusted_ones_come_first() -> None:
    keys = sorted((SigningKey.generate() for _ in range(MAX_CHECKED + 4)), key=lambda k: k.id)
    records = [signed(k, f"http://m{i}.example") for i, k in enumerate(keys)]
    highest = records[-1]
    rng = random.Random(7)
    picked = Counter(r.id for _ in range(400) for r in order_candidates(records, rng))
    assert set(picked) == {r.id for r in records}  # every record gets checked some of the time
    assert 0.6 < picked[highest.id] / 400 < 0.95  # 16 of 20: 0.8
    for _ in range(20):
        chosen = order_candidates(records, rng, prefer={highest.id})
        assert len(chosen) == MAX_CHECKED and chosen[0] == highest
    assert order_candidates([], rng) == []


def test_the_chosen_mediator_is_random_unless_one_is_trusted() -> None:
    found = [VerifiedMediator(f"http://m{i}.example", k.id, k.public)
             for i, k in enumerate(SigningKey.generate() for _ in range(3))]
    rng = random.Random(3)
    assert {choose_mediator(found, rng).mediator_id for _ in range(100)} == {m.mediator_id for m in found}
    assert {choose_mediator(found, rng, prefer={found[2].mediator_id}) for _ in range(20)} == {found[2]}

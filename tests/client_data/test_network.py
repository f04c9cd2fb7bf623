"""The data path against real daemons: one mediatord and several storaged in the test's nursery."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from clientdata_support import MARKER, open_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netfixtures import start_network

from fincryptfs import uploader
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.ids import AccountId, NodeId, ShareId, new_share_id
from fincryptfs.core.messages import Placement, UploadGrant
from fincryptfs.downloader import ObjectReader
from fincryptfs.objectstore import FileChangedError, ObjectStore, ReadError, StoredObject, UploadError
from fincryptfs.rpc import PeerError
from fincryptfs.uploader import FileReader, MembersReader


def make_file(path: Path, size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    if size >= len(MARKER):
        at = rng.randrange(0, size - len(MARKER) + 1)
        data[at:at + len(MARKER)] = MARKER
    path.write_bytes(bytes(data))
    return bytes(data)


def share_files(net) -> list[Path]:
    return [p for node in net.nodes for d in node.share_dirs for p in d.rglob("*") if p.is_file()]


async def put(store: ObjectStore, tmp_path: Path, size: int, seed: int) -> tuple[StoredObject, bytes]:
    src = tmp_path / f"file-{seed}"
    data = make_file(src, size, seed)
    seen: list[int] = []
    obj = await store.put_file(src, progress=seen.append)
    assert obj.size == size and seen[-1] == size
    assert [ref.index for ref in obj.shares] == list(range(store.n)), "every share's root is kept"
    return obj, data


async def stored_indices(store: ObjectStore, obj: StoredObject) -> set[int]:
    """The shares the mediator counts as stored."""
    info = await store.mediator.object_info(obj.object_id)
    return {s.index for s in info.shares if s.state in ("stored", "proven")}


async def test_round_trip_sizes_and_ranges(tmp_path: Path, nursery: trio.Nursery) -> None:
    net = await start_network(tmp_path, nursery, nodes=6)
    seg = 64 * 1024
    async with open_store(net.mediator_url, tmp_path, segment_size=seg) as store:
        rng = random.Random(1)
        for seed, size in enumerate([0, 1, 4095, 4096, 2**20 - 1, 2**20, 2**20 + 1, 5 * seg + 17]):
            obj, data = await put(store, tmp_path, size, seed)
            dest = tmp_path / f"out-{seed}"
            await store.fetch_to_file(obj, dest)
            assert dest.read_bytes() == data, size
            assert await store.read_range(obj, 0, size + 10) == data
            for _ in range(4 if size else 1):
                offset = rng.randrange(0, size + 2)
                length = rng.randrange(0, 3 * seg)
                assert await store.read_range(obj, offset, length) == data[offset:offset + length], (size, offset)
            health = await store.health(obj.object_id)
            assert health["total"] == 6
        account = await store.account()
        assert account["objects"] == 8
        assert not [p for p in tmp_path.glob("spool-*/*")]
    stored = share_files(net)
    assert stored, "the nodes hold no share files"
    for path in stored:
        assert MARKER not in path.read_bytes(), f"{path} holds plaintext"



def share_path(net, node_id: str, share_id: str) -> Path:
    node = net.node_by_id(node_id)
    for folder in node.share_dirs:
        path = folder / share_id[:2] / f"{share_id}.data"
        if path.exists():
            return path
    raise FileNotFoundError(f"share {share_id} not on node {node.url}")


async def test_reads_survive_n_minus_k_nodes_down_and_fail_cleanly_below_k(tmp_path: Path,
                                                                            nursery: trio.Nursery) -> None:
    net = await start_network(tmp_path, nursery, nodes=6)
    async with open_store(net.mediator_url, tmp_path, segment_size=16384) as store:
        obj, data = await put(store, tmp_path, 200_000, 7)
        info = await store.mediator.object_info(obj.object_id)
        holders = [net.node_by_id(s.node_id).index for s in sorted(info.shares, key=lambda s: s.index)]
        for index in holders[:3]:  # the three nodes a reader would ask first
            await net.stop_node(index)
        dest = tmp_path / "out"
        await store.fetch_to_file(obj, dest)
        assert dest.read_bytes() == data
        assert await store.read_range(obj, 70_000, 50_000) == data[70_000:120_000]
        await net.stop_node(holders[3])
        with pytest.raises(ReadError) as caught:
            await store.read_range(obj, 0, 10)
        message = str(caught.value)
        assert "only 2 of the 3 shares" in message
        for index in holders[:4]:
            assert net.nodes[index].url in message
        with pytest.raises(ReadError):
            await store.fetch_to_file(obj, tmp_path / "never")
        assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never.*"))
        await net.restart_node(holders[0])
        assert await store.read_range(obj, 199_990, 100) == data[199_990:]


async def test_corrupt_share_is_skipped_and_reported(tmp_path: Path, nursery: trio.Nursery,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    net = await start_network(tmp_path, nursery, nodes=6)
    async with open_store(net.mediator_url, tmp_path, segment_size=16384) as store:
        obj, data = await put(store, tmp_path, 100_000, 8)
        info = await store.mediator.object_info(obj.object_id)
        first = min(info.shares, key=lambda s: s.index)
        path = share_path(net, first.node_id, first.share_id)
        raw = bytearray(path.read_bytes())
        raw[5000] ^= 0x01
        path.write_bytes(bytes(raw))
        reader = await ObjectReader.open(store, obj)
        got: list[bytes] = []

        async def keep(index: int, plaintext: bytes) -> None:
            got.append(plaintext)

        await reader.each_segment(obj.layout.segments_for_range(0, obj.size), keep)
        assert b"".join(got)[:obj.size] == data
        assert {s.index for s in reader.bad} == {first.index}
        assert [net.node_by_id(first.node_id).url in text for text in reader.failures.values()] == [True]
        assert any("served bad data" in r.getMessage() for r in caplog.records)
        assert not any("could not report" in r.getMessage() for r in caplog.records)
        assert await store.read_range(obj, 0, obj.size) == data
        assert await reader.read(90_000, 20_000) == data[90_000:]
        assert {s.index for s in reader.bad} == {first.index}, "a reader keeps skipping the bad share"


async def test_upload_replaces_dead_nodes_and_fails_below_happy(tmp_path: Path, nursery: trio.Nursery) -> None:
    net = await start_network(tmp_path, nursery, nodes=7)
    await net.stop_node(0)  # the mediator still believes it is online
    async with open_store(net.mediator_url, tmp_path, segment_size=16384) as store:
        for seed in range(3):
            obj, data = await put(store, tmp_path, 50_000, 20 + seed)
            assert await stored_indices(store, obj) == set(range(6)), \
                "a share placed on the dead node should have been re-placed"
            assert await store.read_range(obj, 0, 50_000) == data
        await net.stop_node(1)
        await net.stop_node(2)
        src = tmp_path / "big"
        make_file(src, 50_000, 99)
        with pytest.raises(UploadError, match=r"stored only \d of 6 shares .* need 5") as caught:
            await store.put_file(src)
        assert net.nodes[1].url in str(caught.value) or net.nodes[2].url in str(caught.value)
        assert list(store.spool_dir.iterdir()) == []
        assert (await store.account())["objects"] == 3, "the failed object must be released, not committed"


async def test_read_range_property(tmp_path: Path, nursery: trio.Nursery) -> None:
    """read_range(offset, length) equals the file slice for any offset and length (hypothesis, few examples)."""
    net = await start_network(tmp_path, nursery, nodes=6)
    async with open_store(net.mediator_url, tmp_path, segment_size=4096, run_share_bytes=3 * 4096) as store:
        obj, data = await put(store, tmp_path, 11 * 4096 + 1000, 30)  # 12 segments, runs of 8

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.integers(0, len(data) + 100), st.integers(0, len(data) + 100))
        def check(offset: int, length: int) -> None:
            got = trio.from_thread.run(store.read_range, obj, offset, length)
            assert got == data[offset:offset + length]

        await trio.to_thread.run_sync(check)


async def test_file_changing_while_streamed_is_refused_and_released(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Shares leave while the file is encoded: a file that shrinks or grows meanwhile is refused, and what
    its nodes already stored is released (nothing committed, nothing left billed)."""
    net = await start_network(tmp_path, nursery, nodes=6)
    src = tmp_path / "src"
    async with open_store(net.mediator_url, tmp_path, segment_size=4096) as store:
        def shrink(done: int) -> None:
            if done < 10 * 4096:
                os.truncate(src, 3 * 4096)

        def grow(done: int) -> None:
            with open(src, "ab") as f:
                f.write(b"x")

        for change in (shrink, grow):
            src.write_bytes(os.urandom(10 * 4096))
            with pytest.raises(FileChangedError, match="changed while"):
                await store.put_file(src, progress=change)
        account = await store.account()
        assert account["objects"] == 0 and account["bytes_stored"] == 0
        obj, data = await put(store, tmp_path, 10 * 4096, 7)  # the store still works
        assert await store.read_range(obj, 0, len(data)) == data
        assert list(store.spool_dir.iterdir()) == []


async def test_share_damaged_on_the_way_is_caught_by_its_receipt_and_sent_again(tmp_path: Path,
                                                                                nursery: trio.Nursery) -> None:
    """A share is streamed before its root is known, so the node signs the root of whatever arrived: a byte
    flipped on the wire shows as a receipt with another root; that share is placed on another node and sent
    again (re-encoded: the same bytes), and what is committed reads back exactly."""
    net = await start_network(tmp_path, nursery, nodes=7, gated=True)
    # equal prices and reputations: placement takes nodes in id order, so the lowest id gets a share for sure
    bad = min(range(7), key=lambda i: net.nodes[i].node_id)
    net.gates[bad].flip_at = 50_000  # inside the body of the first share sent to it (headers are ~1 KB)
    async with open_store(net.mediator_url, tmp_path, segment_size=16384) as store:
        obj, data = await put(store, tmp_path, 400_000, 40)
        assert net.gates[bad].flipped, "no share went through the damaging relay"
        assert await stored_indices(store, obj) == set(range(6))
        assert await store.read_range(obj, 0, len(data)) == data
        info = await store.mediator.object_info(obj.object_id)
        assert net.nodes[bad].node_id not in {s.node_id for s in info.shares if s.state == "stored"}
        dest = tmp_path / "back"
        others = [i for i in range(7) if i != bad]
        for gone in others[:3]:  # only the committed shares count: any k of them still decode the file
            await net.stop_node(gone)
        await store.fetch_to_file(obj, dest)
        assert dest.read_bytes() == data


@pytest.mark.parametrize("packed", [False, True])
async def test_a_retry_pass_never_sends_a_second_ciphertext_under_a_used_nonce(
        tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, packed: bool) -> None:
    """A share whose node failed is sent again by a pass that re-reads and re-seals the source under the same
    key and nonces. If the source was rewritten in between (same size, mtime put back; a pack member written
    through the mount), that pass must not send anything sealed from the new bytes: per share, every byte sent
    twice is the same byte, and the upload fails as changed (to start over under a new key), releasing what
    landed."""
    net = await start_network(tmp_path, nursery, nodes=7, gated=True)
    bad = min(range(7), key=lambda i: net.nodes[i].node_id)  # placement takes nodes in id order: it gets a share
    net.gates[bad].flip_at = 20_000  # a byte flipped in the first share sent to it: that share is sent again

    bodies: dict[int, list[bytearray]] = {}  # share index -> what each pass handed to its PUT, in order
    real_put = uploader.put_share

    async def recording_put(http: httpx.AsyncClient, placement: Placement, share_id: ShareId, share_size: int,
                            blocks: trio.MemoryReceiveChannel[uploader.Block]) -> uploader.Landed:
        body = bytearray()
        bodies.setdefault(placement.index, []).append(body)

        class Recorded:  # what put_share uses of its channel: iterating it
            async def __aiter__(self) -> AsyncIterator[uploader.Block]:
                async for block in blocks:
                    body.extend(block)
                    yield block

        return await real_put(http, placement, share_id, share_size, Recorded())  # type: ignore[arg-type]

    monkeypatch.setattr(uploader, "put_share", recording_put)
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(os.urandom(60_000))
    second.write_bytes(os.urandom(40_000))
    mtime, rewrite_at = second.stat().st_mtime_ns, 0
    passes = 0

    def rewrite_second_after_the_first_pass() -> None:  # called in a worker thread after each pass
        nonlocal passes
        passes += 1
        if passes == 1:
            with open(second, "r+b") as f:
                f.seek(rewrite_at)
                f.write(os.urandom(40_000))  # segment 3 onwards: segments 0-2 are sent again unchanged
            os.utime(second, ns=(mtime, mtime))

    class Members(MembersReader):
        def check_unchanged(self) -> None:
            rewrite_second_after_the_first_pass()
            super().check_unchanged()

    class Whole(FileReader):
        def check_unchanged(self) -> None:
            rewrite_second_after_the_first_pass()
            super().check_unchanged()

    async with open_store(net.mediator_url, tmp_path, segment_size=16384, k=3, n=6, happy=5) as store:
        if packed:
            reader: MembersReader | FileReader = Members([(first, 60_000), (second, 40_000)])
        else:
            second.write_bytes(first.read_bytes() + second.read_bytes())
            mtime, rewrite_at = second.stat().st_mtime_ns, 60_000
            reader = Whole(second)
        source = uploader.Source.of(reader, segment_size=store.segment_size, k=store.k, n=store.n)
        failure: Exception | None = None
        try:
            await uploader.upload_source(store, source)
        except FileChangedError as exc:
            failure = exc
        assert net.gates[bad].flipped
        resent = {index: sent for index, sent in bodies.items() if len(sent) > 1}
        assert resent, "no share was sent twice"
        for index, sent in bodies.items():
            for again in sent[1:]:
                assert again == sent[0][:len(again)], f"share {index}: other bytes sent under used nonces"
        assert all(0 < len(sent[-1]) < len(sent[0]) for sent in resent.values()), \
            "the unchanged segments are sent again, nothing from the changed one on"
        assert failure is not None and f"{second}" in str(failure) and "changed while" in str(failure)
        assert passes == 1, "the pass that read other bytes stopped before its end"
        account = await store.account()
        assert account["objects"] == 0 and account["bytes_stored"] == 0


async def test_a_share_stored_only_by_repair_is_read(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Committed with 5 of 6 shares, an object names all 6 roots: the mediator's repair later stores the sixth
    against its root, and a reader must be able to use it (here, with only k = 3 shares left, it is needed)."""
    net = await start_network(tmp_path, nursery, nodes=8, gated=True, MEDIATORD_AUDIT_PERIOD="0.5",
                              MEDIATORD_NODE_OFFLINE_AFTER="1.5", STORAGED_ANNOUNCE_INTERVAL="0.2")
    flipping = min(range(8), key=lambda i: net.nodes[i].node_id)  # placement takes nodes in id order
    net.gates[flipping].flip_at = 20_000  # that share's receipt names another root: it is not stored
    async with open_store(net.mediator_url, tmp_path, segment_size=16384, k=3, n=6, happy=5) as store:
        store.place_rounds = 1  # and not sent again: the object is committed with 5 shares
        data = make_file(tmp_path / "src", 100_000, 50)
        obj = await store.put_file(tmp_path / "src")
        assert net.gates[flipping].flipped
        info = await store.mediator.object_info(obj.object_id)
        holders = {s.index: net.node_by_id(s.node_id).index for s in info.shares}
        missing = next(s.index for s in info.shares if s.node_id == net.nodes[flipping].node_id)
        assert await stored_indices(store, obj) == set(range(6)) - {missing}
        others = [i for i in range(6) if i != missing]
        await net.stop_node(holders[others[0]])  # 4 healthy left: repair rebuilds that one and the missing one
        with trio.fail_after(30):
            while True:
                info = await store.mediator.object_info(obj.object_id)
                rebuilt = {s.index for s in info.shares if s.state in ("stored", "proven")
                           and net.node_by_id(s.node_id).index != holders[s.index]}
                if {missing, others[0]} <= rebuilt:
                    break
                await trio.sleep(0.2)
        for index in others[1:4]:  # left: one share stored at upload and the two rebuilt ones
            await net.stop_node(holders[index])
        assert await store.read_range(obj, 0, len(data)) == data


async def test_a_node_answering_a_put_without_end_is_cut_off(nursery: trio.Nursery) -> None:
    """A node's answer to a PUT is read up to a cap, as a GET's is: one that keeps sending (here 16 KiB every
    5 ms of a declared 10 MiB) is a failed share at once, not a buffer that grows for as long as it likes."""
    sent = 0

    async def endless_answer(stream: trio.SocketStream) -> None:
        nonlocal sent
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(65536)
        head, _, body = request.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            body += await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n"
                              b"content-length: 10485760\r\n\r\n")
        try:
            while sent < 10 * 2**20:
                await stream.send_all(b" " * 16384)
                sent += 16384
                await trio.sleep(0.005)
        except trio.BrokenResourceError:
            pass

    listeners = await nursery.start(partial(trio.serve_tcp, endless_answer, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    mediator, node_id, share_id = SigningKey.generate(), NodeId("cd" * 32), new_share_id()
    grant = UploadGrant(NodeId(mediator.public.id), node_id, AccountId("ef" * 32), share_id, 3, None, 2**40,
                        "0" * 32).seal(mediator)
    placement = Placement(0, node_id, f"http://127.0.0.1:{port}", grant)
    send, receive = trio.open_memory_channel[uploader.Block](1)
    async with send:
        await send.send(b"abc")
    async with httpx.AsyncClient(trust_env=False) as http:
        with trio.fail_after(2):
            with pytest.raises(PeerError, match="more than 65536 bytes"):
                await uploader.put_share(http, placement, share_id, 3, receive)
    assert sent < 2**20

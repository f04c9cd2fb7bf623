"""Small files packed into shared objects, through a real mount over a real network: round trip, cold reads
served from a whole cached pack, overwrite and deletion of members until the pack is released, restore from the phrase
on a new machine, and kill -9 while packs upload."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from mountkit import Client, ino_of, needs_fuse, tree_of
from netfixtures import Network, pid_alive, start_network

from fincryptfs import meta, uploadworker

pytestmark = [pytest.mark.e2e, needs_fuse]

PACKING = {"FINCRYPT_PACK_THRESHOLD": "64K", "FINCRYPT_PACK_MAX_FILES": "8"}


def write_small(root: Path, count: int, seed: int) -> None:
    rng = __import__("random").Random(seed)
    for i in range(count):
        sub = root / f"d{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i:03}").write_bytes(rng.randbytes(rng.randrange(1, 40_000)))



async def mounted_with_nodes_held(tmp_path: Path, nursery: trio.Nursery) -> tuple[Network, Client]:
    """A packing client, mounted, whose nodes answer nothing until ``net.release()``: an upload started now
    is surely still in flight at a kill, however fast the machine."""
    net = await start_network(tmp_path, nursery, nodes=6, gated=True)
    client = Client(tmp_path / "c", net.mediator_url, extra_env=PACKING)
    client.init()
    await client.mount()
    net.hold()
    return net, client


async def pack_upload_in_flight(db: sqlite3.Connection) -> None:
    with trio.fail_after(20):
        while not any(state == "uploading" for _, _, state, _, _ in meta.pending_uploads(db)):
            await trio.sleep(0.01)


async def status(client: Client) -> dict:
    return json.loads((await trio.to_thread.run_sync(lambda: client.cli("status", "--json"))).stdout)


async def test_packed_round_trip_release_and_restore(tmp_path: Path, nursery: trio.Nursery) -> None:
    net = await start_network(tmp_path, nursery, nodes=6)
    client = Client(tmp_path / "alice", net.mediator_url, extra_env=PACKING)
    phrase = client.init()
    restored = Client(tmp_path / "new-machine", net.mediator_url)
    mnt = client.mountpoint
    try:
        await client.mount()
        await trio.to_thread.run_sync(write_small, mnt, 30, 1)
        large = os.urandom(200_000)  # above the threshold: an object of its own
        await trio.to_thread.run_sync((mnt / "large.bin").write_bytes, large)
        expected = await trio.to_thread.run_sync(tree_of, mnt)
        await client.flush()
        report = await status(client)
        by_path = {f["path"]: f for f in report["files"]}
        assert not by_path["/large.bin"]["packed"]
        small = [f for f in report["files"] if f["path"] != "/large.bin"]
        assert len(small) == 30 and all(f["packed"] and f["state"] == "stored" for f in small)
        pack_ids = {f["object_id"] for f in small}
        assert 4 <= len(pack_ids) <= 30 // 2  # at most 8 files a pack, and files were gathered
        assert {p["pack_id"] for p in report["packs"]} == pack_ids
        assert sum(p["live_files"] for p in report["packs"]) == 30
        assert all(f["shares_total"] == 6 and f["shares_healthy"] >= 5 for f in small)  # the pack's health
        text = (await trio.to_thread.run_sync(lambda: client.cli("status"))).stdout
        assert "(in pack " in text
        await client.unmount()

        # cold: the first read of a packed file fetches its whole pack into the cache, and its pack-mates are
        # read from that copy too: no member gets a cache file of its own
        shutil.rmtree(client.cache_dir)
        await client.mount()
        first = small[0]
        mates = [f["path"] for f in small if f["object_id"] == first["object_id"]]
        assert len(mates) >= 2
        # (every file operation in a thread: the network runs on this test's event loop)
        data = await trio.to_thread.run_sync((mnt / first["path"][1:]).read_bytes)
        assert data == expected[first["path"][1:]][1][2]  # type: ignore[index]
        db = meta.connect_readonly(client.data_dir / "meta.db")
        try:
            inos = [ino_of(db, path) for path in mates]
            rewritten_ref = meta.pack_ref(meta.get(db, inos[1]).object)
        finally:
            db.close()
        assert rewritten_ref is not None and rewritten_ref.size
        assert (client.cache_dir / "packs" / first["object_id"]).exists()
        assert await trio.to_thread.run_sync(tree_of, mnt) == expected
        assert not any((client.cache_dir / str(ino)).exists() for ino in inos)

        # a member opened for writing gets its own cache copy; a reader that opened it from the pack sees the
        # writes, as in any file system
        appended = mates[1][1:]

        def read_while_appended() -> tuple[bytes, bytes]:
            with open(mnt / appended, "rb", buffering=0) as reader:
                before = reader.read()
                with open(mnt / appended, "ab") as writer:
                    writer.write(b"+tail")
                reader.seek(0)
                return before, reader.read()
        old_bytes = expected[appended][1][2]  # type: ignore[index]
        assert await trio.to_thread.run_sync(read_while_appended) == (old_bytes, old_bytes + b"+tail")
        expected[appended] = ("file", (expected[appended][1][0], len(old_bytes) + 5,  # type: ignore[index]
                                       old_bytes + b"+tail"))
        assert (client.cache_dir / str(inos[1])).exists()
        # once its new version is stored, its old bytes are zeroed in the pack copy its pack-mates are read from
        await client.flush()
        pack_copy = client.cache_dir / "packs" / first["object_id"]
        with trio.fail_after(10):
            old = slice(rewritten_ref.offset, rewritten_ref.offset + rewritten_ref.size)
            while pack_copy.read_bytes()[old] != bytes(rewritten_ref.size):
                await trio.sleep(0.1)
        # and in a copy fetched again later (evicted, say), as it arrives
        pack_copy.unlink()
        mate = mates[2][1:]
        assert await trio.to_thread.run_sync((mnt / mate).read_bytes) == expected[mate][1][2]  # type: ignore[index]
        assert pack_copy.read_bytes()[old] == bytes(rewritten_ref.size)
        assert await trio.to_thread.run_sync(tree_of, mnt) == expected

        # overwrite and delete members: the pack lives while one member does, and is released after that;
        # a deleted member's bytes are zeroed in the cached pack copy, and the copy goes with the pack
        victim = first["object_id"]
        pack_copy = client.cache_dir / "packs" / victim
        db = meta.connect_readonly(client.data_dir / "meta.db")
        try:
            deleted = [meta.pack_ref(meta.get(db, ino_of(db, path)).object) for path in [mates[0], *mates[2:-1]]]
        finally:
            db.close()
        assert all(ref is not None and ref.size for ref in deleted)
        for path in mates[:-1]:
            await trio.to_thread.run_sync((mnt / path[1:]).unlink)
            del expected[path[1:]]
        with trio.fail_after(10):  # once the kernel has forgotten the inodes
            while any(pack_copy.read_bytes()[ref.offset:ref.offset + ref.size] != bytes(ref.size)
                      for ref in deleted if ref is not None):
                await trio.sleep(0.1)
        await client.flush()
        report = await status(client)
        assert {p["pack_id"]: p["live_files"] for p in report["packs"]}[victim] == 1
        last = mates[-1][1:]
        await trio.to_thread.run_sync((mnt / last).write_bytes, b"rewritten")
        expected[last] = ("file", (expected[last][1][0], 9, b"rewritten"))  # type: ignore[index]
        await client.flush()
        report = await status(client)
        assert victim not in {p["pack_id"] for p in report["packs"]}
        assert victim not in {f["object_id"] for f in report["files"]}
        with trio.fail_after(10):
            while pack_copy.exists():
                await trio.sleep(0.1)
        with trio.fail_after(30):  # the deleter runs once a snapshot without the pack is published
            while (await status(client))["pending_deletes"]:
                await trio.sleep(0.3)
        assert await trio.to_thread.run_sync(tree_of, mnt) == expected
        await client.unmount()

        # a new machine with only the phrase reads the packed files
        await restored.restore(phrase, net.mediator_url)
        await restored.mount()
        assert await trio.to_thread.run_sync(tree_of, restored.mountpoint) == expected
    finally:
        await client.cleanup()
        await restored.cleanup()


async def test_kill_during_pack_upload_loses_nothing_closed(tmp_path: Path, nursery: trio.Nursery) -> None:
    net, client = await mounted_with_nodes_held(tmp_path, nursery)
    mnt = client.mountpoint
    try:
        await trio.to_thread.run_sync(write_small, mnt, 60, 2)
        expected = await trio.to_thread.run_sync(tree_of, mnt)
        db = meta.connect_readonly(client.data_dir / "meta.db")
        try:
            await pack_upload_in_flight(db)
            await client.kill()
            unfinished = len(meta.pending_uploads(db))
        finally:
            db.close()
        assert unfinished > 0
        net.release()
        await client.mount()
        await client.flush()
        assert await trio.to_thread.run_sync(tree_of, mnt) == expected
        report = await status(client)
        assert report["pending_uploads"] == 0 and all(f["packed"] for f in report["files"])
        assert sum(p["live_files"] for p in report["packs"]) == 60
        await client.unmount()
        shutil.rmtree(client.cache_dir)
        await client.mount()
        assert await trio.to_thread.run_sync(tree_of, mnt) == expected
    finally:
        await client.cleanup()


async def test_kill_upload_worker_mid_upload_restarts_and_flush_completes(tmp_path: Path,
                                                                          nursery: trio.Nursery) -> None:
    """Uploads run in the mount's worker process: kill -9 it while a pack uploads; the mount restarts it, the
    new worker resumes the claimed jobs, and flush completes with every file readable after a cold mount."""
    net, client = await mounted_with_nodes_held(tmp_path, nursery)
    mnt = client.mountpoint
    try:
        first = uploadworker.worker_pid(client.data_dir)
        with trio.fail_after(10):
            while first is None:
                await trio.sleep(0.05)
                first = uploadworker.worker_pid(client.data_dir)
        await trio.to_thread.run_sync(write_small, mnt, 60, 3)
        expected = await trio.to_thread.run_sync(tree_of, mnt)
        db = meta.connect_readonly(client.data_dir / "meta.db")
        try:
            await pack_upload_in_flight(db)
            os.kill(first, signal.SIGKILL)
            await trio.sleep(0.05)
            unfinished = len(meta.pending_uploads(db))
        finally:
            db.close()
        assert unfinished > 0
        net.release()
        await client.flush()
        second = uploadworker.worker_pid(client.data_dir)
        assert second is not None and second != first
        assert client.process is not None and client.process.poll() is None, "the mount must survive"
        report = await status(client)
        assert report["pending_uploads"] == 0 and all(f["packed"] for f in report["files"])
        assert sum(p["live_files"] for p in report["packs"]) == 60
        await client.unmount()
        with trio.fail_after(10):  # unmounting stops the worker too
            while pid_alive(second):
                await trio.sleep(0.05)
        shutil.rmtree(client.cache_dir)
        await client.mount()
        assert await trio.to_thread.run_sync(tree_of, mnt) == expected
    finally:
        await client.cleanup()


async def test_listing_a_folder_reads_its_packs_ahead(tmp_path: Path, nursery: trio.Nursery) -> None:
    """After a cold mount, listing a folder fetches the packs of its files in the background: once they are in
    the cache, the files read back with every node stopped. A folder that is not listed is not fetched."""
    net = await start_network(tmp_path, nursery, nodes=6)
    client = Client(tmp_path / "c", net.mediator_url, extra_env=PACKING)
    client.init()
    mnt = client.mountpoint
    try:
        await client.mount()

        def write(folder: str) -> None:
            (mnt / folder).mkdir()
            for i in range(20):  # 8 files per pack: three packs per folder
                (mnt / folder / f"{i}.bin").write_bytes(os.urandom(1000 + i))
        for folder in ("listed", "unlisted"):  # a flush between them: no pack holds files of both
            await trio.to_thread.run_sync(write, folder)
            await client.flush()
        expected = await trio.to_thread.run_sync(tree_of, mnt / "listed")
        await client.unmount()
        shutil.rmtree(client.cache_dir)
        await client.mount()
        db = meta.connect_readonly(client.data_dir / "meta.db")
        try:
            def packs_of(folder: str) -> set[str]:
                refs = (meta.pack_ref(meta.get(db, ino_of(db, f"{folder}/{i}.bin")).object) for i in range(20))
                return {ref.pack_id for ref in refs if ref is not None}
            listed, unlisted = packs_of("listed"), packs_of("unlisted")
        finally:
            db.close()
        assert len(listed) == 3 and len(unlisted) == 3
        assert sorted(await trio.to_thread.run_sync(os.listdir, mnt / "listed")) == sorted(f"{i}.bin"
                                                                                           for i in range(20))
        packs = client.cache_dir / "packs"
        with trio.fail_after(20):
            while not all((packs / pack_id).exists() for pack_id in listed):
                await trio.sleep(0.05)
        assert not any((packs / pack_id).exists() for pack_id in unlisted)
        # read from the cached packs: not one file is copied out of them
        assert [p.name for p in client.cache_dir.iterdir()] == ["packs"]
        for index in range(len(net.nodes)):
            await net.stop_node(index)
        assert await trio.to_thread.run_sync(tree_of, mnt / "listed") == expected
        assert [p.name for p in client.cache_dir.iterdir()] == ["packs"]
    finally:
        await client.cleanup()


def outcome_into(outcomes: list[object], fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` for a worker thread: what it returns, or the OSError it raises, is appended to ``outcomes``."""
    def run() -> None:
        try:
            outcomes.append(fn())
        except OSError as exc:
            outcomes.append(exc)
    return run


async def store_packed_then_remount_uncached(client: Client, contents: dict[str, bytes]) -> None:
    """Write ``contents`` through the mount (small: packed together), wait until stored, and mount again with an
    empty cache, so that the next open of one of them fetches its pack."""
    await client.mount()
    for name, data in contents.items():
        await trio.to_thread.run_sync((client.mountpoint / name).write_bytes, data)
    await client.flush()
    await client.unmount()
    shutil.rmtree(client.cache_dir)
    await client.mount()


async def test_a_file_deleted_while_its_pack_arrives_is_never_read_as_zeros(tmp_path: Path,
                                                                            nursery: trio.Nursery) -> None:
    """An open of an uncached packed file waits for its pack; a file deleted meanwhile has its range zeroed in
    that copy before it is renamed into place. The open used to go on and hand out a handle on that range, so
    the reader got the file's length in zeros, silently. It now fails (ENOENT, as had the deletion come a moment
    earlier); the file's pack-mates read back exactly."""
    net = await start_network(tmp_path, nursery, nodes=6, gated=True)
    client = Client(tmp_path / "c", net.mediator_url, extra_env=PACKING)
    client.init()
    mnt = client.mountpoint
    try:
        contents = {f"f{i}": os.urandom(5000 + i) for i in range(3)}
        await store_packed_then_remount_uncached(client, contents)
        await trio.to_thread.run_sync(os.stat, mnt / "f0")  # looked up (no listing: nothing is read ahead)
        net.hold()
        outcome: list[object] = []
        async with trio.open_nursery() as readers:
            readers.start_soon(trio.to_thread.run_sync, outcome_into(outcome, (mnt / "f0").read_bytes))
            await trio.sleep(1.0)  # the open waits for the pack
            assert not outcome
            await trio.to_thread.run_sync((mnt / "f0").unlink)
            await trio.sleep(0.2)
            net.release()
        assert len(outcome) == 1
        got = outcome[0]
        assert got == contents["f0"] or isinstance(got, FileNotFoundError), \
            f"read {len(got) if isinstance(got, bytes) else got!r}; zeros: {got == bytes(len(contents['f0']))}"
        for name in ("f1", "f2"):
            assert await trio.to_thread.run_sync((mnt / name).read_bytes) == contents[name]
    finally:
        await client.cleanup()


async def test_a_rewrite_while_a_packed_file_is_copied_out_of_its_pack_is_kept(tmp_path: Path,
                                                                              nursery: trio.Nursery) -> None:
    """Opening an uncached packed file for writing copies it out of its pack first. Rewritten meanwhile by
    another process (O_TRUNC does not wait for the copy), its new content was the only copy, and the copy out
    of the pack was renamed over it: the closed rewrite was lost, and its upload stored the old bytes."""
    net = await start_network(tmp_path, nursery, nodes=6, gated=True)
    client = Client(tmp_path / "c", net.mediator_url, extra_env=PACKING)
    client.init()
    mnt = client.mountpoint
    try:
        old = os.urandom(6000)
        await store_packed_then_remount_uncached(client, {"f": old, "mate": os.urandom(3000)})
        await trio.to_thread.run_sync(os.stat, mnt / "f")
        net.hold()
        opened: list[object] = []

        def open_for_writing() -> bool:
            with open(mnt / "f", "r+b"):
                return True
        async with trio.open_nursery() as writers:
            writers.start_soon(trio.to_thread.run_sync, outcome_into(opened, open_for_writing))
            await trio.sleep(1.0)  # the open waits for the pack
            assert not opened
            await trio.to_thread.run_sync((mnt / "f").write_bytes, b"new content")
            net.release()
        assert opened == [True]
        assert await trio.to_thread.run_sync((mnt / "f").read_bytes) == b"new content"
        await client.flush()
        await client.unmount()
        shutil.rmtree(client.cache_dir)
        await client.mount()
        assert await trio.to_thread.run_sync((mnt / "f").read_bytes) == b"new content"
    finally:
        await client.cleanup()

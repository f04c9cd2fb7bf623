"""``fincryptfs put`` end to end: real mediator and storage nodes on loopback, the real CLI in a subprocess,
and a real mount to read back what it stored (from the network: the cache is deleted first)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio
from mountkit import Client, ino_of, needs_fuse, tree_of
from netfixtures import Network, start_network

from fincryptfs import meta

pytestmark = [pytest.mark.e2e, needs_fuse]
T = TypeVar("T")


def make_source(root: Path) -> None:
    rng = __import__("random").Random(7)
    (root / "photos" / "2026").mkdir(parents=True)
    for i in range(40):
        (root / "photos" / "2026" / f"img{i:02}.jpg").write_bytes(rng.randbytes(rng.randrange(1, 30_000)))
    (root / "photos" / "video.mp4").write_bytes(rng.randbytes(3 * 2**20 + 17))  # above the pack threshold
    (root / "photos" / "empty").write_bytes(b"")
    os.chmod(root / "photos" / "2026" / "img00.jpg", 0o600)
    os.utime(root / "photos" / "video.mp4", ns=(1_500_000_000_000_000_000, 1_600_000_000_123_456_789))
    os.symlink("2026/img01.jpg", root / "photos" / "latest")


async def account_and_source(tmp_path: Path, nursery: trio.Nursery, *, gated: bool = False
                             ) -> tuple[Network, Client, Path]:
    """Six nodes on loopback (behind gates that can hold them, if ``gated``), a new account, and a source tree."""
    net = await start_network(tmp_path, nursery, nodes=6, gated=gated)
    client = Client(tmp_path / "c", net.mediator_url)
    client.init()
    src = tmp_path / "src"
    await trio.to_thread.run_sync(make_source, src)
    return net, client, src


async def put(client: Client, *args: str) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(lambda: client.cli("put", *args, check=False))


async def status(client: Client) -> dict:
    return json.loads((await trio.to_thread.run_sync(lambda: client.cli("status", "--json"))).stdout)


async def put_changed(client: Client, src: Path, changed: Path, data: bytes, summary: str) -> None:
    """Change one source file and put /photos again: only that file is copied."""
    changed.write_bytes(data)
    result = await put(client, str(src / "photos"), "/")
    assert result.returncode == 0, result.stderr
    assert summary in result.stderr


def tree(client: Client, read: Callable[[sqlite3.Connection], T]) -> T:
    """``read`` on a read-only connection to the client's tree."""
    db = meta.connect_readonly(client.data_dir / "meta.db")
    try:
        return read(db)
    finally:
        db.close()


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_mtime_ns for p in root.rglob("*")}


async def test_put_stores_a_tree_incrementally_and_a_cold_mount_reads_it(tmp_path: Path,
                                                                         nursery: trio.Nursery) -> None:
    net, client, src = await account_and_source(tmp_path, nursery)
    try:
        result = await put(client, str(src / "photos"), "/backup")
        assert result.returncode == 0, result.stderr
        assert "42 file(s)" in result.stderr and "stored in" in result.stderr
        report = await status(client)
        assert report["pending_uploads"] == 0
        stored = {f["path"]: f for f in report["files"]}
        assert stored["/backup/photos/video.mp4"]["state"] == "stored" and len(stored) == 42  # + the empty file
        assert all(f["state"] == "stored" for f in report["files"])

        # everything from the network: no cache
        shutil.rmtree(client.cache_dir)
        await client.mount()
        copy = client.mountpoint / "backup" / "photos"
        assert await trio.to_thread.run_sync(tree_of, copy) == await trio.to_thread.run_sync(tree_of, src / "photos")
        assert await trio.to_thread.run_sync(mtimes, copy) == await trio.to_thread.run_sync(mtimes, src / "photos")

        # while mounted: only what changed is copied, the mount's worker stores it, the mount shows it
        (src / "photos" / "2026" / "img05.jpg").write_bytes(b"edited")
        (src / "photos" / "new.txt").write_bytes(b"new")
        result = await put(client, str(src / "photos"), "backup")
        assert result.returncode == 0, result.stderr
        assert "2 file(s)" in result.stderr and "42 unchanged" in result.stderr  # 41 files and the link
        with trio.fail_after(5):  # the kernel keeps names and attributes for a second
            while (await trio.to_thread.run_sync(tree_of, copy)
                   != await trio.to_thread.run_sync(tree_of, src / "photos")):
                await trio.sleep(0.2)
        await client.unmount()
        shutil.rmtree(client.cache_dir)
        await client.mount()
        assert await trio.to_thread.run_sync(tree_of, copy) == await trio.to_thread.run_sync(tree_of, src / "photos")
    finally:
        await client.cleanup()


async def test_large_files_go_from_their_source_without_a_cache_copy(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Not mounted, a file too large to pack is uploaded straight from its source and recorded once stored:
    no cache room needed. Replacing it releases the old object; a cold mount reads the new one."""
    net, client, src = await account_and_source(tmp_path, nursery)
    video = src / "photos" / "video.mp4"
    try:
        result = await put(client, str(src / "photos"), "/")
        assert result.returncode == 0, result.stderr
        db = meta.connect_readonly(client.data_dir / "meta.db")
        try:
            first = meta.lookup(db, ino_of(db, "/photos"), b"video.mp4")
        finally:
            db.close()
        assert first.state == meta.STORED and first.size == video.stat().st_size
        assert not (client.cache_dir / str(first.ino)).exists()  # never copied into the cache
        assert (await status(client))["pending_deletes"] == 0  # its commit note went with the record

        new_video = os.urandom(5 * 2**20 + 3)
        await put_changed(client, src, video, new_video, "1 file(s) (5.0 MiB) copied, 42 unchanged")
        second = tree(client, lambda db: meta.get(db, first.ino))
        assert (second.version, second.size) == (first.version + 1, len(new_video))
        assert meta.content_object_id(second.object or "") != meta.content_object_id(first.object or "")
        # the old object is released once a snapshot without it is published, and put waits for that (up to
        # RELEASE_WAIT): without a mount, nothing else would release it before the next run
        assert (await status(client))["pending_deletes"] == 0
        await assert_stored(client, src)
    finally:
        await client.cleanup()



async def test_small_files_go_in_packs_from_their_sources_without_cache_copies(tmp_path: Path,
                                                                                nursery: trio.Nursery) -> None:
    """Not mounted, small files are packed straight from their sources: no cache file per file. Replacing one
    moves it to a new pack and drops its reference to the old one; a cold mount reads the new content."""
    net, client, src = await account_and_source(tmp_path, nursery)
    image = src / "photos" / "2026" / "img05.jpg"
    try:
        result = await put(client, str(src / "photos"), "/")
        assert result.returncode == 0, result.stderr
        db = meta.connect_readonly(client.data_dir / "meta.db")
        try:
            folder = ino_of(db, "/photos/2026")
            first = meta.lookup(db, folder, b"img05.jpg")
            empty = meta.lookup(db, ino_of(db, "/photos"), b"empty")
            packs = dict(meta.packs(db))
        finally:
            db.close()
        ref = meta.pack_ref(first.object)
        assert first.state == meta.STORED and ref is not None and packs[ref.pack_id] == 40
        cached = [p.name for p in client.cache_dir.iterdir() if p.name.isdigit()]
        assert cached == [str(empty.ino)]  # nothing copied but the empty file (nothing to upload)

        new_image = os.urandom(12_345)
        await put_changed(client, src, image, new_image, "1 file(s) (0.0 MiB) copied, 42 unchanged")
        second = tree(client, lambda db: meta.get(db, first.ino))
        packs = tree(client, lambda db: dict(meta.packs(db)))
        new_ref = meta.pack_ref(second.object)
        assert (second.version, second.size) == (first.version + 1, len(new_image))
        assert new_ref is not None and new_ref.pack_id != ref.pack_id
        assert (packs[ref.pack_id], packs[new_ref.pack_id]) == (39, 1)
        await assert_stored(client, src)
    finally:
        await client.cleanup()


async def test_put_explains_what_it_cannot_do(tmp_path: Path, nursery: trio.Nursery) -> None:
    net, client, src = await account_and_source(tmp_path, nursery)
    os.mkfifo(src / "photos" / "pipe")
    try:
        result = await put(client, str(tmp_path / "missing"), "/")
        assert result.returncode == 1 and "missing: no such file or folder" in result.stderr
        result = await put(client, str(src / "photos"), "/a/../b")
        assert result.returncode == 1 and "'..' is not allowed" in result.stderr

        result = await put(client, str(src / "photos"), "/")
        assert result.returncode == 0, result.stderr  # a FIFO is skipped, not an error
        assert "skipped:" in result.stderr and "pipe: not a file, folder or link" in result.stderr
        result = await put(client, str(src / "photos"), "/photos/video.mp4")
        assert result.returncode == 1 and "/photos/video.mp4 in the tree is a file, not a folder" in result.stderr

        # a folder where the tree has a file: that entry fails, the rest is stored, the status is 1
        os.unlink(src / "photos" / "empty")
        (src / "photos" / "empty").mkdir()
        (src / "photos" / "after.txt").write_bytes(b"still copied")
        result = await put(client, str(src / "photos"), "/")
        assert result.returncode == 1
        assert "error:" in result.stderr and "photos/empty: the tree has a file by that name" in result.stderr
        assert "1 file(s)" in result.stderr
        report = await status(client)
        assert {f["path"] for f in report["files"]} >= {"/photos/after.txt", "/photos/empty"}
        assert report["pending_uploads"] == 0

        # `fincryptfs status | head -1`: the reader goes away while status still writes; no traceback
        (src / "many").mkdir()
        for i in range(1500):  # empty files: nothing to upload, and more than a pipe's 64 KiB of status lines
            (src / "many" / f"empty-file-{i:04}").touch()
        assert (await put(client, str(src / "many"), "/")).returncode == 0

        def status_head() -> str:
            process = subprocess.Popen([sys.executable, "-m", "fincryptfs.cli", "status", "--env-file",
                                        str(client.env_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert process.stdout is not None and process.stderr is not None
            process.stdout.readline()
            process.stdout.close()
            errors = process.stderr.read().decode()
            process.wait(timeout=60)
            return errors
        assert "Traceback" not in await trio.to_thread.run_sync(status_head)
    finally:
        await client.cleanup()


async def test_kill_9_during_put_then_put_again_stores_everything(tmp_path: Path, nursery: trio.Nursery) -> None:
    """A put killed while its uploads hang (the nodes answer nothing) leaves a tree that the next put completes:
    every byte of the source is then read back from the network, and no temporary file stays in the cache.
    (Not mounted, put uploads straight from the sources: nothing it had not recorded as stored is kept.)"""
    net, client, src = await account_and_source(tmp_path, nursery, gated=True)
    process = None
    try:
        await put(client, str(src / "photos"), "/")  # the account's tree exists (the first put asks the mediator)
        for i in range(300):  # more small files, and a changed large one: new files and a replaced one
            (src / "photos" / "more").mkdir(exist_ok=True)
            (src / "photos" / "more" / f"{i:03}").write_bytes(os.urandom(1 + i * 37))
        (src / "photos" / "video.mp4").write_bytes(os.urandom(2 * 2**20))
        net.hold()
        connected = sum(gate.accepted for gate in net.gates)
        process = subprocess.Popen([sys.executable, "-m", "fincryptfs.cli", "put", str(src / "photos"), "/",
                                    "--env-file", str(client.env_file)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        with trio.fail_after(30):  # the walk has reached the new folder; uploads are stuck at the held nodes
            while not in_tree(client, b"photos", b"more") or sum(g.accepted for g in net.gates) < connected + 6:
                await trio.sleep(0.05)
        process.kill()
        await trio.to_thread.run_sync(process.wait)
        net.release()
        result = await put(client, str(src / "photos"), "/")
        assert result.returncode == 0, result.stderr
        assert not [p for p in client.cache_dir.iterdir() if p.name.startswith(".")]
        await assert_stored(client, src)
    finally:
        if process is not None and process.poll() is None:
            process.kill()
        await client.cleanup()


async def assert_stored(client: Client, src: Path) -> None:
    """Mount with an empty cache: the backup's /photos is the source's, byte for byte, from the network."""
    shutil.rmtree(client.cache_dir)
    await client.mount()
    assert (await trio.to_thread.run_sync(tree_of, client.mountpoint / "photos")
            == await trio.to_thread.run_sync(tree_of, src / "photos"))


def in_tree(client: Client, *names: bytes) -> bool:
    """Whether the path ``names`` (from the root) is in the client's tree."""
    db = meta.connect_readonly(client.data_dir / "meta.db")
    try:
        ino = meta.ROOT_INO
        for name in names:
            ino = meta.lookup(db, ino, name).ino
        return True
    except meta.NotFound:
        return False
    finally:
        db.close()


async def test_ctrl_c_stops_put_at_once_and_the_next_put_finishes(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Ctrl-C while put waits for uploads that cannot finish (the nodes answer nothing): it stops within a few
    seconds with a message saying what is kept, and a later put stores everything."""
    net, client, src = await account_and_source(tmp_path, nursery, gated=True)
    process = None
    try:
        await put(client, str(src / "photos" / "empty"), "/")  # the account's tree exists
        net.hold()
        process = subprocess.Popen([sys.executable, "-m", "fincryptfs.cli", "put", str(src / "photos"), "/",
                                    "--env-file", str(client.env_file)], stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        connected = sum(gate.accepted for gate in net.gates)
        with trio.fail_after(30):  # the walk is over; the uploads hang at the held nodes
            while not in_tree(client, b"photos", b"latest") or sum(g.accepted for g in net.gates) < connected + 6:
                await trio.sleep(0.05)
        await trio.sleep(0.5)
        process.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            _, err = await trio.to_thread.run_sync(process.communicate)
        assert process.returncode == 1 and "put interrupted" in err and "Traceback" not in err
        net.release()
        result = await put(client, str(src / "photos"), "/")
        assert result.returncode == 0, result.stderr
        # the folders, the link and the empty file were recorded before the interruption; the 40 small files
        # (one pack) and the large video are uploaded straight from their sources and recorded only once stored,
        # so this put stores them
        assert "41 file(s) (3.7 MiB) copied, 2 unchanged" in result.stderr
        await assert_stored(client, src)
    finally:
        if process is not None and process.poll() is None:
            process.kill()
        await client.cleanup()


async def test_put_leaves_a_file_being_written_through_the_mount_alone(tmp_path: Path,
                                                                      nursery: trio.Nursery) -> None:
    """`put` into a running mount over a file a program is writing there would replace it under the writer, whose
    later bytes would then be lost: it is left alone, and put says so and exits 1. (The writer is a process of
    its own: a descriptor inherited by `put`'s fork would be closed there, and every close of a descriptor is a
    flush that records the file.)"""
    _, client, src = await account_and_source(tmp_path, nursery)
    writer_code = ("import sys\nf = open(sys.argv[1], 'r+b', buffering=0)\nf.write(b'written through the mount')\n"
                   "print('ready', flush=True)\nsys.stdin.readline()\nf.write(b', and after')\nf.close()\n")
    try:
        await client.mount()
        assert (await put(client, str(src / "photos"), "/")).returncode == 0
        target = client.mountpoint / "photos" / "2026" / "img03.jpg"
        writer = subprocess.Popen([sys.executable, "-c", writer_code, str(target)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout is not None and writer.stdin is not None
            assert await trio.to_thread.run_sync(writer.stdout.readline) == "ready\n"
            (src / "photos" / "2026" / "img03.jpg").write_bytes(b"changed at the source")
            again = await put(client, str(src / "photos"), "/")
            assert again.returncode == 1 and "img03.jpg: is being written through the mount" in again.stderr, \
                again.stderr
            writer.stdin.write("go\n")
            writer.stdin.flush()
            assert await trio.to_thread.run_sync(writer.wait) == 0
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        got = await trio.to_thread.run_sync(target.read_bytes)
        assert got.startswith(b"written through the mount, and after")
    finally:
        await client.cleanup()

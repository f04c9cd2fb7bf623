"""The FUSE operations called directly, without the kernel: what a POSIX file system must answer that the kernel
leaves to the file system (a set-group-ID folder's group, O_TRUNC at open, name lengths, attributes)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pyfuse3
import pytest
import trio
import trio.testing

from fincryptfs import meta
from fincryptfs.cache import CacheDir
from fincryptfs.downloader import Progress
from fincryptfs.fs import FincryptOperations


def request(uid: int = 1000, gid: int = 1000) -> pyfuse3.RequestContext:
    return cast(pyfuse3.RequestContext, SimpleNamespace(uid=uid, gid=gid, pid=1, umask=0o022))


async def no_fetch(object_json: str, dest: Path, progress: Progress | None) -> None:
    raise AssertionError("nothing here is stored in the network")


@pytest.fixture
def ops(tmp_path: Path) -> FincryptOperations:
    db = meta.connect(tmp_path / "meta.db")
    return FincryptOperations(db=db, cache=CacheDir(tmp_path / "cache", 2**30), fetch=no_fetch)


async def test_a_set_group_id_folder_gives_its_group_to_what_is_made_in_it(ops: FincryptOperations) -> None:
    shared = await ops.mkdir(meta.ROOT_INO, b"shared", 0o2775, request(uid=0, gid=0))
    meta.set_attrs(ops.db, shared.st_ino, gid=500)
    made = [
        await ops.mkdir(shared.st_ino, b"sub", 0o755, request()),
        (await ops.create(shared.st_ino, b"file", 0o644, os.O_WRONLY, request()))[1],
        await ops.symlink(shared.st_ino, b"link", b"file", request()),
    ]
    assert [(a.st_uid, a.st_gid) for a in made] == [(1000, 500)] * 3
    assert made[0].st_mode == stat.S_IFDIR | 0o2755  # a folder inherits the bit; a file keeps its own mode
    assert made[1].st_mode == stat.S_IFREG | 0o644
    plain = await ops.mkdir(meta.ROOT_INO, b"plain", 0o755, request(uid=0, gid=0))
    assert (await ops.mkdir(plain.st_ino, b"sub", 0o755, request())).st_gid == 1000


async def test_o_trunc_empties_the_file_whatever_the_access_mode(ops: FincryptOperations) -> None:
    for accmode in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY):
        info, attr = await ops.create(meta.ROOT_INO, b"f%d" % accmode, 0o644, os.O_WRONLY, request())
        assert await ops.write(info.fh, 0, b"content") == 7
        await ops.release(info.fh)
        info = await ops.open(attr.st_ino, accmode | os.O_TRUNC, request())
        assert await ops.read(info.fh, 0, 100) == b""
        await ops.release(info.fh)
        assert (await ops.getattr(attr.st_ino)).st_size == 0
        info = await ops.open(attr.st_ino, os.O_RDONLY, request())
        assert await ops.read(info.fh, 0, 100) == b""
        await ops.release(info.fh)


async def test_looking_up_a_name_longer_than_name_max_is_enametoolong(ops: FincryptOperations) -> None:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.lookup(meta.ROOT_INO, b"x" * 256, request())
    assert info.value.errno == errno.ENAMETOOLONG
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.lookup(meta.ROOT_INO, b"x" * 255, request())
    assert info.value.errno == errno.ENOENT


async def test_a_removed_folder_still_open_has_no_links(ops: FincryptOperations) -> None:
    folder = await ops.mkdir(meta.ROOT_INO, b"d", 0o755, request())
    await ops.mkdir(folder.st_ino, b"sub", 0o755, request())
    assert (await ops.getattr(folder.st_ino)).st_nlink == 3
    await ops.rmdir(folder.st_ino, b"sub", request())
    await ops.rmdir(meta.ROOT_INO, b"d", request())
    assert (await ops.getattr(folder.st_ino)).st_nlink == 0  # as fstat of a descriptor on it shows


async def list_folder(ops: FincryptOperations, monkeypatch: pytest.MonkeyPatch, ino: int, per_call: int,
                      between_calls: Callable[[], Awaitable[None]] | None = None) -> list[tuple[bytes, int]]:
    """(name, inode) of every entry readdir lists, ``per_call`` entries per call as a small kernel buffer takes
    them, each call resuming at the offset of the last entry the one before took."""
    listed: list[tuple[bytes, int, int]] = []
    room = 0

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        nonlocal room
        if room == 0:
            return False
        room -= 1
        listed.append((name, attr.st_ino, next_id))
        return True
    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    offset = 0
    while True:
        room, before = per_call, len(listed)
        await ops.readdir(ino, offset, cast(pyfuse3.ReaddirToken, None))
        if len(listed) == before:
            return [(name, ino) for name, ino, _ in listed]
        offset = listed[-1][2]
        if between_calls is not None:
            await between_calls()


@pytest.mark.parametrize("per_call", [1, 2, 3, 1000])
async def test_readdir_lists_dot_and_dot_dot_first_and_resumes_where_it_stopped(
        ops: FincryptOperations, monkeypatch: pytest.MonkeyPatch, per_call: int) -> None:
    folder = await ops.mkdir(meta.ROOT_INO, b"d", 0o755, request())
    children = [(await ops.mkdir(folder.st_ino, b"c%d" % i, 0o755, request())).st_ino for i in range(5)]
    lookups = dict(ops._lookups)
    entries = await list_folder(ops, monkeypatch, folder.st_ino, per_call)
    assert entries == [(b".", folder.st_ino), (b"..", meta.ROOT_INO)] + [(b"c%d" % i, children[i]) for i in range(5)]
    # the kernel counts a lookup for every child it was given, none for "." and ".."
    gained = {ino: count - lookups.get(ino, 0) for ino, count in ops._lookups.items() if count != lookups.get(ino, 0)}
    assert gained == dict.fromkeys(children, 1)
    root = await list_folder(ops, monkeypatch, meta.ROOT_INO, per_call)
    assert root == [(b".", meta.ROOT_INO), (b"..", meta.ROOT_INO), (b"d", folder.st_ino)]


async def test_readdir_resumes_past_entries_removed_and_added_between_calls(
        ops: FincryptOperations, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(4):
        await ops.mkdir(meta.ROOT_INO, b"c%d" % i, 0o755, request())
    calls = 0

    async def change() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:  # ".", ".." and c0 listed: c1 (next) goes, and a new name comes (listed at the end)
            await ops.rmdir(meta.ROOT_INO, b"c1", request())
            await ops.mkdir(meta.ROOT_INO, b"new", 0o755, request())
    names = [name for name, _ in await list_folder(ops, monkeypatch, meta.ROOT_INO, 1, change)]
    assert names == [b".", b"..", b"c0", b"c2", b"c3", b"new"]


async def test_mknod_makes_an_empty_regular_file_and_nothing_else(ops: FincryptOperations) -> None:
    attr = await ops.mknod(meta.ROOT_INO, b"made", stat.S_IFREG | 0o640, 0, request())
    assert (attr.st_mode, attr.st_size, attr.st_nlink) == (stat.S_IFREG | 0o640, 0, 1)
    info = await ops.open(attr.st_ino, os.O_RDONLY, request())
    assert await ops.read(info.fh, 0, 10) == b""
    await ops.release(info.fh)
    for kind in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
        with pytest.raises(pyfuse3.FUSEError) as info_error:
            await ops.mknod(meta.ROOT_INO, b"other", kind | 0o644, 0, request())
        assert info_error.value.errno == errno.EPERM
    with pytest.raises(pyfuse3.FUSEError) as info_error:
        await ops.mknod(meta.ROOT_INO, b"made", stat.S_IFREG | 0o640, 0, request())
    assert info_error.value.errno == errno.EEXIST


async def test_times_beyond_what_the_tree_holds_are_clamped_not_an_error(ops: FincryptOperations) -> None:
    """A clock gone wrong (a camera's, a broken archive's) sets times past year 2262, the end of signed 64-bit
    nanoseconds. Set on a file being written, such a time used to make its close fail for ever (SQLite refused
    the integer): the close could never be recorded, its upload never queued, and ``flush`` said all was
    stored. Now the time is clamped, as the kernel clamps to what ext4 holds."""
    far, before = 10**11 * 10**9, -(10**11) * 10**9  # year 5138, and as far before 1970
    info, attr = await ops.create(meta.ROOT_INO, b"f", 0o644, os.O_WRONLY, request())
    assert await ops.write(info.fh, 0, b"content") == 7
    times = pyfuse3.EntryAttributes()
    times.st_atime_ns, times.st_mtime_ns = before, far
    fields = cast(pyfuse3.SetattrFields, SimpleNamespace(update_size=False, update_mode=False, update_uid=False,
                                                         update_gid=False, update_atime=True, update_mtime=True))
    await ops.setattr(attr.st_ino, times, fields, info.fh, request())
    await ops.release(info.fh)
    node = meta.get(ops.db, attr.st_ino)
    assert (node.state, node.size) == (meta.PENDING, 7)  # recorded: its upload is queued
    assert (node.atime_ns, node.mtime_ns) == (-2**63, 2**63 - 1)
    # and on a closed file
    times.st_atime_ns, times.st_mtime_ns = far, before
    await ops.setattr(attr.st_ino, times, fields, None, request())
    node = meta.get(ops.db, attr.st_ino)
    assert (node.atime_ns, node.mtime_ns) == (2**63 - 1, -2**63)


async def test_a_cache_folder_removed_while_mounted_is_made_again(ops: FincryptOperations) -> None:
    """A user clearing ~/.cache while mounted: every create failed (ENOENT) until the next mount, each leaving
    an empty file behind in the tree, and every fetch and eviction failed with it."""
    root = ops.cache.root
    shutil.rmtree(root)
    info, attr = await ops.create(meta.ROOT_INO, b"a", 0o644, os.O_WRONLY, request())
    assert await ops.write(info.fh, 0, b"content") == 7
    await ops.release(info.fh)
    assert ops.cache.path(attr.st_ino).read_bytes() == b"content"
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700 and ops.cache.packs.is_dir()
    shutil.rmtree(root)
    root.write_bytes(b"")  # and now the folder cannot be made again
    with pytest.raises((pyfuse3.FUSEError, OSError)):
        await ops.create(meta.ROOT_INO, b"b", 0o644, os.O_WRONLY, request())
    with pytest.raises(pyfuse3.FUSEError) as info_error:  # no empty file left in its place
        await ops.lookup(meta.ROOT_INO, b"b", request())
    assert info_error.value.errno == errno.ENOENT


async def test_a_file_rewritten_while_its_old_version_arrives_never_gets_the_old_version_back(
        tmp_path: Path) -> None:
    """A fetch that was still running when the file was emptied and written again must not land: once the new
    version is uploaded and evicted, the old fetch found no cache copy to spare and put the old bytes in its place,
    and an open meanwhile read them from its partial copy."""
    db = meta.connect(tmp_path / "meta.db")
    cache = CacheDir(tmp_path / "cache", 2**30)
    hold = trio.Event()

    async def fetch(object_json: str, dest: Path, progress: Progress | None) -> None:  # as fetch_to_file does
        content = json.loads(object_json)["content"].encode()
        if content.startswith(b"early"):
            await trio.Event().wait()  # not a byte arrives
        part = dest.with_name(f".{dest.name}.part")
        part.write_bytes(content[:4])
        if progress is not None:
            progress(part, 4)
        if content.startswith(b"old"):
            await hold.wait()  # the old version is slow to arrive
        part.write_bytes(content)
        if dest.exists():  # clobber=False: a newer copy written meanwhile stays
            part.unlink()
        else:
            os.replace(part, dest)

    def uploaded(ino: int, content: str) -> None:  # what the upload worker does, then the evictor
        job = meta.next_upload(db, time.time())
        assert job is not None and job.ino == ino
        assert meta.finish_upload(db, job, content, json.dumps({"object_id": content, "content": content}))
        cache.remove(ino)

    with trio.fail_after(10):  # a read used to wait for the old version's fetch, here for ever
        async with trio.open_nursery() as nursery:
            await rewrite_while_arriving(FincryptOperations(db=db, cache=cache, fetch=fetch,
                                                            spawn=nursery.start_soon), uploaded, hold)


async def rewrite_while_arriving(ops: FincryptOperations, uploaded: Callable[[int, str], None],
                                 hold: trio.Event) -> None:
    cache = ops.cache
    info, attr = await ops.create(meta.ROOT_INO, b"f", 0o644, os.O_WRONLY, request())
    await ops.write(info.fh, 0, b"old version")
    await ops.release(info.fh)
    uploaded(attr.st_ino, "old version")

    reader = await ops.open(attr.st_ino, os.O_RDONLY, request())  # starts fetching the old version
    assert await ops.read(reader.fh, 0, 4) == b"old "
    writer = await ops.open(attr.st_ino, os.O_WRONLY | os.O_TRUNC, request())
    await ops.write(writer.fh, 0, b"new")
    await ops.release(writer.fh)
    assert await ops.read(reader.fh, 0, 100) == b"new"
    await ops.release(reader.fh)
    uploaded(attr.st_ino, "new")

    async def read_whole() -> bytes:
        info = await ops.open(attr.st_ino, os.O_RDONLY, request())
        try:
            return await ops.read(info.fh, 0, 100)
        finally:
            await ops.release(info.fh)

    assert await read_whole() == b"new"  # fetched again: the new version
    cache.remove(attr.st_ino)
    hold.set()  # the old fetch would end now
    await trio.testing.wait_all_tasks_blocked()
    assert not cache.has(attr.st_ino)
    assert await read_whole() == b"new"

    # Emptied and written again while an open waits for the old version's first bytes: that open reads the new one.
    info, attr = await ops.create(meta.ROOT_INO, b"g", 0o644, os.O_WRONLY, request())
    await ops.write(info.fh, 0, b"early version")
    await ops.release(info.fh)
    uploaded(attr.st_ino, "early version")
    opened: list[pyfuse3.FileInfo] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: wait_open(ops, attr.st_ino, opened))
        await trio.testing.wait_all_tasks_blocked()
        writer = await ops.open(attr.st_ino, os.O_WRONLY | os.O_TRUNC, request())
        await ops.write(writer.fh, 0, b"new")
        await ops.release(writer.fh)
    assert await ops.read(opened[0].fh, 0, 100) == b"new"
    await ops.release(opened[0].fh)
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".")]  # no partial copy left behind


async def wait_open(ops: FincryptOperations, ino: int, opened: list[pyfuse3.FileInfo]) -> None:
    opened.append(await ops.open(ino, os.O_RDONLY, request()))

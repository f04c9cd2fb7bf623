"""The cache folder's eviction on real files: least recently used first, only evictable and unused files, and
the folder is listed again only when the cache may have grown past its limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from fincryptfs.cache import CacheDir


def evict(cache: CacheDir, evictable: set[int], in_use: set[int], packs_in_use: frozenset[str] = frozenset()
          ) -> int:
    """One eviction pass as the evictor makes it (it lists in a worker thread); the bytes freed."""
    mark = cache.usage_mark()
    entries = cache.list_entries()
    return cache.finish_eviction(entries, cache.choose_victims(entries, evictable, in_use, packs_in_use), mark)


def put(cache: CacheDir, ino: int, size: int) -> None:
    cache.path(ino).write_bytes(os.urandom(size))
    cache.added(size)


def test_eviction_order_and_when_the_folder_is_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = CacheDir(tmp_path / "cache", limit_bytes=10_000)
    assert cache.may_exceed_limit(), "nothing known before the first listing"
    for ino in (1, 2, 3):
        put(cache, ino, 3_000)
        cache.touch(ino)
    assert evict(cache, evictable={1, 2, 3}, in_use=set()) == 0
    assert not cache.may_exceed_limit()  # 9,000 of 10,000 bytes: no listing while nothing grows

    listed: list[object] = []
    real_scandir = os.scandir

    def counting_scandir(path: object) -> object:
        listed.append(path)
        return real_scandir(path)  # type: ignore[call-overload]
    monkeypatch.setattr(os, "scandir", counting_scandir)
    put(cache, 4, 500)
    assert not cache.may_exceed_limit() and listed == []
    put(cache, 5, 3_000)  # 12,500 now
    assert cache.may_exceed_limit()
    cache.touch(5)
    # 1 is the least recently used but open, 4 is not evictable (not uploaded yet): 2 goes, and 3, down to
    # 90 % of the limit (9,000 bytes): the next writes do not make the whole cache be listed again at once
    assert evict(cache, evictable={1, 2, 3, 5}, in_use={1}) == 6_000
    assert listed == [cache.root, cache.packs]  # one listing: the files, and the whole packs
    assert sorted(int(p.name) for p in cache.root.iterdir() if p.name.isdigit()) == [1, 4, 5]
    assert not cache.may_exceed_limit()
    cache.forget_usage()  # e.g. a fetched pack, which ``added`` never saw
    assert cache.may_exceed_limit()


def test_leftovers_of_interrupted_fetches_are_removed_at_start(tmp_path: Path) -> None:
    cache = CacheDir(tmp_path / "cache", 2**20)
    cache.path(5).write_bytes(b"x" * 10)
    cache.pack_path("ab12").write_bytes(b"whole pack")
    leftovers = [cache.root / ".5.0a1b2c3d.part", cache.root / ".fetch-7", cache.packs / ".ab34.0a1b2c3d.part"]
    for path in leftovers:
        path.write_bytes(b"partial")
    cache.remove_leftovers()
    assert cache.size(5) == 10 and cache.size(6) is None
    assert not any(path.exists() for path in leftovers)
    assert cache.path(5).exists() and cache.has_pack("ab12")


def test_whole_packs_are_evicted_like_files_unless_an_open_file_reads_them(tmp_path: Path) -> None:
    cache = CacheDir(tmp_path / "cache", limit_bytes=10_000)
    for pack_id in ("aa", "bb", "cc"):
        cache.pack_path(pack_id).write_bytes(os.urandom(3_000))
        cache.touch_pack(pack_id)
    put(cache, 7, 3_000)
    cache.touch(7)  # 12,000 bytes: 2,000 too many
    # "aa" is the least recently used but an open file reads from it: "bb" goes
    assert evict(cache, evictable={7}, in_use=set(), packs_in_use=frozenset({"aa"})) == 3_000
    assert sorted(p.name for p in cache.packs.iterdir()) == ["aa", "cc"] and cache.has(7)
    cache.touch_pack("aa")
    cache.limit_bytes = 3_500
    assert evict(cache, evictable={7}, in_use=set()) == 6_000  # "cc", then 7: both older than "aa"'s use
    assert [p.name for p in cache.packs.iterdir()] == ["aa"] and not cache.has(7)


@pytest.mark.parametrize("pack_id", ["", "../x", "AB", "ab/cd", "ab\x00"])
def test_pack_paths_are_only_hex_names_inside_the_cache(tmp_path: Path, pack_id: str) -> None:
    with pytest.raises(ValueError):
        CacheDir(tmp_path / "cache", 1).pack_path(pack_id)


def test_deleted_members_are_zeroed_and_dead_packs_dropped(tmp_path: Path) -> None:
    cache = CacheDir(tmp_path / "cache", 2**20)
    pack = os.urandom(3_000)
    for pack_id in ("aa", "bb", "cc"):
        cache.pack_path(pack_id).write_bytes(pack)
    cache.scrub_member("aa", 1_000, 500)
    assert cache.pack_path("aa").read_bytes() == pack[:1_000] + bytes(500) + pack[1_500:]
    cache.scrub_member("aa", 2_900, 500)  # never grows the copy
    assert cache.pack_path("aa").read_bytes() == pack[:1_000] + bytes(500) + pack[1_500:2_900] + bytes(100)
    cache.scrub_member("dd", 0, 10)  # not cached: nothing to do
    (cache.packs / ".ee.0a1b.part").write_bytes(b"being fetched")
    assert cache.drop_dead_packs(live={"aa"}, in_use={"bb"}) == 1
    assert sorted(p.name for p in cache.packs.iterdir()) == [".ee.0a1b.part", "aa", "bb"]


async def test_one_fetch_per_file_however_many_ask_and_no_lock_kept_after(tmp_path: Path) -> None:
    cache = CacheDir(tmp_path / "cache", limit_bytes=10_000)
    fetched: list[Path] = []
    arrived = trio.Event()

    async def fetch(dest: Path) -> None:
        fetched.append(dest)
        await arrived.wait()
        dest.write_bytes(b"content")

    paths: list[Path] = []

    async def ensure(ino: int) -> None:
        paths.append(await cache.ensure(ino, fetch))

    async with trio.open_nursery() as nursery:
        for ino in (1, 1, 1, 2):
            nursery.start_soon(ensure, ino)
        await trio.testing.wait_all_tasks_blocked()
        arrived.set()
    assert sorted(fetched) == [cache.path(1), cache.path(2)]
    assert sorted(paths) == [cache.path(1)] * 3 + [cache.path(2)]
    # every file opened for writing passes here: a lock kept for each grew the mount's memory without end
    assert not cache._locks

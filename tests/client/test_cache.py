"""The cache folder's eviction on real files: least recently used first, only evictable and unused files, and
the folder is listed again only when the cache may have grown past its limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fincryptfs.cache import CacheDir


def put(cache: CacheDir, ino: int, size: int) -> None:
    cache.path(ino).write_bytes(os.urandom(size))
    cache.added(size)


def test_eviction_order_and_when_the_folder_is_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = CacheDir(tmp_path / "cache", limit_bytes=10_000)
    assert cache.may_exceed_limit(), "nothing known before the first listing"
    for ino in (1, 2, 3):
        put(cache, ino, 3_000)
        cache.touch(ino)
    assert cache.evict(evictable={1, 2, 3}, in_use=set()) == 0
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
    # 1 is the least recently used but open, 4 is not evictable (not uploaded yet): 2 goes, which is enough
    assert cache.evict(evictable={1, 2, 3, 5}, in_use={1}) == 3_000
    assert len(listed) == 1
    assert sorted(int(p.name) for p in cache.root.iterdir()) == [1, 3, 4, 5]
    assert not cache.may_exceed_limit()
    cache.forget_usage()  # e.g. a fetch carved pack-mates that ``added`` never saw
    assert cache.may_exceed_limit()


def test_sizes_at_start_drop_what_interrupted_fetches_left(tmp_path: Path) -> None:
    cache = CacheDir(tmp_path / "cache", 2**20)
    cache.path(5).write_bytes(b"x" * 10)
    leftovers = [cache.root / ".5.0a1b2c3d.part", cache.root / ".fetch-7", cache.root / ".fetch-pack-ab12"]
    for path in leftovers:
        path.write_bytes(b"partial")
    assert cache.sizes() == {5: 10}
    assert not any(path.exists() for path in leftovers) and cache.path(5).exists()

"""``fincryptfs put`` without a network: paths in the tree, and the copy into a real tree and cache."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path
from typing import cast

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs import meta
from fincryptfs import put as putmod
from fincryptfs.cache import CacheDir
from fincryptfs.core.errors import ConfigError
from fincryptfs.objectstore import ObjectStore
from fincryptfs.put import Importer, own_folders, tree_path


def put_unmounted(db: sqlite3.Connection, cache: CacheDir, src: Path, dest: str) -> Importer:
    """One ``put`` of ``src`` into ``dest`` of the tree, as without a mount; the importer (for its report)."""
    importer = Importer(db, cache, mounted=False, uploads_pending=lambda: False)
    try:
        importer.put(src, importer.folder(tree_path(dest)))
    finally:
        importer.close()
    return importer


names = st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1,
                max_size=40).filter(lambda n: n not in (".", ".."))


@given(st.lists(names, max_size=6), st.booleans())
def test_tree_paths_split_into_names(parts: list[str], leading_slash: bool) -> None:
    text = ("/" if leading_slash else "") + "/".join(parts)
    assert tree_path(text) == [os.fsencode(p) for p in parts]
    assert tree_path(text + "/") == tree_path(text) == tree_path(text.replace("/", "//"))


@pytest.mark.parametrize("text", ["../x", "a/../../b", "/a/..", "a/" + "n" * 256])
def test_tree_paths_refuse_escapes_and_long_names(text: str) -> None:
    with pytest.raises(ConfigError):
        tree_path(text)


def test_copy_into_a_real_tree_and_cache(tmp_path: Path) -> None:
    """Every kind of entry, a second incremental run, and the conflicts that are reported, not guessed."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(5000))
    (src / "empty").write_bytes(b"")
    (src / "sub" / "b.txt").write_bytes(b"bee")
    os.chmod(src / "sub" / "b.txt", 0o640)
    os.utime(src / "sub" / "b.txt", ns=(1_000_000_000, 2_000_000_000))
    os.symlink("sub/b.txt", src / "link")
    os.mkfifo(src / "fifo")
    db = meta.connect(tmp_path / "meta.db")
    cache = CacheDir(tmp_path / "cache", 2**30)

    def run() -> Importer:
        return put_unmounted(db, cache, src, "/backup/2026")

    first = run().report
    assert (first.files, first.folders, first.links, first.unchanged, first.errors) == (3, 2, 1, 0, [])
    assert len(first.skipped) == 1 and "fifo" in first.skipped[0]
    root = meta.lookup(db, meta.lookup(db, meta.lookup(db, meta.ROOT_INO, b"backup").ino, b"2026").ino, b"src")
    entries = meta.child_map(db, root.ino)
    assert set(entries) == {b"a.bin", b"empty", b"sub", b"link"}
    b = meta.lookup(db, entries[b"sub"].ino, b"b.txt")
    assert (b.mode, b.size, b.mtime_ns, b.state) == (0o100640, 3, 2_000_000_000, meta.PENDING)
    assert cache.path(b.ino).read_bytes() == b"bee"
    assert cache.path(entries[b"a.bin"].ino).read_bytes() == (src / "a.bin").read_bytes()
    assert entries[b"empty"].state == meta.STORED and entries[b"link"].target == b"sub/b.txt"
    assert root.mtime_ns == os.stat(src).st_mtime_ns
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert {ino for _, ino, *_ in meta.pending_uploads(db)} == {b.ino, entries[b"a.bin"].ino}

    (src / "a.bin").write_bytes(b"changed")
    os.unlink(src / "link")
    os.symlink("a.bin", src / "link")
    (src / "sub" / "new").write_bytes(b"new")
    second = run().report
    assert (second.files, second.links, second.unchanged, second.errors) == (2, 1, 2, [])  # a.bin and new
    a = meta.lookup(db, root.ino, b"a.bin")
    assert a.ino == entries[b"a.bin"].ino and a.version == 2 and cache.path(a.ino).read_bytes() == b"changed"
    assert meta.lookup(db, root.ino, b"link").target == b"a.bin"

    # a file where the tree has a folder, and a folder where it has a file: reported, the rest still copied
    shutil.rmtree(src / "sub")
    (src / "sub").write_bytes(b"now a file")
    os.unlink(src / "a.bin")
    (src / "a.bin").mkdir()
    (src / "later").write_bytes(b"later")
    third = run().report
    assert len(third.errors) == 2 and all("remove it first" in e for e in third.errors)
    assert meta.lookup(db, root.ino, b"later").size == 5
    assert meta.lookup(db, root.ino, b"sub").kind == meta.DIR and meta.lookup(db, root.ino, b"a.bin").size == 7
    db.close()


def test_times_beyond_year_2262_are_clamped_and_the_next_run_skips_them(tmp_path: Path) -> None:
    """ext4 holds times up to year 2446, the tree (nanoseconds in SQLite's signed 64 bits) up to 2262: a source
    from a clock gone wrong used to stop the whole put with an OverflowError."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "far.txt").write_bytes(b"far")
    os.utime(src / "far.txt", ns=(10**19, 10**19))  # year 2286
    os.symlink("far.txt", src / "link")
    os.utime(src / "link", ns=(10**19, 10**19), follow_symlinks=False)
    os.utime(src, ns=(10**19, 10**19))
    db = meta.connect(tmp_path / "meta.db")
    cache = CacheDir(tmp_path / "cache", 2**30)

    def run() -> Importer:
        return put_unmounted(db, cache, src, "/b")

    first = run().report
    assert (first.files, first.links, first.errors) == (1, 1, [])
    folder = meta.lookup(db, meta.lookup(db, meta.ROOT_INO, b"b").ino, b"src")
    far = meta.lookup(db, folder.ino, b"far.txt")
    assert (far.mtime_ns, far.atime_ns, folder.mtime_ns) == (2**63 - 1,) * 3
    assert meta.lookup(db, folder.ino, b"link").mtime_ns == 2**63 - 1
    again = run().report
    assert (again.files, again.unchanged, again.errors) == (0, 2, [])  # the file and the link


def test_own_folders_and_mounted_backups_are_never_copied(tmp_path: Path) -> None:
    """The data and cache folders, and a mounted backup (/proc/self/mounts escapes a space as \\040), are
    skipped with a message wherever they sit in the source; everything else is copied."""
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "cv.txt").write_bytes(b"cv")
    data, cache_dir, mounted = home / ".fincrypt", home / ".cache" / "fincrypt", home / "My Backup"
    for folder in (data, cache_dir, mounted):
        folder.mkdir(parents=True)
        (folder / "inside").write_bytes(b"not to be copied")
    mounts = (f"proc /proc proc rw 0 0\n"
              f"fincryptfs {str(mounted).replace(' ', chr(92) + '040')} fuse rw,user_id=0 0 0\n"
              f"other {home / 'docs'} fuse rw 0 0\n")  # another FUSE file system is copied like any folder
    exclude = own_folders([data, cache_dir, tmp_path / "missing"], mounts)
    assert len(exclude) == 3
    db = meta.connect(tmp_path / "meta.db")
    importer = Importer(db, CacheDir(tmp_path / "cache", 2**30), mounted=False, uploads_pending=lambda: False,
                        exclude=exclude)
    try:
        importer.put(home, meta.ROOT_INO)
    finally:
        importer.close()
    copied = {meta.path_of(db, node.ino) for node in meta.files(db)}
    assert copied == {"/home/docs/cv.txt"}
    assert len(importer.report.skipped) == 3
    assert all("Fincrypt's own folder" in line for line in importer.report.skipped)
    db.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 5000), max_size=40), st.integers(1, 12_000), st.integers(1, 6))
def test_small_files_are_gathered_into_packs_in_walk_order(sizes: list[int], pack_size: int,
                                                           max_files: int) -> None:
    """``put`` hands its uploads packs of files in the order the walk met them: each within ``pack_size``
    bytes (a single larger file alone) and ``max_files`` files, none empty, the last one at the walk's end."""
    import trio

    from fincryptfs.put import DirectFile, DirectUploads

    async def main() -> list[list[int]]:
        direct = DirectUploads(cast(ObjectStore, None), cast(sqlite3.Connection, None),
                               cast(CacheDir, None), lambda st: (0, 0), pack_size=pack_size,
                               pack_max_files=max_files)
        st_of = {size: os.stat_result((0o100644, 0, 0, 1, 0, 0, size, 0, 0, 0)) for size in sizes}

        def walk() -> None:
            for i, size in enumerate(sizes):
                direct.offer_small(DirectFile(Path(f"f{i}"), st_of[size], 1, b"f%d" % i, None))
            direct.end_of_walk()
            trio.from_thread.run_sync(direct._send.close)
        got: list[list[int]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, walk)
            async for item in direct._receive:
                assert isinstance(item, list)
                got.append([int(f.source.name[1:]) for f in item])
        return got

    packs = trio.run(main)
    assert [i for pack in packs for i in pack] == list(range(len(sizes)))
    for pack in packs:
        assert 1 <= len(pack) <= max_files
        assert len(pack) == 1 or sum(sizes[i] for i in pack) <= pack_size


async def test_put_waits_for_its_releases_and_says_what_is_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Not mounted, put returns once its queue released what the published snapshot no longer names, or after
    RELEASE_WAIT with the count of what is left (the next run releases it)."""
    db = meta.connect(tmp_path / "meta.db")
    reader = meta.connect_readonly(tmp_path / "meta.db")
    try:
        meta.queue_delete(db, "a" * 64)
        meta.queue_delete(db, "b" * 64)
        monkeypatch.setattr(putmod, "RELEASE_WAIT", 5.0)
        async with trio.open_nursery() as nursery:
            async def deleter() -> None:  # as the queue's deleter does, a little later
                await trio.sleep(0.2)
                for object_id in ("a" * 64, "b" * 64):
                    meta.finish_delete(db, object_id)
            nursery.start_soon(deleter)
            started = trio.current_time()
            await putmod._let_releases_run(reader)
            assert 0.2 <= trio.current_time() - started < 1.0
        assert capsys.readouterr().err == ""

        meta.queue_delete(db, "c" * 64)  # the mediator does not answer: nothing releases it
        monkeypatch.setattr(putmod, "RELEASE_WAIT", 0.2)
        await putmod._let_releases_run(reader)
        assert "1 object(s) the backup no longer uses are not released yet" in capsys.readouterr().err
    finally:
        reader.close()
        db.close()

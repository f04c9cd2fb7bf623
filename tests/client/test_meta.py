"""The local tree on a real SQLite file: job ordering, stale uploads, deletion after publishing, snapshots."""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs import meta


def obj(object_id_byte: str, size: int) -> str:
    return json.dumps({"object_id": object_id_byte * 64, "size": size})


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = meta.connect(tmp_path / "meta.db")
    yield conn
    conn.close()


def claim(db: sqlite3.Connection) -> meta.UploadJob:
    job = meta.next_upload(db, now=1e12)
    assert job is not None
    return job


def deletable(db: sqlite3.Connection) -> str | None:
    job = meta.next_delete(db, now=1e12)
    return None if job is None else job.object_id


def object_of(db: sqlite3.Connection, ino: int) -> str | None:
    value = meta.get(db, ino).object
    return None if value is None else str(json.loads(value)["object_id"])


def new_file(db: sqlite3.Connection, name: bytes = b"f", parent: int = meta.ROOT_INO) -> meta.Inode:
    return meta.create(db, parent, name, meta.FILE, 0o100644, 0, 0)


def test_release_records_job_and_upload_stores_object(db: sqlite3.Connection) -> None:
    f = new_file(db)
    version = meta.mark_dirty(db, f.ino)
    assert meta.record_release(db, f.ino, 10, 123) is not None
    assert meta.get(db, f.ino).state == meta.PENDING
    job = claim(db)
    assert job.version == version
    assert meta.next_upload(db, now=1e12) is None  # claimed
    assert meta.finish_upload(db, job, "a" * 64, obj("a", 10))
    stored = meta.get(db, f.ino)
    assert stored.state == meta.STORED and object_of(db, f.ino) == "a" * 64
    assert meta.pending_uploads(db) == []


def test_change_during_upload_makes_result_stale_and_deletes_it(db: sqlite3.Connection) -> None:
    f = new_file(db)
    meta.mark_dirty(db, f.ino)
    meta.record_release(db, f.ino, 10, 1)
    job = claim(db)
    meta.mark_dirty(db, f.ino)  # written again while uploading
    assert not meta.finish_upload(db, job, "b" * 64, obj("b", 10))
    assert meta.get(db, f.ino).object is None
    assert deletable(db) == "b" * 64  # never referenced: deleted at once
    meta.record_release(db, f.ino, 20, 2)
    job2 = claim(db)
    assert job2.version == job.version + 1


def test_old_object_deleted_only_after_publishing(db: sqlite3.Connection) -> None:
    f = new_file(db)
    for i, letter in enumerate("cd"):
        meta.mark_dirty(db, f.ino)
        meta.record_release(db, f.ino, 10 + i, i)
        job = claim(db)
        assert meta.finish_upload(db, job, letter * 64, obj(letter, 10 + i))
    assert deletable(db) is None  # 'c' is still in the published snapshot
    meta.set_published(db, meta.counter(db, "meta_version"), 1)
    assert deletable(db) == "c" * 64
    meta.finish_delete(db, "c" * 64)
    assert meta.pending_deletes(db) == 0


def test_newer_release_supersedes_pending_job(db: sqlite3.Connection) -> None:
    f = new_file(db)
    meta.mark_dirty(db, f.ino)
    meta.record_release(db, f.ino, 5, 1)
    meta.mark_dirty(db, f.ino)
    meta.record_release(db, f.ino, 6, 2)
    assert len(meta.pending_uploads(db)) == 1


def test_recover_resets_uploading_and_queues_unclosed_writes(db: sqlite3.Connection) -> None:
    a, b, gone = new_file(db, b"a"), new_file(db, b"b"), new_file(db, b"gone")
    meta.mark_dirty(db, a.ino)
    meta.record_release(db, a.ino, 5, 1)
    assert meta.next_upload(db, now=1e12) is not None
    meta.mark_dirty(db, b.ino)  # open for writing when the client died
    meta.unlink(db, meta.ROOT_INO, b"gone")
    assert meta.recover(db, {b.ino: 77}.get) == [gone.ino]  # its cache file is the caller's to remove
    assert meta.recover(db, {b.ino: 77}.get) == []
    pending = meta.pending_uploads(db)
    assert sorted(p[1] for p in pending) == [a.ino, b.ino]
    assert all(p[2] == "pending" for p in pending)
    assert meta.get(db, b.ino).size == 77
    assert meta.find(db, gone.ino) is None


def test_rename_rules(db: sqlite3.Connection) -> None:
    d = meta.create(db, meta.ROOT_INO, b"d", meta.DIR, 0o40755, 0, 0)
    sub = meta.create(db, d.ino, b"sub", meta.DIR, 0o40755, 0, 0)
    f = new_file(db, b"f")
    g = new_file(db, b"g")
    with pytest.raises(meta.InvalidMove):
        meta.rename(db, meta.ROOT_INO, b"d", sub.ino, b"x")
    with pytest.raises(meta.Exists):
        meta.rename(db, meta.ROOT_INO, b"f", meta.ROOT_INO, b"g", noreplace=True)
    with pytest.raises(IsADirectoryError):
        meta.rename(db, meta.ROOT_INO, b"f", meta.ROOT_INO, b"d")
    moved, replaced = meta.rename(db, meta.ROOT_INO, b"f", meta.ROOT_INO, b"g")
    assert moved.ino == f.ino and replaced is not None and replaced.ino == g.ino
    assert meta.lookup(db, meta.ROOT_INO, b"g").ino == f.ino
    assert meta.path_of(db, sub.ino) == "/d/sub"
    assert meta.path_of(db, g.ino) is None


def test_snapshot_holds_only_stored_state(db: sqlite3.Connection, tmp_path: Path) -> None:
    f = new_file(db, b"f")
    meta.mark_dirty(db, f.ino)
    meta.record_release(db, f.ino, 10, 1)
    job = claim(db)
    meta.finish_upload(db, job, "e" * 64, obj("e", 10))
    meta.mark_dirty(db, f.ino)
    meta.record_release(db, f.ino, 999, 2)  # newer version not uploaded yet
    new = new_file(db, b"new")
    meta.mark_dirty(db, new.ino)
    meta.record_release(db, new.ino, 50, 3)
    version = meta.snapshot_to(db, tmp_path / "snap.db")
    assert version == meta.counter(db, "meta_version")
    meta.adopt_snapshot(tmp_path / "snap.db", 7)
    copy = meta.connect(tmp_path / "snap.db")
    try:
        assert meta.pending_uploads(copy) == [] and meta.pending_deletes(copy) == 0
        restored = meta.lookup(copy, meta.ROOT_INO, b"f")
        assert (restored.state, restored.size, object_of(copy, restored.ino)) == ("stored", 10, "e" * 64)
        empty = meta.lookup(copy, meta.ROOT_INO, b"new")
        assert (empty.state, empty.size, empty.object) == ("stored", 0, None)
        assert meta.counter(copy, "published_version") == meta.counter(copy, "meta_version")
        assert meta.counter(copy, "pointer_version") == 7
    finally:
        copy.close()


def released(db: sqlite3.Connection, *names: bytes) -> list[meta.UploadJob]:
    """New files of 10 bytes, closed: their jobs claimed as one pack."""
    for name in names:
        f = new_file(db, name)
        meta.mark_dirty(db, f.ino)
        meta.record_release(db, f.ino, 10, 1)
    return meta.next_small_uploads(db, 1e12, max_size=100, max_bytes=1000, max_files=100)


def test_pack_members_reference_the_pack_until_the_last_one_dies(db: sqlite3.Connection) -> None:
    jobs = released(db, b"a", b"b", b"c")
    assert [j.size for j in jobs] == [10, 10, 10]
    assert meta.next_upload(db, 1e12) is None  # all claimed
    pack = "p" * 64
    assert meta.finish_pack(db, pack, obj("p", 30), [(j, 10 * i, 10) for i, j in enumerate(jobs)]) == 3
    a = meta.lookup(db, meta.ROOT_INO, b"a")
    assert a.state == meta.STORED and meta.pack_ref(a.object) == meta.PackRef(pack, 0, 10)
    assert meta.content_object_id(meta.lookup(db, meta.ROOT_INO, b"c").object or "") == pack
    assert {ref.pack_id for j in jobs if (ref := meta.pack_ref(meta.get(db, j.ino).object))} == {pack}
    assert meta.packs(db) == [(pack, 3)]
    meta.unlink(db, meta.ROOT_INO, b"a")
    b = meta.lookup(db, meta.ROOT_INO, b"b")
    meta.mark_dirty(db, b.ino)
    meta.record_release(db, b.ino, 0, 5)  # truncated to empty: no object, the pack reference is dropped
    assert meta.packs(db) == [(pack, 1)] and meta.pending_deletes(db) == 0
    c = new_file(db, b"other")
    meta.mark_dirty(db, c.ino)
    meta.record_release(db, c.ino, 5, 6)
    meta.rename(db, meta.ROOT_INO, b"other", meta.ROOT_INO, b"c")  # replaces the last member
    assert meta.packs(db) == [] and meta.pack_object(db, pack) is None
    assert deletable(db) is None  # the published snapshot still references the pack
    meta.set_published(db, meta.counter(db, "meta_version"), 1)
    assert deletable(db) == pack


def test_every_way_a_member_loses_its_range_notes_it_for_zeroing(db: sqlite3.Connection, tmp_path: Path) -> None:
    """Unlinked, replaced by a rename, emptied, a new version stored alone or in another pack, or replaced by
    ``put``: each notes the old range (and only pack members do) while the pack lives; a snapshot carries the
    ranges, so that a machine restored from it zeroes them in the copies it fetches; the pack's death drops
    them (its cached copy goes whole)."""
    jobs = released(db, b"a", b"b", b"c", b"d", b"e", b"f", b"g")
    pack = "p" * 64
    meta.finish_pack(db, pack, obj("p", 70), [(j, 10 * i, 10) for i, j in enumerate(jobs)])
    a, b, c, d, e, f, _ = (j.ino for j in jobs)
    meta.unlink(db, meta.ROOT_INO, b"a")
    other = new_file(db, b"other")
    meta.mark_dirty(db, other.ino)
    meta.record_release(db, other.ino, 5, 6)
    meta.finish_upload(db, claim(db), "o" * 64, obj("o", 5))  # an object of its own: nothing to note when it...
    meta.rename(db, meta.ROOT_INO, b"other", meta.ROOT_INO, b"b")  # ...replaces b, which is noted
    meta.mark_dirty(db, c)
    meta.record_release(db, c, 0, 5)
    for ino in (d, e):
        meta.mark_dirty(db, ino)
        meta.record_release(db, ino, 7, 5)
    meta.finish_upload(db, claim(db), "n" * 64, obj("n", 7))  # d alone (the oldest job first)...
    again = meta.next_small_uploads(db, 1e12, max_size=100, max_bytes=1000, max_files=100)
    assert [j.ino for j in again] == [e]
    meta.finish_pack(db, "q" * 64, obj("q", 7), [(again[0], 0, 7)])  # ...e in a new pack
    node = meta.get(db, f)
    new = meta.NewFile(b"f", 0o100644, 0, 0, 3, 1, 1)
    assert meta.add_stored_pack(db, "r" * 64, obj("r", 3), [meta.StoredMember(meta.ROOT_INO, node, new, 0, 3)])
    meta.unlink(db, meta.ROOT_INO, b"b")  # "other" under b's name: its own object, no pack range to note
    notes = meta.stale_members(db)
    assert [(ino, ref) for _, ino, ref in notes] == [
        (ino, meta.PackRef(pack, 10 * i, 10)) for i, ino in enumerate((a, b, c, d, e, f))]
    meta.snapshot_to(db, tmp_path / "snap.db")
    meta.adopt_snapshot(tmp_path / "snap.db", 1)
    copy = meta.connect(tmp_path / "snap.db")
    try:  # the restored machine has no copy to zero now, but zeroes every copy it fetches
        assert meta.stale_members(copy) == []
        assert meta.stale_ranges(copy, pack) == [(10 * i, 10) for i in range(6)]
    finally:
        copy.close()
    meta.mark_stale_zeroed(db, [rowid for rowid, _, _ in notes[:2]])
    assert [ino for _, ino, _ in meta.stale_members(db)] == [c, d, e, f]
    assert meta.stale_ranges(db, pack) == [(10 * i, 10) for i in range(6)]  # a later copy is zeroed whole
    meta.unlink(db, meta.ROOT_INO, b"g")  # the last member: the pack dies
    assert meta.stale_ranges(db, pack) == [] and meta.stale_members(db) == []


def test_pack_with_a_changed_member_and_an_all_stale_pack(db: sqlite3.Connection) -> None:
    jobs = released(db, b"a", b"b")
    meta.mark_dirty(db, jobs[1].ino)  # b is written again while the pack uploads
    assert meta.finish_pack(db, "q" * 64, obj("q", 20), [(jobs[0], 0, 10), (jobs[1], 10, 10)]) == 1
    assert meta.get(db, jobs[1].ino).object is None and meta.packs(db) == [("q" * 64, 1)]
    meta.record_release(db, jobs[1].ino, 10, 2)
    again = meta.next_small_uploads(db, 1e12, max_size=100, max_bytes=1000, max_files=100)
    assert [j.ino for j in again] == [jobs[1].ino]
    meta.unlink(db, meta.ROOT_INO, b"b")
    assert meta.finish_pack(db, "r" * 64, obj("r", 10), [(again[0], 0, 10)]) == 0
    assert deletable(db) == "r" * 64  # referenced by nothing, ever: deleted at once


def test_small_uploads_respect_size_bytes_and_count(db: sqlite3.Connection) -> None:
    for i, size in enumerate([40, 500, 40, 40, 40]):
        f = new_file(db, b"f%d" % i)
        meta.mark_dirty(db, f.ino)
        meta.record_release(db, f.ino, size, 1)
    first = meta.next_small_uploads(db, 1e12, max_size=100, max_bytes=90, max_files=10)
    assert [j.size for j in first] == [40, 40]  # the 500-byte file is not small; 90 bytes fit two
    second = meta.next_small_uploads(db, 1e12, max_size=100, max_bytes=1000, max_files=1)
    assert [j.size for j in second] == [40]
    big = meta.next_upload(db, 1e12)
    assert big is not None and big.size == 500


def test_snapshot_carries_packs(db: sqlite3.Connection, tmp_path: Path) -> None:
    jobs = released(db, b"a", b"b")
    meta.finish_pack(db, "s" * 64, obj("s", 20), [(jobs[0], 0, 10), (jobs[1], 10, 10)])
    meta.snapshot_to(db, tmp_path / "snap.db")
    meta.adopt_snapshot(tmp_path / "snap.db", 3)
    copy = meta.connect(tmp_path / "snap.db")
    try:
        assert meta.packs(copy) == [("s" * 64, 2)]
        b = meta.lookup(copy, meta.ROOT_INO, b"b")
        assert meta.pack_ref(b.object) == meta.PackRef("s" * 64, 10, 10) and b.size == 10
        assert json.loads(meta.pack_object(copy, "s" * 64) or "{}")["object_id"] == "s" * 64
    finally:
        copy.close()


def test_release_commits_attributes_set_while_open(db: sqlite3.Connection) -> None:
    f = new_file(db)
    meta.mark_dirty(db, f.ino)
    assert meta.record_release(db, f.ino, 7, 99, {"mode": 0o100600, "uid": 5, "atime_ns": 42}) is not None
    row = meta.get(db, f.ino)
    assert (row.mode, row.uid, row.gid, row.atime_ns, row.size, row.mtime_ns) == (0o100600, 5, 0, 42, 7, 99)
    with pytest.raises(ValueError):
        meta.record_release(db, f.ino, 7, 99, {"version": 1})


def test_resume_uploads_returns_claimed_jobs_to_pending(db: sqlite3.Connection) -> None:
    f = new_file(db)
    meta.mark_dirty(db, f.ino)
    meta.record_release(db, f.ino, 10, 1)
    job = claim(db)
    assert meta.next_upload(db, now=1e12) is None
    meta.resume_uploads(db)  # the worker that claimed it died; a new one starts
    again = claim(db)
    assert (again.id, again.attempts) == (job.id, job.attempts + 1)


def test_an_object_being_committed_is_deleted_unless_the_tree_records_it(db: sqlite3.Connection) -> None:
    """note_commit before the mediator's commit: recorded content drops the note; a failed or stopped upload
    (abandon_commit) and a worker that died in between (resume_uploads) leave a deletion that runs at once."""
    files = [new_file(db, name) for name in (b"ok", b"failed", b"killed")]
    jobs = []
    for f in files:
        meta.mark_dirty(db, f.ino)
        meta.record_release(db, f.ino, 10, 1)
        jobs.append(claim(db))
    for letter in "abc":
        meta.note_commit(db, letter * 64)
    assert deletable(db) is None and meta.pending_deletes(db) == 0  # in flight: neither runnable nor counted
    assert meta.finish_upload(db, jobs[0], "a" * 64, obj("a", 10))
    meta.abandon_commit(db, "b" * 64)
    assert deletable(db) == "b" * 64
    meta.finish_delete(db, "b" * 64)
    meta.abandon_commit(db, "a" * 64)  # after the content was recorded: nothing to abandon
    assert deletable(db) is None
    meta.resume_uploads(db)  # the worker that was committing "c" died; a new one starts
    assert deletable(db) == "c" * 64
    meta.finish_delete(db, "c" * 64)
    assert meta.pending_deletes(db) == 0 and object_of(db, files[0].ino) == "a" * 64


def test_a_pack_being_committed_is_deleted_unless_the_tree_records_it(db: sqlite3.Connection) -> None:
    f = new_file(db)
    meta.mark_dirty(db, f.ino)
    meta.record_release(db, f.ino, 10, 1)
    job = claim(db)
    meta.note_commit(db, "p" * 64)
    assert meta.finish_pack(db, "p" * 64, obj("p", 10), [(job, 0, 10)]) == 1
    meta.resume_uploads(db)
    assert deletable(db) is None and meta.pending_deletes(db) == 0


def test_files_recorded_as_already_stored(db: sqlite3.Connection) -> None:
    """put's large files: inserted stored (or replacing a file's content), their commit notes dropped."""
    new = meta.NewFile(b"big", 0o100644, 0, 0, 5, 1, 2)
    ino = meta.allocate_inos(db, 1)[0]
    meta.note_commit(db, "a" * 64)
    assert meta.add_stored_file(db, meta.ROOT_INO, ino, new, "a" * 64, obj("a", 5))
    assert not meta.add_stored_file(db, meta.ROOT_INO, ino + 1, new, "b" * 64, obj("b", 5))  # name taken
    f = meta.get(db, ino)
    assert (f.state, f.size, f.version, object_of(db, ino)) == (meta.STORED, 5, 1, "a" * 64)
    assert meta.pending_uploads(db) == [] and meta.pending_deletes(db) == 0
    meta.resume_uploads(db)
    assert deletable(db) is None  # the note went with the record

    meta.mark_dirty(db, ino)  # a version of it was being written: its job turns stale
    meta.record_release(db, ino, 9, 3)
    meta.note_commit(db, "c" * 64)
    assert meta.replace_with_stored(db, ino, meta.NewFile(b"big", 0o100600, 0, 0, 7, 4, 5), "c" * 64, obj("c", 7))
    f = meta.get(db, ino)
    assert (f.state, f.size, f.mode, f.mtime_ns, object_of(db, ino)) == (meta.STORED, 7, 0o100600, 5, "c" * 64)
    assert meta.pending_uploads(db) == []
    meta.set_published(db, meta.counter(db, "meta_version"), 1)
    assert deletable(db) == "a" * 64  # the replaced content, once a snapshot without it is out
    meta.unlink(db, meta.ROOT_INO, b"big")
    assert not meta.replace_with_stored(db, ino, new, "d" * 64, obj("d", 5))  # gone meanwhile


def test_an_unclaimed_job_is_as_if_never_claimed(db: sqlite3.Connection) -> None:
    f = new_file(db)
    meta.mark_dirty(db, f.ino)
    meta.record_release(db, f.ino, 10, 1)
    job = claim(db)
    meta.unclaim(db, job)
    again = claim(db)
    assert (again.id, again.attempts) == (job.id, job.attempts)


def test_an_upload_for_a_deleted_file_never_lands_on_a_new_file(db: sqlite3.Connection) -> None:
    """A file is deleted (and forgotten) while its upload is in flight, and a new file is created at once: the
    new file must not get the old number (SQLite would hand out max(ino) + 1 again, versions restart at 1),
    or the old upload would finish as the new file's content and the new file's own job be dropped."""
    old = new_file(db, b"x")
    meta.mark_dirty(db, old.ino)
    meta.record_release(db, old.ino, 10, 1)
    in_flight = claim(db)
    meta.unlink(db, meta.ROOT_INO, b"x")
    meta.purge(db, old.ino)
    new = meta.create(db, meta.ROOT_INO, b"x", meta.FILE, 0o100644, 0, 0, dirty=True)
    assert new.ino != old.ino
    meta.record_release(db, new.ino, 20, 2)
    assert not meta.finish_pack(db, "o" * 64, obj("o", 10), [(in_flight, 0, 10)])
    own = claim(db)
    assert own.ino == new.ino and meta.job_current(db, own)
    assert meta.finish_upload(db, own, "n" * 64, obj("n", 20)) and object_of(db, new.ino) == "n" * 64
    # numbers keep growing across a reopen, and a tree from before the counter starts above its highest
    db.execute("DELETE FROM counters WHERE name = 'last_ino'")
    newest = meta.create(db, meta.ROOT_INO, b"y", meta.FILE, 0o100644, 0, 0)
    assert newest.ino == new.ino + 1


def test_counting_subfolders_uses_an_index(db: sqlite3.Connection) -> None:
    """A folder's link count (2 + its subfolders) is asked after every change in it: with thousands of files in
    the folder it must not read them all."""
    plan = db.execute("EXPLAIN QUERY PLAN SELECT count(*) FROM inodes WHERE parent = ? AND kind = 'dir'",
                      (meta.ROOT_INO,)).fetchall()
    assert any("inodes_subdirs" in str(row) for row in plan), plan
    folder = meta.create(db, meta.ROOT_INO, b"d", meta.DIR, 0o40755, 0, 0)
    for i in range(5):
        new_file(db, f"f{i}".encode(), parent=folder.ino)
    meta.create(db, folder.ino, b"sub", meta.DIR, 0o40755, 0, 0)
    assert meta.subdir_count(db, folder.ino) == 1 and meta.subdir_count(db, meta.ROOT_INO) == 1


def test_added_files_match_what_create_and_release_leave(db: sqlite3.Connection) -> None:
    """``fincryptfs put``'s batch insert leaves the rows and jobs of create + write + close through the mount."""
    classic = meta.create(db, meta.ROOT_INO, b"classic", meta.FILE, 0o100640, 7, 8, dirty=True)
    meta.record_release(db, classic.ino, 42, 1_000, {"mode": 0o100640, "uid": 7, "gid": 8, "atime_ns": 900})
    with meta.batch(db):
        inos = meta.allocate_inos(db, 3)
        added = meta.add_files(db, meta.ROOT_INO, [
            (inos[0], meta.NewFile(b"batched", 0o100640, 7, 8, 42, 900, 1_000)),
            (inos[1], meta.NewFile(b"classic", 0o100600, 0, 0, 5, 1, 2)),  # the name is taken
            (inos[2], meta.NewFile(b"empty", 0o100600, 0, 0, 0, 1, 2)),
        ])
    assert added == [True, False, True]
    assert len(set(inos)) == 3 and classic.ino not in inos
    assert meta.allocate_inos(db, 1)[0] > max(inos)  # numbers are never handed out twice

    def shape(node: meta.Inode) -> tuple[object, ...]:
        return (node.kind, node.mode, node.uid, node.gid, node.size, node.atime_ns, node.mtime_ns, node.version,
                node.state, node.object)
    assert shape(meta.get(db, inos[0])) == shape(meta.get(db, classic.ino))
    empty = meta.get(db, inos[2])
    assert empty.state == meta.STORED and empty.size == 0
    assert meta.find(db, inos[1]) is None
    jobs = dict(db.execute("SELECT ino, version FROM upload_jobs WHERE state = 'pending'").fetchall())
    assert jobs == {classic.ino: 1, inos[0]: 1}  # no job for the empty file
    assert set(meta.child_map(db, meta.ROOT_INO)) == {b"classic", b"batched", b"empty"}


def test_a_batch_rolls_back_whole(db: sqlite3.Connection) -> None:
    before = meta.counter(db, "meta_version")
    with pytest.raises(RuntimeError):
        with meta.batch(db):
            inos = meta.allocate_inos(db, 2)
            meta.add_files(db, meta.ROOT_INO, [(inos[0], meta.NewFile(b"a", 0o100600, 0, 0, 1, 1, 1))])
            new_file(db, b"inner")  # joins the batch instead of committing on its own
            raise RuntimeError("crash before the commit")
    assert not db.in_transaction
    assert meta.child_map(db, meta.ROOT_INO) == {} and meta.counter(db, "meta_version") == before
    assert meta.pending_uploads(db) == []


def test_small_pending_counts_runnable_small_jobs_and_the_newest(db: sqlite3.Connection) -> None:
    assert meta.small_pending(db, 1e12, 100) == (0, 0.0)
    sizes = {b"big": 500, b"a": 10, b"b": 50}  # the large one first: the newest job is a small one
    for name, size in sizes.items():
        f = new_file(db, name)
        meta.mark_dirty(db, f.ino)
        meta.record_release(db, f.ino, size, 1)
    pending, newest = meta.small_pending(db, 1e12, 100)
    assert pending == 60 and newest == max(created for (created,) in db.execute("SELECT created FROM upload_jobs"))
    claim(db)  # the oldest, "big", uploading now
    job = claim(db)  # "a"
    assert meta.small_pending(db, 1e12, 100)[0] == 50
    meta.fail_upload(db, job, "later", 2e12)  # backed off: not runnable yet
    assert meta.small_pending(db, 1e12, 100)[0] == 50 and meta.small_pending(db, 3e12, 100)[0] == 60


def test_a_tree_from_before_the_zeroed_mark_gets_the_column(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "meta.db")
    old.execute("CREATE TABLE stale_members (ino INTEGER NOT NULL, pack_id TEXT NOT NULL, offset INTEGER NOT NULL, "
                "size INTEGER NOT NULL)")
    old.execute("INSERT INTO stale_members VALUES (5, 'ab', 0, 10)")
    old.commit()
    old.close()
    db = meta.connect(tmp_path / "meta.db")
    try:
        assert [(ino, ref) for _, ino, ref in meta.stale_members(db)] == [(5, meta.PackRef("ab", 0, 10))]
    finally:
        db.close()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.binary(min_size=1, max_size=6).filter(lambda b: b"/" not in b),
                          st.booleans()), max_size=40),
       st.lists(st.integers(0, 40), max_size=5))
def test_paths_are_named_from_the_folders_up(tmp_path_factory: pytest.TempPathFactory,
                                             entries: list[tuple[int, bytes, bool]], unlinks: list[int]) -> None:
    """Any tree of folders and files, some unlinked (folders too: what is below them has no path either):
    ``PathNamer`` and ``path_of`` give the path the tree was built with."""
    db = meta.connect(tmp_path_factory.mktemp("names") / "meta.db")
    try:
        folders = [meta.ROOT_INO]
        made: list[meta.Inode] = []
        parents: dict[int, int] = {}
        names: dict[int, str] = {}
        for parent, name, is_dir in entries:
            folder = folders[parent % len(folders)]
            try:
                node = meta.create(db, folder, name, meta.DIR if is_dir else meta.FILE,
                                   0o40755 if is_dir else 0o100644, 0, 0)
            except meta.Exists:
                continue
            made.append(node)
            parents[node.ino], names[node.ino] = folder, name.decode("utf-8", "surrogateescape")
            if is_dir:
                folders.append(node.ino)
        gone = {made[index % len(made)].ino for index in unlinks if made}
        for ino in gone:
            db.execute("UPDATE inodes SET parent = NULL, name = NULL WHERE ino = ?", (ino,))

        def expected(ino: int) -> str | None:
            parts = []
            while ino != meta.ROOT_INO:
                if ino in gone:
                    return None
                parts.append(names[ino])
                ino = parents[ino]
            return "/" + "/".join(reversed(parts))
        namer = meta.PathNamer(db)
        assert namer.of(meta.get(db, meta.ROOT_INO)) == meta.path_of(db, meta.ROOT_INO) == "/"
        for node in made:
            assert namer.of(meta.get(db, node.ino)) == meta.path_of(db, node.ino) == expected(node.ino)
    finally:
        db.close()


def test_a_folder_is_listed_page_by_page_through_an_index(db: sqlite3.Connection) -> None:
    folder = meta.create(db, meta.ROOT_INO, b"big", meta.DIR, 0o40755, 0, 0)
    with meta.batch(db):
        made = [meta.create(db, folder.ino, b"f%04d" % i, meta.FILE, 0o100644, 0, 0).ino for i in range(2500)]
    listed, after = [], 0
    while page := meta.children(db, folder.ino, after):
        listed += [c.ino for c in page]
        after = page[-1].ino
    assert listed == made
    plan = " ".join(str(row) for row in db.execute(
        "EXPLAIN QUERY PLAN SELECT * FROM inodes WHERE parent = ? AND ino > ? ORDER BY ino LIMIT 1000", (2, 0)))
    assert "inodes_parent" in plan and "TEMP B-TREE" not in plan  # a range of the index, no sort of the folder


def test_a_publish_problem_is_kept_for_flush_and_status_but_never_published(db: sqlite3.Connection,
                                                                            tmp_path: Path) -> None:
    assert meta.publish_problem(db) is None
    meta.set_publish_problem(db, "the mediator is unreachable", blocked=False)
    meta.set_publish_problem(db, "published from another machine", blocked=True)
    problem = meta.publish_problem(db)
    assert problem is not None and problem.blocked and problem.message == "published from another machine"
    meta.snapshot_to(db, tmp_path / "snap.db")
    assert meta.publish_problem(meta.connect_readonly(tmp_path / "snap.db")) is None
    meta.clear_publish_problem(db)
    assert meta.publish_problem(db) is None
    meta.set_published(db, 0, 5)
    meta.pointer_seen(db, 7)
    meta.pointer_seen(db, 6)  # never backwards
    assert meta.counter(db, "pointer_version") == 7


_names = st.binary(min_size=1, max_size=meta.NAME_MAX).filter(lambda n: b"/" not in n and b"\0" not in n
                                                               and n not in (b".", b".."))
_times = st.integers(-2**63, 2**63 - 1)
_ids = st.integers(0, 2**32 - 2)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_names, st.sampled_from([meta.FILE, meta.DIR, meta.SYMLINK]), st.integers(0, 0o7777),
                          _ids, _ids, _times, _times, st.binary(min_size=1, max_size=4095)), max_size=12,
                unique_by=lambda entry: entry[0]))
def test_a_restored_tree_has_every_name_mode_owner_time_and_target(
        entries: list[tuple[bytes, str, int, int, int, int, int, bytes]]) -> None:
    """Whatever the names (any bytes but '/' and NUL, up to 255), modes (setuid, sticky, 000), owners, times
    (nanoseconds over the whole range the tree holds) and link targets: the snapshot, compressed, fetched and
    adopted, gives back each entry as the tree had it."""
    from fincryptfs.manifest import compress_snapshot, decompress_snapshot

    kinds = {meta.FILE: 0o100000, meta.DIR: 0o040000, meta.SYMLINK: 0o120000}
    with tempfile.TemporaryDirectory() as tmp:
        db = meta.connect(Path(tmp) / "meta.db")
        folder = meta.create(db, meta.ROOT_INO, b"sub", meta.DIR, 0o40755, 0, 0)
        for i, (name, kind, mode, uid, gid, atime, mtime, target) in enumerate(entries):
            node = meta.create(db, folder.ino if i % 2 else meta.ROOT_INO, name, kind, kinds[kind] | mode, uid, gid,
                               target if kind == meta.SYMLINK else None)
            meta.set_attrs(db, node.ino, atime_ns=atime, mtime_ns=mtime)
        if entries and entries[0][1] == meta.FILE:  # one with content
            first = meta.lookup(db, meta.ROOT_INO, entries[0][0])
            meta.mark_dirty(db, first.ino)
            meta.record_release(db, first.ino, 10, entries[0][6])
            meta.finish_upload(db, claim(db), "e" * 64, obj("e", 10))
        before = {node.ino: node for node in _all_inodes(db)}
        meta.snapshot_to(db, Path(tmp) / "snap.db")
        db.close()
        compress_snapshot(Path(tmp) / "snap.db", Path(tmp) / "snap.z")
        decompress_snapshot(Path(tmp) / "snap.z", Path(tmp) / "fetched.db")
        meta.adopt_snapshot(Path(tmp) / "fetched.db", 1)
        copy = meta.connect(Path(tmp) / "fetched.db")
        try:
            assert {node.ino: node for node in _all_inodes(copy)} == before
        finally:
            copy.close()


def _all_inodes(db: sqlite3.Connection) -> list[meta.Inode]:
    return [meta.get(db, row[0]) for row in db.execute("SELECT ino FROM inodes ORDER BY ino")]

"""Snapshot publish/fetch through the signed, versioned pointer, against a real mediator and nodes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import trio
from clientdata_support import open_store
from hypothesis import given, settings
from hypothesis import strategies as st
from netfixtures import start_network

from fincryptfs.core.crypto import new_master_key
from fincryptfs.core.errors import IntegrityError
from fincryptfs.core.ids import ObjectId
from fincryptfs.core.messages import ManifestPointer
from fincryptfs.core.padding import padded_length
from fincryptfs.manifest import (
    SNAPSHOT_MAGIC,
    SNAPSHOT_MIN_BUCKET,
    SnapshotRollbackError,
    TreeDivergedError,
    check_pointer_version,
    compress_snapshot,
    current_pointer,
    decompress_snapshot,
    fetch_latest_snapshot,
    publish_snapshot,
    seal_stored_object,
    unseal_stored_object,
)
from fincryptfs.objectstore import ObjectStore
from fincryptfs.rpc import PeerError


async def _published_pointer(store: ObjectStore) -> ManifestPointer:
    """The account's pointer, which these tests have published before asking for it."""
    pointer = await current_pointer(store)
    assert pointer is not None, "a snapshot was published, so the mediator must hold a pointer"
    return pointer


async def test_snapshot_round_trip_versions_and_cas(tmp_path: Path, nursery: trio.Nursery) -> None:
    net = await start_network(tmp_path, nursery, nodes=6)
    master = new_master_key()
    snap = tmp_path / "snap.sqlite3"
    async with open_store(net.mediator_url, tmp_path, master_key=master) as store, \
            open_store(net.mediator_url, tmp_path, master_key=master) as other_machine:
        assert await fetch_latest_snapshot(store, master, tmp_path / "none") is None
        first = os.urandom(70_000)
        snap.write_bytes(first)
        assert await publish_snapshot(store, master, snap, 0) == 1
        assert await fetch_latest_snapshot(other_machine, master, tmp_path / "got1") == 1
        assert (tmp_path / "got1").read_bytes() == first
        old_object = (await _published_pointer(store)).object_id

        second = os.urandom(5000)
        snap.write_bytes(second)
        assert await publish_snapshot(other_machine, master, snap, 1) == 2
        assert await fetch_latest_snapshot(store, master, tmp_path / "got2") == 2
        assert (tmp_path / "got2").read_bytes() == second
        with pytest.raises(PeerError) as gone:
            await store.health(old_object)
        assert gone.value.status == 404, "the replaced snapshot object must be deleted"

        # a stale compare-and-swap is refused by the mediator
        pointer = await _published_pointer(store)
        stale = ManifestPointer(pointer.account_id, 2, pointer.object_id, pointer.sealed, pointer.created_at)
        with pytest.raises(PeerError) as conflict:
            await store.mediator.put_pointer(stale.seal(store.account_key))
        assert conflict.value.status == 409

        # two machines publishing on top of the same version: one wins, the other stops and replaces nothing
        contents = {}
        results: dict[str, int | Exception] = {}

        async def publish(name: str, who) -> None:
            path = tmp_path / f"snap-{name}"
            contents[name] = os.urandom(30_000)
            path.write_bytes(contents[name])
            try:
                results[name] = await publish_snapshot(who, master, path, 2)
            except TreeDivergedError as exc:
                results[name] = exc

        async with trio.open_nursery() as race:
            race.start_soon(publish, "a", store)
            race.start_soon(publish, "b", other_machine)
        winner = next(name for name, got in results.items() if got == 3)
        loser = "b" if winner == "a" else "a"
        assert isinstance(results[loser], TreeDivergedError) and "another machine" in str(results[loser])
        assert await fetch_latest_snapshot(store, master, tmp_path / "got3") == 3
        assert (tmp_path / "got3").read_bytes() == contents[winner]
        assert (await store.account())["objects"] == 1, "only the latest snapshot object is kept"

        # a machine that missed a publish stops before sending anything: the other's tree stays whole
        with pytest.raises(TreeDivergedError, match="pointer version 3; this machine's last is 2"):
            await publish_snapshot(store, master, snap, 2)
        assert (await store.account())["objects"] == 1
        assert await fetch_latest_snapshot(other_machine, master, tmp_path / "still3") == 3
        assert (tmp_path / "still3").read_bytes() == contents[winner]

        # a mediator offering an older pointer than this client has seen is refused
        with pytest.raises(SnapshotRollbackError):
            await publish_snapshot(store, master, snap, 9)

        # the sealed object opens only with the master key and only for its own version
        stored = unseal_stored_object(master, await _published_pointer(store))
        with pytest.raises(IntegrityError):
            unseal_stored_object(new_master_key(), await _published_pointer(store))
        moved = ManifestPointer(pointer.account_id, 5, ObjectId(stored.object_id),
                                seal_stored_object(master, pointer.account_id, 4, stored), 0)
        with pytest.raises(IntegrityError):
            unseal_stored_object(master, moved)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=5000), st.integers(0, 3 * 2**20))
def test_snapshot_compression_round_trips(head: bytes, zeros: int) -> None:
    """Any content (a compressible run of zeros past the 1 MiB chunk included) comes back byte for byte."""
    content = head + bytes(zeros)
    with tempfile.TemporaryDirectory() as tmp:
        src, packed, out = Path(tmp) / "db", Path(tmp) / "db.z", Path(tmp) / "out"
        src.write_bytes(content)
        compress_snapshot(src, packed)
        assert packed.read_bytes().startswith(SNAPSHOT_MAGIC)
        decompress_snapshot(packed, out)
        assert out.read_bytes() == content
        # as an object, it is padded to a power of two of at least SNAPSHOT_MIN_BUCKET
        padded = padded_length(packed.stat().st_size)
        assert padded >= SNAPSHOT_MIN_BUCKET and padded & (padded - 1) == 0


def test_snapshot_compression_shrinks_a_tree_and_catches_damage(tmp_path: Path) -> None:
    from fincryptfs import meta

    db = meta.connect(tmp_path / "meta.db")
    for i in range(500):
        meta.create(db, meta.ROOT_INO, f"holiday photo {i:04d}.jpg".encode(), meta.FILE, 0o100644, 0, 0)
    meta.snapshot_to(db, tmp_path / "snap.db")
    db.close()
    compress_snapshot(tmp_path / "snap.db", tmp_path / "snap.z")
    packed = (tmp_path / "snap.z").read_bytes()
    padding = packed.index(bytes(64))  # the zeros after the stream (its own bytes are not 64 zeros in a row)
    assert padding * 3 < (tmp_path / "snap.db").stat().st_size
    # published before compression: used as it is
    decompress_snapshot(tmp_path / "snap.db", tmp_path / "legacy")
    assert (tmp_path / "legacy").read_bytes() == (tmp_path / "snap.db").read_bytes()
    for bad in (packed[:padding // 2], packed + b"junk", packed[:40] + bytes(40) + packed[80:],
                packed[:-1] + b"\x01"):
        (tmp_path / "bad.z").write_bytes(bad)
        with pytest.raises(IntegrityError, match="snapshot"):
            decompress_snapshot(tmp_path / "bad.z", tmp_path / "out")


def test_the_snapshot_size_does_not_count_the_tree_entries(tmp_path: Path) -> None:
    """The mediator knows which object is the snapshot (the pointer names it): its padded size must not tell
    1,000 files from 1,050 (Padmé alone did: 30,720 and 31,744 bytes), only trees a factor of two apart."""
    from fincryptfs import meta

    db = meta.connect(tmp_path / "meta.db")
    sizes = {}
    for count in range(2000):
        meta.create(db, meta.ROOT_INO, f"file {count:05d}.txt".encode(), meta.FILE, 0o100644, 0, 0)
        if count + 1 in (1000, 1050, 1900):
            (tmp_path / "snap.db").unlink(missing_ok=True)
            meta.snapshot_to(db, tmp_path / "snap.db")
            compress_snapshot(tmp_path / "snap.db", tmp_path / "snap.z")
            sizes[count + 1] = padded_length((tmp_path / "snap.z").stat().st_size)
    db.close()
    assert sizes[1000] == sizes[1050] == sizes[1900]


@given(st.integers(0, 2**40), st.integers(0, 2**40))
def test_a_publish_goes_on_top_of_the_pointer_last_seen_only(current: int, seen: int) -> None:
    if current == seen:
        check_pointer_version(current, seen)
    else:
        with pytest.raises(SnapshotRollbackError if current < seen else TreeDivergedError):
            check_pointer_version(current, seen)


def test_pointer_seal_is_as_docs_format_md_states() -> None:
    """The pointer's ``sealed`` opens with the key and associated data docs/format.md spells out."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from fincryptfs.core.crypto import derive_key
    from fincryptfs.core.layout import ObjectLayout
    from fincryptfs.core.wire import canonical_json
    from fincryptfs.objectstore import ShareRef, StoredObject

    master, account, version = new_master_key(), "ab" * 32, 7
    stored = StoredObject("cd" * 32, bytes(range(32)), 100, ObjectLayout(4096, 4096, 2, 4),
                          (ShareRef(0, "ef" * 32, bytes(32)),))  # type: ignore[arg-type]
    sealed = seal_stored_object(master, account, version, stored)
    ad = (b"fincrypt-manifest-pointer-v1\x00" + bytes.fromhex(account) + version.to_bytes(8, "big")
          + bytes.fromhex(stored.object_id))
    plain = AESGCM(derive_key(master, "manifest-pointer-v1")).decrypt(sealed[:12], sealed[12:], ad)
    assert plain == canonical_json(stored.to_json())


def test_trailing_bytes_after_a_stream_ending_on_a_read_boundary_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The zlib stream may end exactly where one read ends (nothing left over in the decompressor): what follows
    must still be checked to be the zeros that pad it."""
    import zlib

    from fincryptfs import manifest

    stream = zlib.compress(b"a tree" * 1000, 1)
    monkeypatch.setattr(manifest, "_CHUNK", len(stream))  # the first read after the magic is the whole stream
    (tmp_path / "bad.z").write_bytes(SNAPSHOT_MAGIC + stream + bytes(100) + b"junk" + bytes(100))
    with pytest.raises(IntegrityError, match="trailing bytes"):
        decompress_snapshot(tmp_path / "bad.z", tmp_path / "out")
    (tmp_path / "good.z").write_bytes(SNAPSHOT_MAGIC + stream + bytes(3 * len(stream) + 5))
    decompress_snapshot(tmp_path / "good.z", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"a tree" * 1000

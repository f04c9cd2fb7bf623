"""Data-path parts that need no network: run planning, StoredObject codec, encoding a file into shares."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fincryptfs import downloader
from fincryptfs.core.errors import IntegrityError, RemoteProtocolError
from fincryptfs.core.ids import NodeId, ShareId
from fincryptfs.core.merkle import LEAF_SIZE, MerkleTree, RootBuilder
from fincryptfs.core.objectcodec import decode_segment_plaintext, plan_object, segment_plaintext
from fincryptfs.downloader import MAX_RUN_SHARE_BYTES, plan_runs, sources_for
from fincryptfs.mediator_client import ObjectInfo, ShareLocation
from fincryptfs.objectstore import FileChangedError, ShareRef, StoredObject
from fincryptfs.uploader import FileReader, MembersReader, SealedDigests, Source


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 40 * 2**20), st.sampled_from([4096, 65536, 2**20, 3 * 2**20 + 5]), st.data())
def test_plan_runs_cover_segments_within_bound(size: int, segment_size: int, data: st.DataObject) -> None:
    layout = plan_object(size, segment_size, 3, 6)
    first = data.draw(st.integers(0, layout.segment_count - 1))
    last = data.draw(st.integers(first, layout.segment_count - 1))
    ramp = data.draw(st.booleans())
    runs = plan_runs(layout, range(first, last + 1), ramp=ramp)
    assert [s for r in runs for s in r.segments] == list(range(first, last + 1))
    for run in runs:
        begin = layout.block_offset(run.segments[0])
        end = layout.block_offset(run.segments[-1]) + layout.block_length(run.segments[-1])
        assert run.share_start <= begin and end <= (run.first_leaf + run.leaf_count) * LEAF_SIZE
        assert (run.first_leaf + run.leaf_count - 1) * LEAF_SIZE < layout.share_size
        if len(run.segments) > 1:
            assert run.leaf_count * LEAF_SIZE <= MAX_RUN_SHARE_BYTES + 2 * LEAF_SIZE
    # ramped, the first bytes come after one segment and runs double up to the bound; otherwise every run is as
    # long as the bound allows (only the last may be shorter)
    per_run = max(1, MAX_RUN_SHARE_BYTES // layout.block_length(0))
    sizes = [min(2**i if ramp else per_run, per_run) for i in range(len(runs) - 1)]
    assert [len(r.segments) for r in runs[:-1]] == sizes
    assert len(runs[0].segments) == 1 or not ramp


def test_stored_object_json_round_trip_and_strictness() -> None:
    layout = plan_object(12345, 4096, 3, 6)
    obj = StoredObject("ab" * 32, os.urandom(32), 12345, layout,
                       tuple(ShareRef(i, f"{i:02x}" * 32, os.urandom(32)) for i in range(5)))
    assert StoredObject.from_json(obj.to_json()) == obj
    bad = obj.to_json() | {"extra": 1}
    with pytest.raises(RemoteProtocolError):
        StoredObject.from_json(bad)
    dup = obj.to_json()
    dup["shares"] = [dup["shares"][0], dup["shares"][0]]
    with pytest.raises(RemoteProtocolError):
        StoredObject.from_json(dup)
    with pytest.raises(RemoteProtocolError):
        StoredObject.from_json(obj.to_json() | {"file_key": "AAAA"})


def test_sources_are_the_located_shares_whose_root_is_recorded_healthy_first() -> None:
    """An object committed with 5 of 6 shares names all 6 roots; once the mediator has rebuilt the sixth (and
    lost three others), a reader uses it. A record written before every root was kept (5 refs) still reads,
    with the shares it names."""
    layout = plan_object(5000, 4096, 3, 6)
    roots = [os.urandom(32) for _ in range(6)]
    share_ids = [f"{i:02x}" * 32 for i in range(6)]
    states = ["lost", "lost", "lost", "stored", "placed", "stored"]  # 5: rebuilt by repair; 4: never stored
    info = ObjectInfo("ab" * 32, layout, tuple(
        ShareLocation(i, ShareId(share_ids[i]), NodeId("cd" * 32), f"http://n{i}:1", roots[i], layout.share_size, state)
        for i, state in enumerate(states)), {})
    new = StoredObject("ab" * 32, os.urandom(32), 5000, layout,
                       tuple(ShareRef(i, share_ids[i], roots[i]) for i in range(6)))
    old = StoredObject.from_json(new.to_json() | {"shares": [ref.to_json() for ref in new.shares[:5]]})
    assert StoredObject.from_json(new.to_json()) == new
    assert [(s.index, s.merkle_root) for s in sources_for(new, info)] == [
        (i, roots[i]) for i in (3, 5, 4, 0, 1, 2)]
    assert [s.index for s in sources_for(old, info)] == [3, 4, 0, 1, 2]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 9 * 4096), st.sampled_from([4096, 3 * 4096 + 16]), st.sampled_from([(1, 2), (3, 6), (4, 7)]))
def test_source_encodes_the_same_shares_on_every_pass(size: int, segment_size: int, kn: tuple[int, int]) -> None:
    """A retry re-encodes the file to resend a share whose node failed: every pass must give the same bytes,
    the hashed pass's roots must be the shares' roots, and any k shares decode back to the file."""
    k, n = kn
    content = os.urandom(size)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.write_bytes(content)
        source = Source.open(src, segment_size=segment_size, k=k, n=n)
        try:
            builders = [RootBuilder() for _ in range(n)]
            shares = [bytearray() for _ in range(n)]
            for index in range(source.layout.segment_count):
                blocks, hashes = source.encode(index, hashed=True)
                assert hashes is not None
                again, none = source.encode(index, hashed=False)
                assert none is None and [bytes(b) for b in again] == [bytes(b) for b in blocks]
                for share, builder, block, chunk in zip(shares, builders, blocks, hashes, strict=True):
                    share += block
                    builder.update_hashed(chunk)
            source.check_unchanged()
        finally:
            source.close()
    layout = source.layout
    for share, builder in zip(shares, builders, strict=True):
        assert len(share) == layout.share_size
        assert builder.finish() == MerkleTree.from_data(bytes(share)).root
    chosen = list(range(n))[-k:]
    out = b""
    for index in range(layout.segment_count):
        off, length = layout.block_offset(index), layout.block_length(index)
        out += decode_segment_plaintext(source.file_key, source.object_id, layout, index,
                                        {i: bytes(shares[i][off:off + length]) for i in chosen})
    assert out[:size] == content
    assert len(set(source.share_ids)) == n


def test_source_notices_a_changed_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * 4096))
    source = Source.open(src, segment_size=4096, k=3, n=6)
    try:
        os.truncate(src, 4096)
        with pytest.raises(FileChangedError, match="changed while"):
            source.encode(2, hashed=True)  # its bytes are gone
        with pytest.raises(FileChangedError, match="changed while"):
            source.check_unchanged()
    finally:
        source.close()


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=5000), st.binary(max_size=5000))
def test_sealed_digests_admit_a_segment_again_only_with_its_first_plaintext(first: bytes, other: bytes) -> None:
    digests = SealedDigests.for_segments(3)
    assert digests.admit(1, first)
    assert digests.admit(1, first)
    assert digests.admit(1, other) == (other == first)
    assert digests.admit(0, other) and digests.admit(2, first)  # segments are independent


def test_a_segment_rewritten_in_place_is_not_sealed_again(tmp_path: Path) -> None:
    """A later pass re-seals each segment under the key and nonce it was first sealed with: if the bytes it
    reads differ (a same-size rewrite that size and mtime do not show, a pack member rewritten), it must
    refuse before sealing, or two ciphertexts under one (key, nonce) would leave the process."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * 4096))
    mtime = src.stat().st_mtime_ns
    member = tmp_path / "member"
    member.write_bytes(os.urandom(5000))
    for source in (Source.open(src, segment_size=4096, k=3, n=6),
                   Source.of(MembersReader([(src, 3 * 4096), (member, 5000)]), segment_size=4096, k=3, n=6)):
        try:
            first = [[bytes(b) for b in source.encode(i, hashed=True)[0]] for i in range(3)]
            with open(src, "r+b") as f:
                f.seek(4096 + 10)
                f.write(b"rewritten")
            os.utime(src, ns=(mtime, mtime))
            source.check_unchanged()  # size and mtime say nothing
            assert [bytes(b) for b in source.encode(0, hashed=False)[0]] == first[0]
            with pytest.raises(FileChangedError, match=f"{src}.* changed while") as caught:
                source.encode(1, hashed=False)
            assert str(member) not in str(caught.value)
            assert [bytes(b) for b in source.encode(2, hashed=False)[0]] == first[2]
            with pytest.raises(FileChangedError):  # and never later either
                source.encode(1, hashed=True)
        finally:
            source.close()
        src.write_bytes(os.urandom(3 * 4096))  # a fresh file for the next source
        mtime = src.stat().st_mtime_ns


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 3000), min_size=1, max_size=12), st.data())
def test_members_read_as_their_concatenation(sizes: list[int], data: st.DataObject) -> None:
    """A pack is read straight from its members' files: any range reads as the concatenation would, each
    member at the placement it is recorded with, and an intact member is never called damaged."""
    with tempfile.TemporaryDirectory() as tmp:
        contents = [os.urandom(size) for size in sizes]
        paths = []
        for i, content in enumerate(contents):
            path = Path(tmp) / f"m{i}"
            path.write_bytes(content)
            paths.append(path)
        reader = MembersReader(list(zip(paths, sizes, strict=True)))
        whole = b"".join(contents)
        assert reader.size == len(whole)
        at = data.draw(st.integers(0, len(whole)))
        length = data.draw(st.integers(0, len(whole) - at + 10))
        assert reader.read(at, length) == whole[at:at + length]
        for i, content in enumerate(contents):
            offset, size = reader.placement(i)
            assert whole[offset:offset + size] == content
        assert reader.damaged == set()


def test_members_missing_or_short_read_as_zeros_and_are_damaged(tmp_path: Path) -> None:
    """A member deleted or cut short after it was claimed must not make the pack fail or shift the others:
    its range reads as zeros and it is listed as damaged (never referenced); a longer file is read only for
    its recorded size."""
    sizes = [100, 200, 300, 400]
    contents = [os.urandom(size) for size in sizes]
    paths = [tmp_path / f"m{i}" for i in range(4)]
    for path, content in zip(paths, contents, strict=True):
        path.write_bytes(content)
    paths[1].unlink()
    os.truncate(paths[2], 50)
    paths[3].write_bytes(contents[3] + b"appended")
    reader = MembersReader(list(zip(paths, sizes, strict=True)))
    data = reader.read(0, reader.size)
    assert data == contents[0] + bytes(200) + contents[2][:50] + bytes(250) + contents[3]
    assert reader.damaged == {1, 2}


def test_a_pack_encodes_into_shares_that_decode_to_its_members(tmp_path: Path) -> None:
    sizes = [5000, 0, 70_000, 1]
    contents = [os.urandom(size) for size in sizes]
    paths = [tmp_path / f"m{i}" for i in range(len(sizes))]
    for path, content in zip(paths, contents, strict=True):
        path.write_bytes(content)
    source = Source.of(MembersReader(list(zip(paths, sizes, strict=True))), segment_size=16384, k=3, n=6)
    layout = source.layout
    shares = [bytearray() for _ in range(6)]
    for index in range(layout.segment_count):
        blocks, _ = source.encode(index, hashed=False)
        for share, block in zip(shares, blocks, strict=True):
            share += block
    out = b""
    for index in range(layout.segment_count):
        off, length = layout.block_offset(index), layout.block_length(index)
        out += decode_segment_plaintext(source.file_key, source.object_id, layout, index,
                                        {i: bytes(shares[i][off:off + length]) for i in (1, 3, 5)})
    assert out[:source.size] == b"".join(contents)


def test_a_member_replaced_by_a_fifo_or_a_link_is_damaged_not_waited_for(tmp_path: Path) -> None:
    """put reads sources by name after its walk saw them: a FIFO put in a file's place must not block the
    upload, and a symbolic link must not be followed (its target is not what the walk saw)."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 300)
    paths = [tmp_path / "a", tmp_path / "fifo", tmp_path / "link", tmp_path / "b"]
    paths[0].write_bytes(b"a" * 100)
    os.mkfifo(paths[1])
    paths[2].symlink_to(secret)
    paths[3].write_bytes(b"b" * 100)
    reader = MembersReader([(p, 100) for p in paths])
    assert reader.read(0, reader.size) == b"a" * 100 + bytes(200) + b"b" * 100
    assert reader.damaged == {1, 2}
    with pytest.raises(OSError):
        FileReader(paths[2])


async def test_a_bad_copy_of_a_share_does_not_hide_a_good_copy_of_the_same_index() -> None:
    """The mediator can locate one share index twice (a copy a node damaged, and the one repair rebuilt on
    another node): once the damaged copy fails verification, the rebuilt one must still be read."""
    layout = plan_object(5000, 4096, 3, 6)
    obj = StoredObject("ab" * 32, os.urandom(32), 5000, layout,
                       tuple(ShareRef(i, f"{i:02x}" * 32, os.urandom(32)) for i in range(6)))
    damaged, rebuilt, one, two = (
        downloader.Source(index, f"{index:02x}" * 32, node * 32, f"http://{node}:1", os.urandom(32))
        for index, node in ((0, "a1"), (0, "b2"), (1, "c3"), (2, "d4")))
    reported: list[str] = []

    async def report(object_id: str, share_id: str, node_id: str, problem: str) -> None:
        reported.append(node_id)

    store: Any = SimpleNamespace(hedge_after=2.0, mediator=SimpleNamespace(report=report))
    reader = downloader.ObjectReader(store, obj, [damaged, rebuilt, one, two])

    async def fetch_verified(source: downloader.Source, run: downloader.Run) -> bytearray:
        if source is damaged:
            raise IntegrityError(f"{source.describe()} sent bytes that do not match the share's root")
        return bytearray(source.node_id.encode())

    reader.fetch_verified = fetch_verified  # type: ignore[method-assign]  # the nodes' answers, without nodes
    got = await reader.fetch_run(plan_runs(layout, range(layout.segment_count), MAX_RUN_SHARE_BYTES)[0])
    assert sorted(got) == [0, 1, 2] and got[0] == bytearray(rebuilt.node_id.encode())
    assert reported == [damaged.node_id] and reader.bad == {damaged}


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**20), st.sampled_from([4096, 8192, 65536]))
@example(2**18 + 1, 4096)  # padded to 270,336 bytes: its last segment holds padding only
def test_a_whole_file_fetch_reads_the_padding_too(size: int, segment_size: int) -> None:
    """A fetch asks for every segment of the padded stream, not only those holding data: the last segment
    asked for would otherwise tell each node where the file ends, more closely than the padded size does."""
    data = os.urandom(size)
    layout = plan_object(size, segment_size, 3, 6)
    obj = StoredObject("ab" * 32, os.urandom(32), size, layout,
                       tuple(ShareRef(i, f"{i:02x}" * 32, os.urandom(32)) for i in range(6)))
    asked: list[int] = []

    class Reader:
        async def each_segment(self, segments: range, consume: Any, *, ramp: bool = False) -> None:
            for index in segments:
                asked.append(index)
                await consume(index, segment_plaintext(layout, size, index, lambda at, n: data[at:at + n]))

    async def open_reader(store: Any, stored: StoredObject) -> Reader:
        return Reader()

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        patch.setattr(downloader.ObjectReader, "open", open_reader)
        dest = Path(tmp) / "file"
        store: Any = SimpleNamespace()  # the reader above is the only part of a store a fetch uses
        assert trio.run(downloader.fetch_to_file, store, obj, dest)
        assert dest.read_bytes() == data
    assert asked == list(range(layout.segment_count))

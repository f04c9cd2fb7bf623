"""Data-path parts that need no network: run planning, StoredObject codec, encoding to spool files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs import rpc
from fincryptfs.core.crypto import account_signing_key, new_master_key
from fincryptfs.core.errors import RemoteProtocolError
from fincryptfs.core.merkle import LEAF_SIZE, MerkleTree
from fincryptfs.core.objectcodec import decode_segment_plaintext, plan_object
from fincryptfs.downloader import MAX_RUN_SHARE_BYTES, plan_runs
from fincryptfs.objectstore import FileChangedError, ObjectStore, ShareRef, StoredObject
from fincryptfs.uploader import encode_to_spool


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 40 * 2**20), st.sampled_from([4096, 65536, 2**20, 3 * 2**20 + 5]), st.data())
def test_plan_runs_cover_segments_within_bound(size: int, segment_size: int, data: st.DataObject) -> None:
    layout = plan_object(size, segment_size, 3, 6)
    first = data.draw(st.integers(0, layout.segment_count - 1))
    last = data.draw(st.integers(first, layout.segment_count - 1))
    runs = plan_runs(layout, range(first, last + 1))
    assert [s for r in runs for s in r.segments] == list(range(first, last + 1))
    for run in runs:
        begin = layout.block_offset(run.segments[0])
        end = layout.block_offset(run.segments[-1]) + layout.block_length(run.segments[-1])
        assert run.share_start <= begin and end <= (run.first_leaf + run.leaf_count) * LEAF_SIZE
        assert (run.first_leaf + run.leaf_count - 1) * LEAF_SIZE < layout.share_size
        if len(run.segments) > 1:
            assert run.leaf_count * LEAF_SIZE <= MAX_RUN_SHARE_BYTES + 2 * LEAF_SIZE


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


async def test_spool_files_hold_the_shares(tmp_path: Path) -> None:
    """What encode_to_spool writes decodes back to the file, its roots match the bytes, and files are 0600."""
    src = tmp_path / "src"
    content = os.urandom(5 * 4096 + 123)
    src.write_bytes(content)
    spool = tmp_path / "spool"
    spool.mkdir()
    paths: list[Path] = []
    enc = await encode_to_spool(src, spool_dir=spool, segment_size=4096, k=3, n=6, cpu=trio.CapacityLimiter(2),
                                spool_paths=paths)
    shares = [p.read_bytes() for p in enc.spool_paths]
    assert all(os.stat(p).st_mode & 0o777 == 0o600 for p in enc.spool_paths)
    for spec, data in zip(enc.specs, shares, strict=True):
        assert len(data) == enc.layout.share_size == spec.share_size
        assert MerkleTree.from_data(data).root == spec.merkle_root
    out = b""
    for index in range(enc.layout.segment_count):
        off, length = enc.layout.block_offset(index), enc.layout.block_length(index)
        blocks = {i: shares[i][off:off + length] for i in (1, 3, 5)}
        out += decode_segment_plaintext(enc.file_key, enc.object_id, enc.layout, index, blocks)
    assert out[:len(content)] == content


async def test_file_changing_size_while_encoding_is_refused_and_spool_cleaned(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(10 * 4096))
    spool = tmp_path / "spool"  # created by put_file
    master = new_master_key()
    async with rpc.new_client() as http:
        store = ObjectStore(mediator_url="http://127.0.0.1:9", account_key=account_signing_key(master), k=3, n=6,
                            happy=5, segment_size=4096, spool_dir=spool, http=http, cpu=trio.CapacityLimiter(2))

        def shrink(done: int) -> None:
            if done < 10 * 4096:
                os.truncate(src, 3 * 4096)

        with pytest.raises(FileChangedError, match="changed while"):
            await store.put_file(src, progress=shrink)

        def grow(done: int) -> None:
            with open(src, "ab") as f:
                f.write(b"x")

        src.write_bytes(os.urandom(10 * 4096))
        with pytest.raises(FileChangedError, match="changed while"):
            await store.put_file(src, progress=grow)
    assert list(spool.iterdir()) == []

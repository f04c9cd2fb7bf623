"""fincryptfs.core.merkle: tree files written and checked in bounded memory (TreeFileWriter, TreeFileChecker).

Both must agree with MerkleTree byte for byte. The chunk size is patched down to a few hashes so that share
sizes cheap enough for hypothesis still cross many chunk boundaries on every level.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs.core import merkle
from fincryptfs.core.merkle import HASH_BYTES, LEAF_SIZE, MerkleTree, TreeBuilder, TreeFileChecker, TreeFileWriter


def _share(size: int) -> bytes:
    """Bytes whose every leaf differs (a repeated block would give equal leaf hashes and hide misplaced ones)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


class _File:
    """An in-memory tree file with the read_at/write_at a writer or checker is given."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = bytearray(data)
        self.reads: list[int] = []
        self.writes: list[int] = []

    def read_at(self, offset: int, length: int) -> bytes:
        self.reads.append(length)
        chunk = bytes(self.data[offset:offset + length])
        if len(chunk) != length:
            raise OSError(f"short read: {len(chunk)} of {length} bytes at {offset}")
        return chunk

    def write_at(self, offset: int, data: bytes | bytearray) -> None:
        self.writes.append(len(data))
        if offset > len(self.data):
            self.data += bytes(offset - len(self.data))
        self.data[offset:offset + len(data)] = data


def _near_powers_of_two() -> st.SearchStrategy[int]:
    """Share sizes around 2**j leaves: one leaf less or more, a byte less or more."""
    return st.builds(lambda j, leaves, extra: max(0, ((1 << j) + leaves) * LEAF_SIZE + extra),
                     st.integers(0, 7), st.integers(-1, 1), st.sampled_from([-1, 0, 1, LEAF_SIZE // 2]))


share_sizes = st.one_of(
    st.sampled_from([0, 1, LEAF_SIZE - 1, LEAF_SIZE, LEAF_SIZE + 1, 2 * LEAF_SIZE, 3 * LEAF_SIZE]),
    st.integers(0, 40).map(lambda leaves: leaves * LEAF_SIZE),  # exact multiples
    st.integers(0, 20).map(lambda half: (2 * half + 1) * LEAF_SIZE - 5),  # odd leaf counts, last leaf short
    _near_powers_of_two(),
    st.integers(0, 70 * LEAF_SIZE),
)
chunk_hashes = st.sampled_from([2, 4, 6, 64, merkle.TREE_CHUNK_HASHES])


def _feed(feeder: TreeFileWriter | TreeFileChecker, data: bytes, cuts: Sequence[int]) -> None:
    at = 0
    for cut in cuts:
        feeder.update(data[at:at + cut])
        at = min(len(data), at + cut)
    feeder.update(memoryview(data)[at:])


def _write(data: bytes, cuts: Sequence[int] = ()) -> tuple[_File, bytes]:
    tree_file = _File()
    writer = TreeFileWriter(tree_file.read_at, tree_file.write_at)
    _feed(writer, data, cuts)
    assert writer.size == len(data)
    return tree_file, writer.finish()


@settings(max_examples=300, deadline=None)
@given(share_sizes, chunk_hashes, st.lists(st.integers(0, 3 * LEAF_SIZE + 1), max_size=12))
def test_tree_file_writer_is_byte_identical_to_merkle_tree(size: int, chunk: int, cuts: list[int]) -> None:
    data = _share(size)
    tree = MerkleTree.from_data(data)
    with mock.patch.object(merkle, "TREE_CHUNK_HASHES", chunk):
        tree_file, root = _write(data, cuts)
    assert bytes(tree_file.data) == tree.to_bytes()
    assert len(tree_file.data) == HASH_BYTES * merkle.tree_hash_count(size)
    assert root == tree.root


@pytest.mark.parametrize("chunk", [2, 4, 6])
def test_tree_file_writer_and_checker_hold_one_chunk_at_a_time(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Fed a leaf at a time, neither ever writes, reads or compares more than a chunk of hashes at once."""
    monkeypatch.setattr(merkle, "TREE_CHUNK_HASHES", chunk)
    data = _share(45 * LEAF_SIZE + 9)
    tree_file, _ = _write(data, [LEAF_SIZE] * 46)
    checker = TreeFileChecker(len(data), tree_file.read_at)
    _feed(checker, data, [LEAF_SIZE] * 46)
    assert checker.finish() == MerkleTree.from_data(data).root
    assert max(tree_file.writes + tree_file.reads) <= chunk * HASH_BYTES
    assert sum(tree_file.writes) == len(tree_file.data)  # each hash written once


def test_tree_file_writer_without_the_c_hasher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(merkle, "_leafhash", None)
    monkeypatch.setattr(merkle, "TREE_CHUNK_HASHES", 6)
    for size in (0, 1, 5 * LEAF_SIZE, 37 * LEAF_SIZE + 3):
        data = _share(size)
        tree_file, root = _write(data)
        assert (bytes(tree_file.data), root) == (MerkleTree.from_data(data).to_bytes(), MerkleTree.from_data(data).root)


def test_tree_file_writer_over_several_real_chunks() -> None:
    """Level 0 of two and a half chunks at the real chunk size (level 1 over a chunk too): flushes and read-backs
    at the true boundaries. The same zero block fed again and again keeps this test's memory small."""
    leaves = 2 * merkle.TREE_CHUNK_HASHES + merkle.TREE_CHUNK_HASHES // 2 + 1
    block = memoryview(bytes(1024 * LEAF_SIZE + 7))
    size = leaves * LEAF_SIZE - 100
    builder = TreeBuilder()
    tree_file = _File()
    writer = TreeFileWriter(tree_file.read_at, tree_file.write_at)
    for at in range(0, size, len(block)):
        builder.update(block[:size - at])
        writer.update(block[:size - at])
    tree = builder.finish()
    assert writer.finish() == tree.root and bytes(tree_file.data) == tree.to_bytes()


@settings(max_examples=200, deadline=None)
@given(share_sizes, chunk_hashes, st.lists(st.integers(0, 3 * LEAF_SIZE + 1), max_size=8))
def test_tree_file_checker_accepts_the_true_tree(size: int, chunk: int, cuts: list[int]) -> None:
    data = _share(size)
    tree = MerkleTree.from_data(data)
    stored = _File(tree.to_bytes())
    with mock.patch.object(merkle, "TREE_CHUNK_HASHES", chunk):
        checker = TreeFileChecker(size, stored.read_at)
        _feed(checker, data, cuts)
        assert checker.finish() == tree.root


@settings(max_examples=200, deadline=None)
@given(share_sizes, chunk_hashes, st.data())
def test_tree_file_checker_rejects_any_altered_hash(size: int, chunk: int, draw: st.DataObject) -> None:
    data = _share(size)
    stored = _File(MerkleTree.from_data(data).to_bytes())
    at = draw.draw(st.integers(0, len(stored.data) - 1), label="altered byte")
    stored.data[at] ^= 1 << draw.draw(st.integers(0, 7), label="bit")
    with mock.patch.object(merkle, "TREE_CHUNK_HASHES", chunk):
        checker = TreeFileChecker(size, stored.read_at)
        _feed(checker, data, [])
        assert checker.finish() is None


@settings(max_examples=100, deadline=None)
@given(share_sizes, chunk_hashes, st.data())
def test_tree_file_checker_rejects_other_bytes_or_lengths(size: int, chunk: int, draw: st.DataObject) -> None:
    data = _share(size)
    stored = _File(MerkleTree.from_data(data).to_bytes())
    change = draw.draw(st.sampled_from(["flip", "shorter", "longer"] if size else ["longer"]), label="change")
    if change == "flip":
        at = draw.draw(st.integers(0, size - 1), label="altered byte")
        fed = data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]
    elif change == "shorter":
        fed = data[:draw.draw(st.integers(0, size - 1), label="length")]
    else:
        fed = data + _share(draw.draw(st.integers(1, 3 * LEAF_SIZE), label="extra"))
    with mock.patch.object(merkle, "TREE_CHUNK_HASHES", chunk):
        checker = TreeFileChecker(size, stored.read_at)
        _feed(checker, fed, [])
        assert checker.finish() is None

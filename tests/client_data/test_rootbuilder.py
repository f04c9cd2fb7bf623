"""merkle.RootBuilder (streamed roots in O(log n) memory) agrees with MerkleTree for every size and chunking."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs.core.merkle import LEAF_SIZE, MerkleTree, RootBuilder, hash_chunk


def test_root_builder_matches_tree_for_leaf_counts_around_powers_of_two() -> None:
    data = os.urandom(40 * LEAF_SIZE)
    for size in [0, 1, LEAF_SIZE - 1, LEAF_SIZE, LEAF_SIZE + 1] + [c * LEAF_SIZE + d for c in range(2, 40)
                                                                    for d in (-1, 0, 7)]:
        builder = RootBuilder()
        builder.update(data[:size])
        assert builder.size == size
        assert builder.finish() == MerkleTree.from_data(data[:size]).root, size


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 23 * LEAF_SIZE), st.lists(st.integers(0, 3 * LEAF_SIZE), max_size=12))
def test_root_builder_any_chunking(size: int, cuts: list[int]) -> None:
    data = os.urandom(size)
    builder = RootBuilder()
    at = 0
    for cut in cuts:
        builder.update(data[at:at + cut])
        at = min(size, at + cut)
    builder.update(data[at:])
    assert builder.finish() == MerkleTree.from_data(data).root


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 23 * LEAF_SIZE), st.lists(st.integers(0, 3 * LEAF_SIZE), max_size=12))
def test_root_builder_from_chunks_hashed_elsewhere(size: int, cuts: list[int]) -> None:
    """Workers hash whole leaves (hash_chunk) at any offset; feeding the chunks in order gives the same root."""
    data = os.urandom(size)
    builder = RootBuilder()
    at = 0
    for cut in [*cuts, size]:
        piece = data[at:at + cut]
        chunk = hash_chunk(at, piece)
        assert chunk.size == len(piece)
        if not chunk.leaf_hashes:
            assert chunk.head + chunk.tail == piece
        builder.update_hashed(chunk)
        at = min(size, at + cut)
    assert builder.size == size
    assert builder.finish() == MerkleTree.from_data(data).root


def test_hashed_chunk_leaves_only_straddling_bytes_to_the_feeder() -> None:
    data = os.urandom(10 * LEAF_SIZE)
    chunk = hash_chunk(LEAF_SIZE - 100, data[LEAF_SIZE - 100:5 * LEAF_SIZE + 7])
    assert (len(chunk.head), len(chunk.leaf_hashes), len(chunk.tail)) == (100, 4, 7)
    assert chunk.leaf_hashes == tuple(MerkleTree.from_data(data).levels[0][1:5])
    builder = RootBuilder()
    builder.update(data[:LEAF_SIZE - 50])  # out of step with the chunk's offset
    with pytest.raises(ValueError, match="leaf boundary"):
        builder.update_hashed(chunk)

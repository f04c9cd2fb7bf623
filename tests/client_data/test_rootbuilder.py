"""merkle.RootBuilder (streamed roots in O(log n) memory) agrees with MerkleTree for every size and chunking."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs.core import merkle
from fincryptfs.core.merkle import (
    LEAF_SIZE,
    MerkleTree,
    RootBuilder,
    aligned_subtrees,
    hash_chunk,
    hash_leaves,
    hash_pairs,
)


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
        if not chunk.subtrees:
            assert chunk.head + chunk.tail == piece
        builder.update_hashed(chunk)
        at = min(size, at + cut)
    assert builder.size == size
    assert builder.finish() == MerkleTree.from_data(data).root


def test_hashed_chunk_leaves_only_straddling_bytes_to_the_feeder() -> None:
    data = os.urandom(10 * LEAF_SIZE)
    chunk = hash_chunk(LEAF_SIZE - 100, data[LEAF_SIZE - 100:5 * LEAF_SIZE + 7])
    assert (len(chunk.head), chunk.leaves, len(chunk.tail)) == (100, 4, 7)
    levels = MerkleTree.from_data(data).levels
    # leaves 1..4 tile as leaf 1, the pair (2, 3) and leaf 4: each an aligned perfect subtree of the share's tree
    assert chunk.subtrees == ((0, levels[0][1]), (1, levels[1][1]), (0, levels[0][4]))
    builder = RootBuilder()
    builder.update(data[:LEAF_SIZE - 50])  # out of step with the chunk's offset
    with pytest.raises(ValueError, match="leaf boundary"):
        builder.update_hashed(chunk)
    builder = RootBuilder()
    builder.update(data[:2 * LEAF_SIZE - 100])  # on a leaf boundary, but not the one the chunk was hashed for
    with pytest.raises(ValueError, match="another offset"):
        builder.update_hashed(chunk)


@given(st.integers(0, 5000), st.integers(0, 5000))
def test_aligned_subtrees_tile_the_range_with_aligned_perfect_pieces(first: int, span: int) -> None:
    at = first
    for start, height in aligned_subtrees(first, first + span):
        assert start == at and start % (1 << height) == 0
        at += 1 << height
    assert at == first + span
    assert len(list(aligned_subtrees(first, first + span))) <= 2 * max(1, span.bit_length())


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 70), st.integers(0, 70))
def test_accelerated_hashing_equals_hashlib(leaves: int, pairs: int) -> None:
    """The C accelerator (when built) and the hashlib path give the same bytes."""
    data = os.urandom(leaves * LEAF_SIZE)
    assert hash_leaves(data) == merkle._hash_leaves_py(data)
    level = [os.urandom(32) for _ in range(2 * pairs)]
    assert hash_pairs(level) == merkle._hash_pairs_py(level)


def test_the_accelerator_is_built_where_ci_runs() -> None:
    """CI installs a compiler and OpenSSL's headers; a silently skipped build would halve hashing on 2 cores."""
    if os.environ.get("CI"):
        assert merkle.ACCELERATED


def test_hash_chunk_without_the_accelerator_gives_the_same_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(37 * LEAF_SIZE + 5)
    accelerated = [hash_chunk(at, data[at:at + 9 * LEAF_SIZE + 11]) for at in range(0, len(data), 9 * LEAF_SIZE + 11)]
    monkeypatch.setattr(merkle, "_leafhash", None)
    plain = [hash_chunk(at, data[at:at + 9 * LEAF_SIZE + 11]) for at in range(0, len(data), 9 * LEAF_SIZE + 11)]
    assert plain == accelerated
    assert MerkleTree.from_data(data).root == merkle.MerkleTree.from_leaf_hashes(
        len(data), merkle._hash_leaves_py(data[:37 * LEAF_SIZE]) + [merkle.hash_leaf(data[37 * LEAF_SIZE:])]).root

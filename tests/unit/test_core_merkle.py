"""fincryptfs.core.merkle: streaming trees, range proofs and tree files."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs.core import merkle
from fincryptfs.core.errors import IntegrityError
from fincryptfs.core.merkle import LEAF_SIZE, MerkleTree, TreeBuilder


def _share(size: int, seed: int = 1) -> bytes:
    block = hashlib.sha256(bytes([seed])).digest() * 128  # 4 KiB of non-repeating-per-leaf-ish bytes
    return (block * (size // len(block) + 1))[:size]


sizes = st.integers(min_value=0, max_value=12 * LEAF_SIZE + 7)


@settings(max_examples=150, deadline=None)
@given(sizes, st.lists(st.integers(min_value=0, max_value=3 * LEAF_SIZE), max_size=20))
def test_tree_builder_equals_from_data(size: int, cuts: list[int]) -> None:
    data = _share(size)
    builder = TreeBuilder()
    at = 0
    for cut in cuts:
        builder.update(data[at:at + cut])
        at = min(size, at + cut)
    builder.update(memoryview(data)[at:])
    assert builder.size == size
    tree = builder.finish()
    assert tree == MerkleTree.from_data(data)
    assert tree.leaf_count == merkle.leaf_count(size)


def test_tree_structure_matches_the_spec() -> None:
    data = _share(3 * LEAF_SIZE + 5)
    leaves = [hashlib.sha256(b"\x00" + data[i:i + LEAF_SIZE]).digest() for i in range(0, len(data), LEAF_SIZE)]
    assert len(leaves) == 4
    n01 = hashlib.sha256(b"\x01" + leaves[0] + leaves[1]).digest()
    n23 = hashlib.sha256(b"\x01" + leaves[2] + leaves[3]).digest()
    top = hashlib.sha256(b"\x01" + n01 + n23).digest()
    root = hashlib.sha256(b"\x02" + struct.pack(">Q", len(data)) + top).digest()
    assert MerkleTree.from_data(data).root == root
    # odd width: the last hash is promoted unchanged, not duplicated
    data3 = data[: 2 * LEAF_SIZE + 1]
    tree3 = MerkleTree.from_data(data3)
    assert tree3.levels[1] == (n01, leaves[2][:0] + hashlib.sha256(b"\x00" + data3[2 * LEAF_SIZE:]).digest())
    # empty share: one empty leaf
    empty = MerkleTree.from_data(b"")
    assert empty.levels == ((hashlib.sha256(b"\x00").digest(),),)
    assert empty.root == hashlib.sha256(b"\x02" + bytes(8) + hashlib.sha256(b"\x00").digest()).digest()


def test_root_binds_size() -> None:
    # one full leaf and the same leaf as the whole of a 4096-byte share differ only by the size in the root
    data = _share(LEAF_SIZE)
    tree = MerkleTree.from_data(data)
    forged = MerkleTree(LEAF_SIZE + 1, tree.levels)
    assert forged.root != tree.root


@st.composite
def tree_and_range(draw: st.DrawFn) -> tuple[bytes, MerkleTree, int, int]:
    size = draw(st.integers(min_value=0, max_value=40 * LEAF_SIZE))
    data = _share(size, draw(st.integers(0, 255)))
    tree = MerkleTree.from_data(data)
    first = draw(st.integers(0, tree.leaf_count - 1))
    span = draw(st.integers(1, tree.leaf_count - first))
    return data, tree, first, span


def _leaves(data: bytes, first: int, span: int) -> list[bytes]:
    leaves = [data[i * LEAF_SIZE:(i + 1) * LEAF_SIZE] for i in range(first, first + span)]
    return leaves


@settings(max_examples=150, deadline=None)
@given(tree_and_range())
def test_every_range_proof_verifies(case: tuple[bytes, MerkleTree, int, int]) -> None:
    data, tree, first, span = case
    proof = tree.range_proof(first, span)
    merkle.verify_range(tree.root, len(data), first, _leaves(data, first, span), proof)
    stored = tree.to_bytes()
    offsets = merkle.level_offsets(tree.leaf_count)

    def read_hash(level: int, pos: int) -> bytes:
        at = (offsets[level] + pos) * merkle.HASH_BYTES
        return stored[at:at + merkle.HASH_BYTES]

    assert merkle.read_range_proof(tree.leaf_count, first, span, read_hash) == proof


def test_every_single_leaf_proof_verifies_exhaustively() -> None:
    for leaves in range(1, 18):
        data = _share(leaves * LEAF_SIZE - 3)
        tree = MerkleTree.from_data(data)
        for first in range(leaves):
            for span in range(1, leaves - first + 1):
                merkle.verify_range(tree.root, len(data), first, _leaves(data, first, span),
                                    tree.range_proof(first, span))


@settings(max_examples=150, deadline=None)
@given(tree_and_range(), st.data())
def test_tampered_proofs_fail(case: tuple[bytes, MerkleTree, int, int], draw: st.DataObject) -> None:
    data, tree, first, span = case
    size = len(data)
    leaves = _leaves(data, first, span)
    proof = tree.range_proof(first, span)
    root = tree.root

    def fails(root: bytes = root, size: int = size, first: int = first, leaves: list[bytes] = leaves,
              proof: list[bytes] = proof) -> None:
        with pytest.raises(IntegrityError):
            merkle.verify_range(root, size, first, leaves, proof)

    # a wrong leaf byte
    which = draw.draw(st.integers(0, span - 1))
    if leaves[which]:
        bad = bytearray(leaves[which])
        bad[draw.draw(st.integers(0, len(bad) - 1))] ^= 1
        fails(leaves=leaves[:which] + [bytes(bad)] + leaves[which + 1:])
    # a wrong sibling hash, a truncated proof, an extended proof
    if proof:
        at = draw.draw(st.integers(0, len(proof) - 1))
        bad_hash = bytearray(proof[at])
        bad_hash[draw.draw(st.integers(0, 31))] ^= 0x80
        fails(proof=proof[:at] + [bytes(bad_hash)] + proof[at + 1:])
        fails(proof=proof[:-1])
        fails(proof=proof[:at] + [proof[at][:31]] + proof[at + 1:])
    fails(proof=proof + [bytes(32)])
    # a wrong index (the same leaves claimed at another position)
    other = draw.draw(st.integers(0, tree.leaf_count - 1))
    if other != first and leaves != _leaves(data, other, span):
        fails(first=other)
    # a wrong root, a wrong size
    fails(root=bytes(32))
    fails(root=root[:-1] + bytes([root[-1] ^ 1]))
    fails(size=size + 1)
    if size > 0:
        fails(size=size - 1)
    fails(leaves=[])


@settings(max_examples=100, deadline=None)
@given(sizes)
def test_tree_file_round_trip(size: int) -> None:
    tree = MerkleTree.from_data(_share(size))
    stored = tree.to_bytes()
    assert len(stored) == merkle.HASH_BYTES * sum(merkle.level_widths(tree.leaf_count))
    assert MerkleTree.from_bytes(size, stored) == tree
    with pytest.raises(IntegrityError, match="tree file has"):
        MerkleTree.from_bytes(size, stored[:-1])
    with pytest.raises(IntegrityError):
        MerkleTree.from_bytes(size, stored + bytes(32))


def test_helpers() -> None:
    assert merkle.leaf_count(0) == 1
    assert merkle.leaf_count(LEAF_SIZE) == 1
    assert merkle.leaf_count(LEAF_SIZE + 1) == 2
    assert merkle.leaf_length(LEAF_SIZE + 1, 1) == 1
    assert merkle.leaf_length(0, 0) == 0
    assert merkle.level_widths(5) == [5, 3, 2, 1]
    assert merkle.level_offsets(5) == [0, 5, 8, 10]
    assert merkle.range_proof_positions(5, 4, 1) == [(2, 0)]
    assert merkle.range_proof_positions(5, 1, 2) == [(0, 0), (0, 3), (2, 1)]
    with pytest.raises(IndexError):
        merkle.leaf_length(10, 1)
    with pytest.raises(IndexError):
        merkle.range_proof_positions(5, 4, 2)
    with pytest.raises(ValueError):
        merkle.leaf_count(-1)
    with pytest.raises(ValueError):
        MerkleTree.from_leaf_hashes(LEAF_SIZE + 1, [bytes(32)])


@settings(max_examples=150, deadline=None)
@given(tree_and_range(), st.integers(-LEAF_SIZE - 1, LEAF_SIZE + 1))
def test_verify_run_on_contiguous_bytes_agrees_and_rejects_other_lengths(
        case: tuple[bytes, MerkleTree, int, int], cut: int) -> None:
    data, tree, first, span = case
    proof = tree.range_proof(first, span)
    run = data[first * LEAF_SIZE:(first + span) * LEAF_SIZE]
    merkle.verify_run(tree.root, len(data), first, span, run, proof)
    altered = run[:cut] if cut < 0 else run + bytes(cut)
    if altered != run:  # a truncated or extended run (even a validly proven prefix) never passes for the whole run
        with pytest.raises(IntegrityError):
            merkle.verify_run(tree.root, len(data), first, span, altered, proof)
    flipped = bytearray(run)
    if flipped:
        flipped[len(flipped) // 2] ^= 1
        with pytest.raises(IntegrityError):
            merkle.verify_run(tree.root, len(data), first, span, flipped, proof)

"""fincryptfs.core.challenge: leaf selection and proofs of storage."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs.core import challenge
from fincryptfs.core.challenge import LeafProof, ShareProof
from fincryptfs.core.errors import IntegrityError
from fincryptfs.core.merkle import LEAF_SIZE, MerkleTree, leaf_count

nonces = st.binary(min_size=32, max_size=32)
share_ids = st.binary(min_size=32, max_size=32).map(bytes.hex)


@settings(max_examples=200, deadline=None)
@given(nonces, share_ids, st.integers(1, 10_000), st.integers(1, 64))
def test_leaf_indices_deterministic_distinct_in_range(nonce: bytes, sid: str, count: int, how_many: int) -> None:
    chosen = challenge.leaf_indices(nonce, sid, count, how_many)
    assert chosen == challenge.leaf_indices(nonce, sid, count, how_many)
    assert len(chosen) == min(count, how_many)
    assert len(set(chosen)) == len(chosen)
    assert all(0 <= i < count for i in chosen)


def test_leaf_indices_follow_the_derivation() -> None:
    nonce, sid = bytes(range(32)), "11" * 32
    digest = hashlib.sha256(b"fincrypt-challenge-v1" + nonce + bytes.fromhex(sid) + (0).to_bytes(4, "big")).digest()
    assert challenge.leaf_indices(nonce, sid, 1000, 1) == [int.from_bytes(digest[:8], "big") % 1000]
    assert sorted(challenge.leaf_indices(nonce, sid, 5, 64)) == [0, 1, 2, 3, 4]


@settings(max_examples=100, deadline=None)
@given(nonces, nonces, share_ids)
def test_leaf_indices_differ_across_nonces_and_shares(a: bytes, b: bytes, sid: str) -> None:
    if a != b:
        assert challenge.leaf_indices(a, sid, 2**40, 4) != challenge.leaf_indices(b, sid, 2**40, 4)
    other = hashlib.sha256(bytes.fromhex(sid)).hexdigest()
    assert challenge.leaf_indices(a, sid, 2**40, 4) != challenge.leaf_indices(a, other, 2**40, 4)


def test_leaf_indices_argument_checks() -> None:
    for args in ((bytes(31), "00" * 32, 10, 1), (bytes(32), "00" * 32, 0, 1), (bytes(32), "00" * 32, 10, 0),
                 (bytes(32), "00" * 32, 10, 65)):
        with pytest.raises(ValueError):
            challenge.leaf_indices(*args)


def _make_share(size: int, seed: int) -> tuple[bytes, MerkleTree]:
    data = (hashlib.sha256(bytes([seed])).digest() * (size // 32 + 1))[:size]
    data = bytes((b + i // LEAF_SIZE) % 256 for i, b in enumerate(data))  # leaves differ from each other
    return data, MerkleTree.from_data(data)


def _honest(nonce: bytes, sid: str, data: bytes, tree: MerkleTree, how_many: int) -> ShareProof:
    return challenge.build_share_proof(nonce, sid, len(data), how_many,
                                       lambda i: data[i * LEAF_SIZE:(i + 1) * LEAF_SIZE],
                                       lambda i: tree.range_proof(i))


shares = st.tuples(st.integers(0, 20 * LEAF_SIZE), st.integers(0, 255))


@settings(max_examples=60, deadline=None)
@given(nonces, share_ids, shares, st.integers(1, 8))
def test_honest_proof_verifies(nonce: bytes, sid: str, share: tuple[int, int], how_many: int) -> None:
    data, tree = _make_share(*share)
    proof = _honest(nonce, sid, data, tree, how_many)
    assert [leaf.index for leaf in proof.leaves] == challenge.leaf_indices(nonce, sid, leaf_count(len(data)),
                                                                            how_many)
    challenge.verify_share_proof(nonce, sid, tree.root, len(data), how_many, proof)


@settings(max_examples=60, deadline=None)
@given(nonces, nonces, share_ids, shares, st.integers(1, 8))
def test_proofs_without_the_data_never_verify(nonce: bytes, old_nonce: bytes, sid: str, share: tuple[int, int],
                                              how_many: int) -> None:
    data, tree = _make_share(*share)
    honest = _honest(nonce, sid, data, tree, how_many)

    def refused(proof: ShareProof) -> None:
        with pytest.raises(IntegrityError):
            challenge.verify_share_proof(nonce, sid, tree.root, len(data), how_many, proof)

    def replace(make: object) -> ShareProof:
        return ShareProof(sid, tuple(LeafProof(leaf.index, make(leaf), leaf.path)  # type: ignore[operator]
                                     for leaf in honest.leaves))

    # a node that kept only the tree: leaf hashes instead of leaves
    refused(replace(lambda leaf: tree.levels[0][leaf.index]))
    # zeros of the right length
    if any(leaf.data != bytes(len(leaf.data)) for leaf in honest.leaves):
        refused(replace(lambda leaf: bytes(len(leaf.data))))
    # an answer kept from an earlier round (another nonce's leaves)
    if challenge.leaf_indices(old_nonce, sid, tree.leaf_count, how_many) != [x.index for x in honest.leaves]:
        refused(_honest(old_nonce, sid, data, tree, how_many))
    # fewer leaves than challenged, or the proof of another share id
    if len(honest.leaves) > 1:
        refused(ShareProof(sid, honest.leaves[:-1]))
    with pytest.raises(IntegrityError, match="proof is for share"):
        challenge.verify_share_proof(nonce, sid, tree.root, len(data), how_many,
                                     ShareProof("ee" * 32 if sid != "ee" * 32 else "ff" * 32, honest.leaves))
    # a wrong path
    first = honest.leaves[0]
    if first.path:
        bad = LeafProof(first.index, first.data, (bytes(32),) + first.path[1:])
        refused(ShareProof(sid, (bad,) + honest.leaves[1:]))
    # the right indices but another share's data and tree
    other_data, other_tree = _make_share(len(data), share[1] ^ 0x55)
    if other_tree.root != tree.root:
        refused(_honest(nonce, sid, other_data, other_tree, how_many))

"""Proofs of storage: which leaves a node must show for a nonce, and how an answer is checked.

For each share, the leaves to prove are derived from ``SHA-256("fincrypt-challenge-v1" || nonce || share id
|| u32be(j))`` for j = 0, 1, ... (reduced modulo the leaf count, duplicates skipped). The nonce is fresh and
random every round, so a node cannot precompute answers, and an answer for one nonce is useless for the next.

An answer carries the **raw leaf bytes** plus their Merkle paths. The verifier hashes the bytes itself, so an
answer made only of hashes (a node that kept the tree but threw the data away) can never verify.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

from .errors import IntegrityError
from .merkle import leaf_count, verify_range

_TAG = b"fincrypt-challenge-v1"
NONCE_BYTES = 32
MAX_LEAVES_PER_SHARE = 64


def leaf_indices(nonce: bytes, share_id: str, count_of_leaves: int, how_many: int) -> list[int]:
    """The distinct leaf indices a node must prove for ``share_id`` under ``nonce``, in derivation order."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"challenge nonce must be {NONCE_BYTES} bytes")
    if count_of_leaves < 1 or not 1 <= how_many <= MAX_LEAVES_PER_SHARE:
        raise ValueError("need at least one leaf and 1..64 leaves per share")
    wanted = min(how_many, count_of_leaves)
    seed = _TAG + nonce + bytes.fromhex(share_id)
    chosen: list[int] = []
    j = 0
    while len(chosen) < wanted:
        digest = hashlib.sha256(seed + struct.pack(">I", j)).digest()
        index = int.from_bytes(digest[:8], "big") % count_of_leaves
        if index not in chosen:
            chosen.append(index)
        j += 1
    return chosen


@dataclass(frozen=True)
class LeafProof:
    index: int
    data: bytes
    path: tuple[bytes, ...]


@dataclass(frozen=True)
class ShareProof:
    """A node's answer for one share: the challenged leaves with their paths."""

    share_id: str
    leaves: tuple[LeafProof, ...]


def build_share_proof(nonce: bytes, share_id: str, size: int, how_many: int,
                      read_leaf: Callable[[int], bytes],
                      read_path: Callable[[int], list[bytes]]) -> ShareProof:
    """Answer a challenge for one share from the share's bytes (``read_leaf``) and its tree (``read_path``)."""
    indices = leaf_indices(nonce, share_id, leaf_count(size), how_many)
    return ShareProof(share_id, tuple(LeafProof(i, read_leaf(i), tuple(read_path(i))) for i in indices))


def verify_share_proof(nonce: bytes, share_id: str, root: bytes, size: int, how_many: int,
                       proof: ShareProof) -> None:
    """Raise IntegrityError unless ``proof`` shows exactly the challenged leaves of the share with ``root``."""
    if proof.share_id != share_id:
        raise IntegrityError(f"proof is for share {proof.share_id[:16]}…, not {share_id[:16]}…")
    expected = leaf_indices(nonce, share_id, leaf_count(size), how_many)
    got = [leaf.index for leaf in proof.leaves]
    if got != expected:
        raise IntegrityError(f"proof for share {share_id[:16]}… shows leaves {got[:4]}, challenged {expected[:4]}")
    for leaf in proof.leaves:
        verify_range(root, size, leaf.index, [leaf.data], leaf.path)

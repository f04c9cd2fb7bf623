"""Answers storage challenges and range reads from share files, reading only the bytes a proof needs.

A leaf comes from the data file with one ``pread``; each path hash from the tree file with one ``pread`` at
``(level_offsets[level] + position) * 32``. Proving 10,000 shares therefore touches a few kilobytes per share,
never whole files. Blocking: run in a worker thread.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fincryptfs.core.challenge import ShareProof, build_share_proof
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.ids import NodeId, ShareId
from fincryptfs.core.merkle import HASH_BYTES, LEAF_SIZE, leaf_count, leaf_length, level_offsets, read_range_proof
from fincryptfs.core.messages import Challenge, ProofResponse

from .store import SharePaths, read_exact, tree_file_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProvableShare:
    """What the prover needs to know about a held share."""

    share_id: ShareId
    size: int
    paths: SharePaths


class OpenShare:
    """A share's two files opened for reading; a context manager so descriptors never leak."""

    def __init__(self, paths: SharePaths, size: int) -> None:
        self.size = size
        self.count = leaf_count(size)
        self._offsets = level_offsets(self.count)
        self.data_fd = self.tree_fd = -1
        data_fd = os.open(paths.data, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.tree_fd = os.open(paths.tree, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(data_fd)
            raise
        self.data_fd = data_fd
        try:
            _check_size(data_fd, size, "data")
            _check_size(self.tree_fd, tree_file_size(size), "tree")
        except OSError:
            self.close()
            raise

    def __enter__(self) -> OpenShare:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.data_fd >= 0:
            os.close(self.data_fd)
            os.close(self.tree_fd)
            self.data_fd = self.tree_fd = -1

    def __del__(self) -> None:  # a response stream that was never iterated still gives its descriptors back
        self.close()

    def read_leaf(self, index: int) -> bytes:
        return read_exact(self.data_fd, leaf_length(self.size, index), index * LEAF_SIZE)

    def read_leaves(self, first: int, count: int) -> bytes:
        """Leaves first..first+count-1 as one byte string (the last leaf of the share may be short)."""
        start = first * LEAF_SIZE
        end = min(self.size, (first + count) * LEAF_SIZE)
        return read_exact(self.data_fd, end - start, start)

    def read_hash(self, level: int, position: int) -> bytes:
        return read_exact(self.tree_fd, HASH_BYTES, (self._offsets[level] + position) * HASH_BYTES)

    def read_path(self, index: int) -> list[bytes]:
        return self.range_proof(index, 1)

    def range_proof(self, first: int, span: int) -> list[bytes]:
        return read_range_proof(self.count, first, span, self.read_hash)


def _check_size(fd: int, expected: int, what: str) -> None:
    """A truncated (or extended) share file is damage, found when opened, not halfway through a response."""
    actual = os.fstat(fd).st_size
    if actual != expected:
        raise OSError(errno.EIO, f"share {what} file is {actual} bytes, its record says {expected}")


def prove_shares(challenge: Challenge, held: Iterable[ProvableShare],
                 on_unreadable: Callable[[ShareId, OSError], None] | None = None
                 ) -> tuple[list[ShareProof], list[ShareId]]:
    """Proofs for every held share of ``challenge``; the others (and unreadable ones) are listed as missing."""
    by_id = {share.share_id: share for share in held}
    proofs: list[ShareProof] = []
    missing: list[ShareId] = []
    for share_id in challenge.share_ids:
        share = by_id.get(share_id)
        if share is None:
            missing.append(share_id)
            continue
        try:
            with OpenShare(share.paths, share.size) as opened:
                proofs.append(build_share_proof(challenge.nonce, share_id, share.size,
                                                challenge.leaves_per_share, opened.read_leaf, opened.read_path))
        except OSError as exc:
            log.error("share unreadable share_id=%s error=%s", share_id, exc)
            if on_unreadable is not None:
                on_unreadable(share_id, exc)
            missing.append(share_id)
    return proofs, missing


def answer_challenge(challenge: Challenge, held: Iterable[ProvableShare], node_id: NodeId, node_key: SigningKey,
                     on_unreadable: Callable[[ShareId, OSError], None] | None = None) -> bytes:
    """The signed binary ProofResponse for ``challenge``."""
    proofs, missing = prove_shares(challenge, held, on_unreadable)
    response = ProofResponse(node_id, challenge.mediator_id, challenge.round_id, challenge.nonce, tuple(proofs),
                             tuple(missing))
    return response.encode(node_key)


def open_share(paths: SharePaths, size: int) -> OpenShare:
    return OpenShare(paths, size)


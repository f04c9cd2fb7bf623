"""Merkle trees over a share's fixed-size leaves, and proofs for one leaf or a contiguous run of leaves.

Layout (see docs/format.md):

* A share of ``size`` bytes is cut into leaves of ``LEAF_SIZE`` bytes; the last may be shorter; an empty share
  has one empty leaf.
* ``leaf = SHA-256(0x00 || data)``, ``node = SHA-256(0x01 || left || right)``. A level of odd width promotes
  its last hash unchanged to the next level (no duplication, so no CVE-2012-2459-style second preimage).
* ``root = SHA-256(0x02 || u64be(size) || top)``: the root commits to the share's exact length too.

The tags keep leaves, inner nodes and roots in separate domains, so a leaf can never pose as an inner node.

4 KiB leaves: a storage proof must carry raw leaves, so leaf size is what a challenge costs in bandwidth
(10,000 shares = 40 MiB per round per node); smaller leaves would cost more tree storage and, below 2 KiB,
forfeit hashlib's GIL release and double the hashing overhead of the write path.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .errors import IntegrityError

LEAF_SIZE = 4096
HASH_BYTES = 32
_LEAF = b"\x00"
_NODE = b"\x01"
_ROOT = b"\x02"


def hash_leaf(data: bytes | bytearray | memoryview) -> bytes:
    h = hashlib.sha256(_LEAF)
    h.update(data)
    return h.digest()


def hash_node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def hash_root(size: int, top: bytes) -> bytes:
    return hashlib.sha256(_ROOT + struct.pack(">Q", size) + top).digest()


def leaf_count(size: int) -> int:
    if size < 0:
        raise ValueError("size must be >= 0")
    return max(1, -(-size // LEAF_SIZE))


def leaf_length(size: int, index: int) -> int:
    """Bytes in leaf ``index`` of a share of ``size`` bytes."""
    count = leaf_count(size)
    if not 0 <= index < count:
        raise IndexError(f"leaf {index} outside 0..{count - 1}")
    return LEAF_SIZE if index < count - 1 else size - LEAF_SIZE * (count - 1)


def level_widths(count: int) -> list[int]:
    """Number of hashes on each level, leaves first, ending with 1."""
    widths = [count]
    while widths[-1] > 1:
        widths.append((widths[-1] + 1) // 2)
    return widths


def level_offsets(count: int) -> list[int]:
    """Index (in hashes) where each level starts when all levels are stored one after another."""
    offsets, total = [], 0
    for width in level_widths(count):
        offsets.append(total)
        total += width
    return offsets


def range_proof_positions(count: int, first: int, span: int) -> list[tuple[int, int]]:
    """(level, position) of every hash a proof for leaves [first, first + span) must carry, in order."""
    if span < 1 or first < 0 or first + span > count:
        raise IndexError(f"leaf range {first}+{span} outside a tree of {count} leaves")
    positions: list[tuple[int, int]] = []
    lo, hi = first, first + span - 1
    for level, width in enumerate(level_widths(count)[:-1]):
        if lo % 2 == 1:
            positions.append((level, lo - 1))
            lo -= 1
        if hi % 2 == 0 and hi + 1 < width:
            positions.append((level, hi + 1))
            hi += 1
        lo, hi = lo // 2, hi // 2
    return positions


def iter_leaves(data: bytes | memoryview) -> Iterator[memoryview]:
    view = memoryview(data)
    for start in range(0, max(len(view), 1), LEAF_SIZE):
        yield view[start:start + LEAF_SIZE]


@dataclass(frozen=True)
class MerkleTree:
    """All levels of a share's tree (level 0 = leaf hashes) and the share size they commit to."""

    size: int
    levels: tuple[tuple[bytes, ...], ...]

    @property
    def root(self) -> bytes:
        return hash_root(self.size, self.levels[-1][0])

    @property
    def leaf_count(self) -> int:
        return len(self.levels[0])

    @classmethod
    def from_leaf_hashes(cls, size: int, leaf_hashes: Sequence[bytes]) -> MerkleTree:
        if len(leaf_hashes) != leaf_count(size):
            raise ValueError(f"{len(leaf_hashes)} leaf hashes for a share of {size} bytes")
        levels = [tuple(leaf_hashes)]
        while len(levels[-1]) > 1:
            below = levels[-1]
            above = [hash_node(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
            if len(below) % 2:
                above.append(below[-1])
            levels.append(tuple(above))
        return cls(size, tuple(levels))

    @classmethod
    def from_data(cls, data: bytes | memoryview) -> MerkleTree:
        return cls.from_leaf_hashes(len(data), [hash_leaf(leaf) for leaf in iter_leaves(data)])

    def range_proof(self, first: int, span: int = 1) -> list[bytes]:
        return [self.levels[lv][pos] for lv, pos in range_proof_positions(self.leaf_count, first, span)]

    def to_bytes(self) -> bytes:
        """All levels concatenated (the storage node's tree file)."""
        return b"".join(h for level in self.levels for h in level)

    @classmethod
    def from_bytes(cls, size: int, data: bytes) -> MerkleTree:
        widths = level_widths(leaf_count(size))
        if len(data) != HASH_BYTES * sum(widths):
            raise IntegrityError(f"tree file has {len(data)} bytes; a share of {size} bytes needs "
                                 f"{HASH_BYTES * sum(widths)}")
        levels, at = [], 0
        for width in widths:
            levels.append(tuple(data[(at + i) * HASH_BYTES:(at + i + 1) * HASH_BYTES] for i in range(width)))
            at += width
        return cls(size, tuple(levels))


class TreeBuilder:
    """Computes a share's Merkle tree from bytes fed in any chunking (streamed uploads, encoders)."""

    def __init__(self) -> None:
        self._size = 0
        self._pending = bytearray()
        self._leaf_hashes: list[bytes] = []

    @property
    def size(self) -> int:
        return self._size

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        self._size += len(view)
        if self._pending:
            take = min(LEAF_SIZE - len(self._pending), len(view))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) == LEAF_SIZE and view:
                self._leaf_hashes.append(hash_leaf(self._pending))
                self._pending.clear()
        # keep the last (possibly full) leaf pending: only finish() knows whether more data follows
        full = (len(view) - 1) // LEAF_SIZE if view else 0
        append = self._leaf_hashes.append
        for i in range(full):
            append(hash_leaf(view[i * LEAF_SIZE:(i + 1) * LEAF_SIZE]))
        if view:
            self._pending += view[full * LEAF_SIZE:]

    def finish(self) -> MerkleTree:
        hashes = self._leaf_hashes + [hash_leaf(self._pending)]
        if self._size > 0 and not self._pending:
            hashes.pop()
        return MerkleTree.from_leaf_hashes(self._size, hashes)


@dataclass(frozen=True)
class HashedChunk:
    """Bytes at some offset of a share, with the hashes of the whole leaves inside already computed.

    Lets a worker thread hash most of an encoder's block (``hash_chunk``) while the thread that feeds a
    RootBuilder in share order handles only ``head`` (the end of the leaf that straddles the chunk's start) and
    ``tail`` (the start of the leaf that straddles its end).
    """

    head: bytes
    leaf_hashes: tuple[bytes, ...]
    tail: bytes

    @property
    def size(self) -> int:
        return len(self.head) + LEAF_SIZE * len(self.leaf_hashes) + len(self.tail)


def hash_chunk(offset: int, data: bytes | memoryview) -> HashedChunk:
    """Split ``data`` (share bytes starting at ``offset``) at leaf boundaries and hash the whole leaves."""
    if offset < 0:
        raise ValueError("offset must be >= 0")
    view = memoryview(data)
    end = offset + len(view)
    first = min(-(-offset // LEAF_SIZE) * LEAF_SIZE, end)  # first leaf boundary at or after offset
    last = max(first, end // LEAF_SIZE * LEAF_SIZE)  # last leaf boundary at or before end
    hashes = tuple(hash_leaf(view[at - offset:at - offset + LEAF_SIZE]) for at in range(first, last, LEAF_SIZE))
    return HashedChunk(bytes(view[:first - offset]), hashes, bytes(view[last - offset:]))


class RootBuilder:
    """Just the root of a share's tree, from bytes fed in any chunking, in O(log size) memory.

    TreeBuilder keeps every leaf hash (about 2.5% of the share in Python objects), which a client encoding a
    many-GiB file into n shares cannot afford. Level-by-level pairing with odd promotion gives the same tree as
    folding the perfect subtrees of a binary counter from the right, so a stack of at most log2(leaves) hashes
    suffices.
    """

    def __init__(self) -> None:
        self._size = 0
        self._pending = bytearray()
        self._stack: list[tuple[int, bytes]] = []  # (height, hash) of perfect subtrees, heights strictly falling

    @property
    def size(self) -> int:
        return self._size

    def _push(self, digest: bytes) -> None:
        height = 0
        while self._stack and self._stack[-1][0] == height:
            digest = hash_node(self._stack.pop()[1], digest)
            height += 1
        self._stack.append((height, digest))

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        self._size += len(view)
        if self._pending:
            take = min(LEAF_SIZE - len(self._pending), len(view))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < LEAF_SIZE:
                return
            self._push(hash_leaf(self._pending))
            self._pending.clear()
        full = len(view) // LEAF_SIZE
        for i in range(full):
            self._push(hash_leaf(view[i * LEAF_SIZE:(i + 1) * LEAF_SIZE]))
        self._pending += view[full * LEAF_SIZE:]

    def update_hashed(self, chunk: HashedChunk) -> None:
        """Same as ``update`` with the chunk's bytes, whose whole leaves were hashed elsewhere (``hash_chunk``)."""
        if chunk.leaf_hashes:
            if (self._size + len(chunk.head)) % LEAF_SIZE:
                raise ValueError("chunk's leaf hashes do not start at a leaf boundary of this share")
            self.update(chunk.head)
            for digest in chunk.leaf_hashes:
                self._push(digest)
            self._size += LEAF_SIZE * len(chunk.leaf_hashes)
        else:
            self.update(chunk.head)
        self.update(chunk.tail)

    def finish(self) -> bytes:
        """The root (as MerkleTree.root would give for the same bytes); the builder must not be used after."""
        if self._pending or self._size == 0:
            self._push(hash_leaf(self._pending))
            self._pending.clear()
        top = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            top = hash_node(left, top)
        return hash_root(self._size, top)


def verify_range(root: bytes, size: int, first: int, leaves: Sequence[bytes | memoryview],
                 proof: Sequence[bytes]) -> None:
    """Check that ``leaves`` are leaves [first, first + len(leaves)) of the share with this root and size.

    Raises IntegrityError naming what is wrong; returns None when the range is proven.
    """
    count = leaf_count(size)
    span = len(leaves)
    if span < 1 or first < 0 or first + span > count:
        raise IntegrityError(f"leaf range {first}+{span} outside a share of {count} leaves")
    for offset, leaf in enumerate(leaves):
        expected = leaf_length(size, first + offset)
        if len(leaf) != expected:
            raise IntegrityError(f"leaf {first + offset} has {len(leaf)} bytes, expected {expected}")
    needed = range_proof_positions(count, first, span)
    if len(proof) != len(needed) or any(len(h) != HASH_BYTES for h in proof):
        raise IntegrityError(f"proof must hold {len(needed)} hashes of {HASH_BYTES} bytes")
    level_hashes = [hash_leaf(leaf) for leaf in leaves]
    take = iter(proof).__next__
    lo, hi = first, first + span - 1
    for width in level_widths(count)[:-1]:
        if lo % 2 == 1:
            level_hashes.insert(0, take())
            lo -= 1
        if hi % 2 == 0 and hi + 1 < width:
            level_hashes.append(take())
            hi += 1
        above = [hash_node(level_hashes[i], level_hashes[i + 1]) for i in range(0, len(level_hashes) - 1, 2)]
        if len(level_hashes) % 2:
            above.append(level_hashes[-1])
        level_hashes = above
        lo, hi = lo // 2, hi // 2
    if hash_root(size, level_hashes[0]) != root:
        raise IntegrityError("Merkle proof does not lead to the expected root: data or proof was altered")


def read_range_proof(count: int, first: int, span: int,
                     read_hash: Callable[[int, int], bytes]) -> list[bytes]:
    """A proof built by reading single hashes (``read_hash(level, position)``), e.g. from a tree file."""
    return [read_hash(level, pos) for level, pos in range_proof_positions(count, first, span)]

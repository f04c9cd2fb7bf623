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

Runs of whole leaves (and levels of inner nodes) are hashed by ``hash_leaves``/``hash_pairs``: one call into the
optional C accelerator ``_leafhash`` (OpenSSL's SHA-256 with the GIL released once per call, so two threads
hash on two cores) when it was built, else the same hashes from hashlib, one leaf at a time.

Builders: ``TreeBuilder`` holds the whole tree in memory (small shares, tests); ``TreeFileWriter`` writes the
storage node's tree file and ``TreeFileChecker`` checks one, both in a few MiB whatever the share size;
``RootBuilder`` computes just the root in O(log size) memory.
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


def _split(digests: bytes) -> list[bytes]:
    return [digests[i:i + HASH_BYTES] for i in range(0, len(digests), HASH_BYTES)]


def _hash_leaves_py(data: bytes | bytearray | memoryview) -> list[bytes]:
    view = memoryview(data)
    return [hash_leaf(view[at:at + LEAF_SIZE]) for at in range(0, len(view), LEAF_SIZE)]


def _hash_pairs_py(level: Sequence[bytes]) -> list[bytes]:
    return [hash_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]


try:
    from . import _leafhash  # type: ignore[attr-defined]  # C accelerator, built when a compiler is at hand
except ImportError:  # pragma: no cover - depends on the build
    _leafhash = None

ACCELERATED = _leafhash is not None
_C_MIN_PAIRS = 8  # below this, the call costs more than it saves


def hash_leaves(data: bytes | bytearray | memoryview) -> list[bytes]:
    """The leaf hashes of ``data``, a whole number of full leaves (each LEAF_SIZE bytes)."""
    if len(data) % LEAF_SIZE:
        raise ValueError(f"{len(data)} bytes is not a whole number of {LEAF_SIZE}-byte leaves")
    if _leafhash is None or not len(data):
        return _hash_leaves_py(data)
    return _split(_leafhash.hash_leaves(data, LEAF_SIZE, _LEAF[0]))


def hash_pairs(level: Sequence[bytes]) -> list[bytes]:
    """``hash_node`` of each adjacent pair of ``level`` (a trailing odd hash is left to the caller)."""
    if _leafhash is None or len(level) < 2 * _C_MIN_PAIRS:
        return _hash_pairs_py(level)
    pairs = len(level) // 2
    return _split(_leafhash.hash_pairs(b"".join(level[:2 * pairs]), _NODE[0]))


def _leaf_digests(data: bytes | bytearray | memoryview) -> bytes:
    """``hash_leaves`` as one concatenated bytes object: no Python object per hash."""
    if _leafhash is None or not len(data):
        return b"".join(_hash_leaves_py(data))
    return bytes(_leafhash.hash_leaves(data, LEAF_SIZE, _LEAF[0]))


def _pair_digests(level: bytes | bytearray | memoryview) -> bytes:
    """``hash_pairs`` of concatenated hashes (an even number of them), concatenated."""
    if _leafhash is None or len(level) < 2 * HASH_BYTES * _C_MIN_PAIRS:
        return b"".join(_hash_pairs_py(_split(bytes(level))))
    return bytes(_leafhash.hash_pairs(level, _NODE[0]))


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
            above = hash_pairs(below)
            if len(below) % 2:
                above.append(below[-1])
            levels.append(tuple(above))
        return cls(size, tuple(levels))

    @classmethod
    def from_data(cls, data: bytes | memoryview) -> MerkleTree:
        whole = len(data) // LEAF_SIZE * LEAF_SIZE if len(data) % LEAF_SIZE else max(0, len(data) - LEAF_SIZE)
        view = memoryview(data)
        return cls.from_leaf_hashes(len(data), hash_leaves(view[:whole]) + [hash_leaf(view[whole:])])

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


class _LeafFeeder:
    """Bytes fed in any chunking, cut into leaves: whole leaves go to ``_add`` as hashes, a partial one waits."""

    def __init__(self) -> None:
        self._size = 0
        self._pending = bytearray()

    @property
    def size(self) -> int:
        return self._size

    def _add(self, digests: bytes) -> None:
        """Take the next leaves' hashes, concatenated (32 bytes each)."""
        raise NotImplementedError

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        self._size += len(view)
        if self._pending:
            take = min(LEAF_SIZE - len(self._pending), len(view))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < LEAF_SIZE:
                return
            self._add(hash_leaf(self._pending))
            self._pending.clear()
        full = len(view) // LEAF_SIZE
        if full:
            self._add(_leaf_digests(view[:full * LEAF_SIZE]))
        self._pending += view[full * LEAF_SIZE:]

    def _take_last_leaf(self) -> bytes:
        """The hash of the final partial leaf (or of an empty share's one empty leaf), or b"" if there is none."""
        last = hash_leaf(self._pending) if self._pending or self._size == 0 else b""
        self._pending.clear()
        return last


class TreeBuilder(_LeafFeeder):
    """Computes a share's whole Merkle tree in memory from bytes fed in any chunking.

    About 150 bytes of Python objects per leaf, over 400 at the peak while the levels are built: for small shares
    and tests. A storage node writes and checks its tree files with TreeFileWriter and TreeFileChecker instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self._leaf_hashes: list[bytes] = []

    def _add(self, digests: bytes) -> None:
        self._leaf_hashes += _split(digests)

    def finish(self) -> MerkleTree:
        return MerkleTree.from_leaf_hashes(self._size, self._leaf_hashes + _split(self._take_last_leaf()))


TREE_CHUNK_HASHES = 1 << 16
"""Hashes (2 MiB) a TreeFileWriter or TreeFileChecker holds at a time: its memory, whatever the share size."""

ReadAt = Callable[[int, int], bytes]
"""``read_at(offset, length)``: exactly ``length`` bytes of a tree file from ``offset`` (raises if it cannot)."""
WriteAt = Callable[[int, bytes | bytearray], None]
"""``write_at(offset, data)``: all of ``data`` into a tree file at ``offset`` (``data`` is not kept)."""


def tree_hash_count(size: int) -> int:
    """Hashes in the tree file of a share of ``size`` bytes (every level)."""
    return sum(level_widths(leaf_count(size)))


def _fold_upper_levels(count: int, read_at: ReadAt, emit: WriteAt) -> None:
    """Levels 1 and up of a tree of ``count`` leaves, each computed from the level below as read from the tree file.

    Works TREE_CHUNK_HASHES hashes at a time (an even number, so only a level's last chunk can end on an unpaired
    hash, promoted as is). ``emit(offset, hashes)`` gets each computed run at its place in the file before the
    next level reads it back: a writer writes it there, a checker compares it with what is there.
    """
    widths, offsets = level_widths(count), level_offsets(count)
    for level in range(len(widths) - 1):
        below, above = offsets[level] * HASH_BYTES, offsets[level + 1] * HASH_BYTES
        for first in range(0, widths[level], TREE_CHUNK_HASHES):
            span = min(TREE_CHUNK_HASHES, widths[level] - first)
            chunk = memoryview(read_at(below + first * HASH_BYTES, span * HASH_BYTES))
            paired = span // 2 * 2 * HASH_BYTES
            out = _pair_digests(chunk[:paired]) + chunk[paired:]
            emit(above, out)
            above += len(out)


class TreeFileWriter(_LeafFeeder):
    """Writes a share's tree file (``MerkleTree.to_bytes``) while the share's bytes are fed, in bounded memory.

    TreeBuilder holds every leaf hash and then every level as Python objects, over 400 bytes per 4 KiB leaf at
    its peak (measured: 220 MiB for a 2 GiB share). This writes level 0 out every TREE_CHUNK_HASHES hashes and
    at ``finish`` folds each level above from the level below read back from the file, so it holds a few MiB
    at most, whatever the size. The file's bytes and the root are TreeBuilder's, byte for byte.
    """

    def __init__(self, read_at: ReadAt, write_at: WriteAt) -> None:
        super().__init__()
        self._read_at = read_at
        self._write_at = write_at
        self._buffer = bytearray()  # level 0 hashes not written yet
        self._written = 0  # bytes of level 0 already in the file

    def _add(self, digests: bytes) -> None:
        self._buffer += digests
        if len(self._buffer) >= TREE_CHUNK_HASHES * HASH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._write_at(self._written, self._buffer)
            self._written += len(self._buffer)
            self._buffer.clear()

    def finish(self) -> bytes:
        """Write the rest of the tree; its root (as MerkleTree.root). The writer must not be used after."""
        self._add(self._take_last_leaf())
        self._flush()
        _fold_upper_levels(leaf_count(self._size), self._read_at, self._write_at)
        return hash_root(self._size, self._read_at((tree_hash_count(self._size) - 1) * HASH_BYTES, HASH_BYTES))


class _Mismatch(Exception):
    """A computed run of hashes differs from the stored tree file (ends a TreeFileChecker's fold early)."""


class TreeFileChecker(_LeafFeeder):
    """Checks a stored tree file against the share's bytes, fed in any chunking, in bounded memory (the scrub).

    Level 0 is compared with the file TREE_CHUNK_HASHES hashes at a time as leaves complete; then each level above
    is computed from the stored level below (by then known equal to the computed one) and compared with the
    stored level, chunk by chunk: neither the file nor the tree is ever held whole. The caller checks that the
    file is ``HASH_BYTES * tree_hash_count(size)`` bytes long (a longer file would pass here).
    """

    def __init__(self, size: int, read_at: ReadAt) -> None:
        super().__init__()
        self._expected_size = size
        self._read_at = read_at
        self._buffer = bytearray()  # level 0 hashes not compared yet
        self._checked = 0  # bytes of level 0 already compared
        self._matches = True

    def _add(self, digests: bytes) -> None:
        self._buffer += digests
        if len(self._buffer) >= TREE_CHUNK_HASHES * HASH_BYTES:
            self._compare_level_0()

    def _compare_level_0(self) -> None:
        end = self._checked + len(self._buffer)
        if self._matches and self._buffer:  # past the expected level 0 the bytes fed are too many: no match
            self._matches = (end <= HASH_BYTES * leaf_count(self._expected_size)
                             and self._read_at(self._checked, len(self._buffer)) == self._buffer)
        self._checked = end
        self._buffer.clear()

    def _compare(self, offset: int, data: bytes | bytearray) -> None:
        if self._read_at(offset, len(data)) != data:
            raise _Mismatch

    def finish(self) -> bytes | None:
        """The root if the bytes fed were ``size`` bytes and the file holds exactly their tree, else None."""
        self._add(self._take_last_leaf())
        self._compare_level_0()
        if not self._matches or self._size != self._expected_size:
            return None
        try:
            _fold_upper_levels(leaf_count(self._size), self._read_at, self._compare)
        except _Mismatch:
            return None
        return hash_root(self._size, self._read_at((tree_hash_count(self._size) - 1) * HASH_BYTES, HASH_BYTES))


@dataclass(frozen=True)
class HashedChunk:
    """Bytes at some offset of a share, with the whole leaves inside already hashed and folded.

    Lets a worker thread hash most of an encoder's block (``hash_chunk``) while the thread that feeds a
    RootBuilder in share order handles only ``head`` (the end of the leaf that straddles the chunk's start),
    ``tail`` (the start of the leaf that straddles its end) and a few ``subtrees``: (height, root) of the
    perfect, aligned subtrees that tile the whole leaves in between, largest first where alignment allows (the
    same pieces a binary counter of leaves is made of, so RootBuilder merges each in one step).
    """

    head: bytes
    subtrees: tuple[tuple[int, bytes], ...]
    tail: bytes

    @property
    def leaves(self) -> int:
        return sum(1 << height for height, _ in self.subtrees)

    @property
    def size(self) -> int:
        return len(self.head) + LEAF_SIZE * self.leaves + len(self.tail)


def _fold_perfect(level: bytes) -> bytes:
    """The root of a perfect subtree from its 2**h concatenated leaf hashes."""
    while len(level) > HASH_BYTES:
        if _leafhash is not None and len(level) >= 4 * HASH_BYTES:
            level = _leafhash.hash_pairs(level, _NODE[0])
        else:
            level = b"".join(_hash_pairs_py(_split(level)))
    return level


def aligned_subtrees(first: int, end: int) -> Iterator[tuple[int, int]]:
    """(leaf index, height) of the maximal aligned perfect subtrees tiling leaves [first, end)."""
    at = first
    while at < end:
        height = (at & -at).bit_length() - 1 if at else (end - at).bit_length()
        while at + (1 << height) > end:
            height -= 1
        yield at, height
        at += 1 << height


def hash_chunk(offset: int, data: bytes | bytearray | memoryview) -> HashedChunk:
    """Split ``data`` (share bytes starting at ``offset``) at leaf boundaries; hash and fold the whole leaves."""
    if offset < 0:
        raise ValueError("offset must be >= 0")
    view = memoryview(data)
    end = offset + len(view)
    first = min(-(-offset // LEAF_SIZE) * LEAF_SIZE, end)  # first leaf boundary at or after offset
    last = max(first, end // LEAF_SIZE * LEAF_SIZE)  # last leaf boundary at or before end
    whole = view[first - offset:last - offset]
    if _leafhash is not None and len(whole):
        digests = _leafhash.hash_leaves(whole, LEAF_SIZE, _LEAF[0])
    else:
        digests = b"".join(_hash_leaves_py(whole))
    base = first // LEAF_SIZE
    subtrees = tuple((height, _fold_perfect(digests[(at - base) * HASH_BYTES:(at - base + (1 << height)) * HASH_BYTES]))
                     for at, height in aligned_subtrees(base, last // LEAF_SIZE))
    return HashedChunk(bytes(view[:first - offset]), subtrees, bytes(view[last - offset:]))


class RootBuilder(_LeafFeeder):
    """Just the root of a share's tree, from bytes fed in any chunking, in O(log size) memory.

    TreeBuilder keeps every leaf hash (about 2.5% of the share in Python objects), which a client encoding a
    many-GiB file into n shares cannot afford. Level-by-level pairing with odd promotion gives the same tree as
    folding the perfect subtrees of a binary counter from the right, so a stack of at most log2(leaves) hashes
    suffices.
    """

    def __init__(self) -> None:
        super().__init__()
        self._stack: list[tuple[int, bytes]] = []  # (height, hash) of perfect subtrees, heights strictly falling

    def _push(self, digest: bytes, height: int = 0) -> None:
        """Add a perfect subtree of 2**height leaves; the leaves so far must be a multiple of 2**height."""
        while self._stack and self._stack[-1][0] == height:
            digest = hash_node(self._stack.pop()[1], digest)
            height += 1
        self._stack.append((height, digest))

    def _add(self, digests: bytes) -> None:
        for at in range(0, len(digests), HASH_BYTES):
            self._push(digests[at:at + HASH_BYTES])

    def update_hashed(self, chunk: HashedChunk) -> None:
        """Same as ``update`` with the chunk's bytes, whose whole leaves were hashed elsewhere (``hash_chunk``)."""
        if chunk.subtrees:
            if (self._size + len(chunk.head)) % LEAF_SIZE:
                raise ValueError("chunk's leaf hashes do not start at a leaf boundary of this share")
            self.update(chunk.head)
            for height, digest in chunk.subtrees:
                if (self._size // LEAF_SIZE) % (1 << height):
                    raise ValueError("chunk was hashed for another offset of the share")
                self._push(digest, height)
                self._size += LEAF_SIZE << height
        else:
            self.update(chunk.head)
        self.update(chunk.tail)

    def finish(self) -> bytes:
        """The root (as MerkleTree.root would give for the same bytes); the builder must not be used after."""
        self._add(self._take_last_leaf())
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
    _climb(root, size, first, [hash_leaf(leaf) for leaf in leaves], proof)


def verify_run(root: bytes, size: int, first: int, span: int, data: bytes | bytearray | memoryview,
               proof: Sequence[bytes]) -> None:
    """``verify_range`` for leaves [first, first + span) given as one contiguous buffer (a node's range reply).

    Hashes the whole leaves in one run (the C accelerator when built) instead of one call per leaf. A buffer
    of any other length than those leaves' fails, so a shorter, validly proven prefix cannot pass for the run.
    """
    count = leaf_count(size)
    view = memoryview(data)
    if span < 1 or first < 0 or first + span > count:
        raise IntegrityError(f"leaf range {first}+{span} outside a share of {count} leaves")
    expected = LEAF_SIZE * (span - 1) + leaf_length(size, first + span - 1)
    if len(view) != expected:
        raise IntegrityError(f"leaves {first}+{span} have {len(view)} bytes, expected {expected}")
    whole = LEAF_SIZE * (span - 1)
    _climb(root, size, first, hash_leaves(view[:whole]) + [hash_leaf(view[whole:])], proof)


def _climb(root: bytes, size: int, first: int, level_hashes: list[bytes], proof: Sequence[bytes]) -> None:
    """From the hashes of leaves [first, first + len(level_hashes)) and the proof up to the root, or raise."""
    count, span = leaf_count(size), len(level_hashes)
    needed = range_proof_positions(count, first, span)
    if len(proof) != len(needed) or any(len(h) != HASH_BYTES for h in proof):
        raise IntegrityError(f"proof must hold {len(needed)} hashes of {HASH_BYTES} bytes")
    take = iter(proof).__next__
    lo, hi = first, first + span - 1
    for width in level_widths(count)[:-1]:
        if lo % 2 == 1:
            level_hashes.insert(0, take())
            lo -= 1
        if hi % 2 == 0 and hi + 1 < width:
            level_hashes.append(take())
            hi += 1
        above = hash_pairs(level_hashes)
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

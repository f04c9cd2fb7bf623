"""k-of-n erasure coding of sealed segments with zfec.

zfec (the Reed-Solomon coder Tahoe-LAFS has used for over a decade) is chosen over a hand-written coder: it is
fast C, releases the GIL while coding (so two segments code on two cores), and its output for given (k, n) is
fixed, which lets a mediator rebuild a lost share byte for byte without the key.

A sealed segment of length C is cut into k primary blocks of ``ceil(C / k)`` bytes (the last zero-filled);
zfec adds n - k parity blocks. Block i of every segment, concatenated, is share i of the object.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import zfec

from .errors import ErasureError, PolicyError

MAX_SHARES = 256
DEFAULT_MIN_EXPANSION = 2.0


@dataclass(frozen=True)
class ErasureParams:
    """Any ``k`` of ``n`` shares rebuild an object (1 <= k < n <= 256)."""

    k: int
    n: int

    def __post_init__(self) -> None:
        if not (isinstance(self.k, int) and isinstance(self.n, int)):
            raise ErasureError("k and n must be integers")
        if not 1 <= self.k < self.n <= MAX_SHARES:
            raise ErasureError(f"need 1 <= k < n <= {MAX_SHARES}; got k={self.k}, n={self.n}")

    @property
    def expansion(self) -> float:
        return self.n / self.k

    def check_redundancy(self, min_expansion: float = DEFAULT_MIN_EXPANSION) -> None:
        """Refuse parameters that store less than ``min_expansion`` times the data (never below 2x)."""
        min_expansion = max(min_expansion, DEFAULT_MIN_EXPANSION)
        if self.n < min_expansion * self.k:
            raise PolicyError(
                f"redundancy {self.k}-of-{self.n} stores {self.expansion:.2f}x the data; at least "
                f"{min_expansion:g}x is required (for k={self.k} use n >= {_ceil_mul(self.k, min_expansion)})"
            )


def _ceil_mul(k: int, factor: float) -> int:
    value = k * factor
    return int(value) if value == int(value) else int(value) + 1


def block_length(sealed_length: int, k: int) -> int:
    """Bytes of each of the n blocks a sealed segment of ``sealed_length`` bytes becomes."""
    return max(1, -(-sealed_length // k))


@lru_cache(maxsize=64)
def _encoder(k: int, n: int) -> zfec.Encoder:
    return zfec.Encoder(k, n)


@lru_cache(maxsize=64)
def _decoder(k: int, n: int) -> zfec.Decoder:
    return zfec.Decoder(k, n)


def encode_segment(params: ErasureParams, sealed: bytes) -> list[bytes]:
    """The n blocks of one sealed segment, block i for share i."""
    return [bytes(b) for b in encode_segment_views(params, sealed)]


def encode_segment_views(params: ErasureParams, sealed: bytes | memoryview) -> list[bytes | memoryview]:
    """``encode_segment`` without copying: the primary blocks are views into ``sealed`` where they fit whole.

    For pipelines that write and hash the blocks at once: copying the segment into fresh buffers, and having
    zfec return the k primary blocks it was given, cost as much time as the parity itself.
    """
    k, n = params.k, params.n
    size = block_length(len(sealed), k)
    view = memoryview(sealed).cast("B")
    whole = min(k, len(view) // size)
    blocks: list[bytes | memoryview] = [view[i * size:(i + 1) * size] for i in range(whole)]
    if whole < k:
        rest = bytes(view[whole * size:])
        blocks.append(rest + bytes(size - len(rest)))
        blocks.extend(bytes(size) for _ in range(k - whole - 1))
    blocks.extend(_encoder(k, n).encode(blocks, list(range(k, n))))
    return blocks


def decode_segment(params: ErasureParams, blocks: Mapping[int, bytes], sealed_length: int) -> bytes:
    """Rebuild a sealed segment from any k of its blocks (keys: block numbers)."""
    if len(blocks) < params.k:
        raise ErasureError(f"need {params.k} blocks to rebuild a segment, have {len(blocks)}")
    size = block_length(sealed_length, params.k)
    nums = sorted(blocks)[: params.k]
    for num in nums:
        if not 0 <= num < params.n:
            raise ErasureError(f"block number {num} outside 0..{params.n - 1}")
        if len(blocks[num]) != size:
            raise ErasureError(f"block {num} has {len(blocks[num])} bytes, expected {size}")
    if nums == list(range(params.k)):
        primary: Sequence[bytes] = [blocks[i] for i in nums]
    else:
        primary = _decoder(params.k, params.n).decode(tuple(blocks[i] for i in nums), tuple(nums))
    return b"".join(primary)[:sealed_length]


def rebuild_blocks(params: ErasureParams, blocks: Mapping[int, bytes], sealed_length: int,
                   wanted: Sequence[int]) -> dict[int, bytes]:
    """Recreate the blocks numbered ``wanted`` from any k others (repair: no key needed)."""
    sealed = decode_segment(params, blocks, sealed_length)
    all_blocks = encode_segment(params, sealed)
    return {i: all_blocks[i] for i in wanted}

"""k-of-n erasure coding of sealed segments with zfec.

zfec (the Reed-Solomon coder Tahoe-LAFS has used for over a decade) is chosen over a hand-written coder: it is
fast C, releases the GIL while coding (so two segments code on two cores), and its output for given (k, n) is
fixed, which lets a mediator rebuild a lost share byte for byte without the key.

A sealed segment of length C is cut into k primary blocks of ``ceil(C / k)`` bytes (the last zero-filled);
zfec adds n - k parity blocks. Block i of every segment, concatenated, is share i of the object.

Speed: zfec multiplies one byte at a time through a table (~500-600 MB/s of segment here): a quarter of an
upload's CPU on two cores. Where the optional C module ``_gf256`` is built and the CPU has AVX2, parity and
decoding are computed with it instead (~3.3 GB/s: 32 bytes per pair of table shuffles), using coefficients
read off zfec itself (its parity for unit inputs; coding is linear), so every block is zfec's byte for byte;
property tests compare the two on random data. zfec stays the reference and the fallback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import zfec

from .errors import ErasureError, PolicyError

try:
    from . import _gf256
except ImportError:  # not built: zfec does all the coding
    _gf256 = None  # type: ignore[assignment]  # (typed by _gf256.pyi)

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


def accelerated() -> bool:
    """Whether coding uses the AVX2 module (else zfec)."""
    return _gf256 is not None and _gf256.accelerated()


_FAST = accelerated()


def _gf_tables() -> tuple[list[int], list[int]]:
    """exp and log tables of GF(2^8) with zfec's polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d)."""
    exp, log = [0] * 510, [0] * 256
    x = 1
    for i in range(255):
        exp[i] = exp[i + 255] = x
        log[x] = i
        x = (x << 1) ^ (0x11D if x & 0x80 else 0)
    return exp, log


_EXP, _LOG = _gf_tables()


def _mul(a: int, b: int) -> int:
    return 0 if a == 0 or b == 0 else _EXP[_LOG[a] + _LOG[b]]


@lru_cache(maxsize=64)
def _parity_rows(k: int, n: int) -> tuple[bytes, ...]:
    """Row r: the coefficients of parity block k + r over the k primary blocks, as zfec computes them."""
    out = [_encoder(k, n).encode([bytes([int(i == j)]) for i in range(k)], list(range(k, n))) for j in range(k)]
    return tuple(bytes(out[j][r][0] for j in range(k)) for r in range(n - k))


def _invert(matrix: list[list[int]]) -> list[list[int]]:
    """The inverse of a square matrix over GF(2^8) (Gauss-Jordan); ErasureError if it is singular."""
    size = len(matrix)
    rows = [list(row) + [int(i == j) for j in range(size)] for i, row in enumerate(matrix)]
    for col in range(size):
        pivot = next((r for r in range(col, size) if rows[r][col]), None)
        if pivot is None:
            raise ErasureError("these blocks do not determine the segment")
        rows[col], rows[pivot] = rows[pivot], rows[col]
        inverse = _EXP[255 - _LOG[rows[col][col]]]
        rows[col] = [_mul(inverse, v) for v in rows[col]]
        for r in range(size):
            if r != col and rows[r][col]:
                factor = rows[r][col]
                rows[r] = [v ^ _mul(factor, p) for v, p in zip(rows[r], rows[col], strict=True)]
    return [row[size:] for row in rows]


@lru_cache(maxsize=256)
def _recovery_rows(k: int, n: int, nums: tuple[int, ...]) -> tuple[tuple[int, ...], bytes]:
    """(primary blocks missing from ``nums``, the rows that rebuild them from the blocks ``nums``)."""
    parity = _parity_rows(k, n)
    coding = [[int(num == j) for j in range(k)] if num < k else list(parity[num - k]) for num in nums]
    inverse = _invert(coding)
    missing = tuple(i for i in range(k) if i not in nums)
    return missing, bytes(v for i in missing for v in inverse[i])


def _decode_fast(k: int, n: int, blocks: Mapping[int, bytes], nums: list[int]) -> list[bytes]:
    missing, rows = _recovery_rows(k, n, tuple(nums))
    rebuilt = dict(zip(missing, _gf256.combine(rows, [blocks[num] for num in nums]), strict=True))
    return [blocks[i] if i in blocks else rebuilt[i] for i in range(k)]


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
    if _FAST:
        blocks.extend(_gf256.combine(b"".join(_parity_rows(k, n)), blocks))
    else:
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
    elif _FAST:
        primary = _decode_fast(params.k, params.n, {i: blocks[i] for i in nums}, nums)
    else:
        primary = _decoder(params.k, params.n).decode(tuple(blocks[i] for i in nums), tuple(nums))
    keep = sealed_length - size * (params.k - 1)  # bytes of the last block that are data, not padding
    if keep <= 0:  # a tiny segment: whole blocks are padding
        return b"".join(primary)[:sealed_length]
    # one copy, of exactly the segment (joining then slicing made two fresh 1 MiB objects)
    return b"".join([*primary[:-1], memoryview(primary[-1])[:keep]])


def rebuild_blocks(params: ErasureParams, blocks: Mapping[int, bytes], sealed_length: int,
                   wanted: Sequence[int]) -> dict[int, bytes]:
    """Recreate the blocks numbered ``wanted`` from any k others (repair: no key needed)."""
    sealed = decode_segment(params, blocks, sealed_length)
    all_blocks = encode_segment(params, sealed)
    return {i: all_blocks[i] for i in wanted}

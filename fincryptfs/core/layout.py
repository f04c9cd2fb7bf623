"""Where every byte of an object lives: segments, sealed lengths, blocks and share offsets.

An object is described by four public numbers (the padded plaintext size P, the segment size S, k and n),
which mediators and storage nodes may know: they reveal no more than the share sizes already do. From them
every offset is arithmetic, so a reader can fetch exactly the share bytes one segment needs, and a mediator
can rebuild a share segment by segment without holding a whole object in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from .crypto import TAG_BYTES
from .erasure import ErasureParams, block_length
from .errors import ErasureError, RemoteProtocolError

MIN_SEGMENT_SIZE = 4096
MAX_SEGMENT_SIZE = 64 * 2**20
DEFAULT_SEGMENT_SIZE = 2 * 2**20
MAX_PADDED_SIZE = 2**50  # 1 PiB: far above any file, far below integer trouble


@dataclass(frozen=True)
class ObjectLayout:
    padded_size: int
    segment_size: int
    k: int
    n: int

    def __post_init__(self) -> None:
        for name in ("padded_size", "segment_size", "k", "n"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise RemoteProtocolError(f"layout field {name} must be an integer")
        if not 0 < self.padded_size <= MAX_PADDED_SIZE:
            raise RemoteProtocolError(f"padded size must be 1..{MAX_PADDED_SIZE}, got {self.padded_size}")
        if not MIN_SEGMENT_SIZE <= self.segment_size <= MAX_SEGMENT_SIZE:
            raise RemoteProtocolError(
                f"segment size must be {MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE}, got {self.segment_size}"
            )
        try:
            ErasureParams(self.k, self.n)
        except ErasureError as exc:  # a layout usually comes from a peer: answer 400, not an internal error
            raise RemoteProtocolError(f"layout: {exc}") from exc

    @property
    def params(self) -> ErasureParams:
        return ErasureParams(self.k, self.n)

    @property
    def segment_count(self) -> int:
        return -(-self.padded_size // self.segment_size)

    def plain_length(self, index: int) -> int:
        """Plaintext bytes in segment ``index`` (all full but the last)."""
        self._check_index(index)
        if index < self.segment_count - 1:
            return self.segment_size
        return self.padded_size - self.segment_size * (self.segment_count - 1)

    def sealed_length(self, index: int) -> int:
        return self.plain_length(index) + TAG_BYTES

    def block_length(self, index: int) -> int:
        return block_length(self.sealed_length(index), self.k)

    def block_offset(self, index: int) -> int:
        """Offset of segment ``index``'s block within every share."""
        self._check_index(index)
        return index * block_length(self.segment_size + TAG_BYTES, self.k)

    @property
    def share_size(self) -> int:
        last = self.segment_count - 1
        return self.block_offset(last) + self.block_length(last)

    def is_last(self, index: int) -> bool:
        return index == self.segment_count - 1

    def segments_for_range(self, offset: int, length: int) -> range:
        """Segment indices holding plaintext bytes [offset, offset + length) of the padded stream."""
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        end = min(offset + length, self.padded_size)
        if end <= offset:
            return range(0)
        return range(offset // self.segment_size, (end - 1) // self.segment_size + 1)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.segment_count:
            raise IndexError(f"segment {index} outside 0..{self.segment_count - 1}")

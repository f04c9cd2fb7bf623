"""An object's whole write and read path for one segment: pad, seal, erasure-code — and back.

These are the only functions the client's pipelines call per segment, so the byte layout lives in one place.
They are pure and stateless: callers run them in worker threads (AES-GCM, zfec and SHA-256 release the GIL)
and stream segment by segment, so memory is bounded by the segment size whatever the file size.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping

from .crypto import open_segment, seal_segment
from .erasure import decode_segment, encode_segment_views
from .layout import ObjectLayout
from .padding import TRAILER_BYTES, padded_length


def plan_object(data_length: int, segment_size: int, k: int, n: int) -> ObjectLayout:
    """The layout of an object that stores ``data_length`` bytes of file data."""
    return ObjectLayout(padded_length(data_length), segment_size, k, n)


def padded_segments(layout: ObjectLayout, data_length: int, read: Callable[[int, int], bytes]
                    ) -> Iterator[bytes]:
    """Plaintext of every segment of the padded stream; ``read(offset, size)`` returns file data.

    The zeros and trailer that follow the data are made a segment at a time: Padmé may add hundreds of MiB
    to a large file, and memory must stay bounded by the segment size.
    """
    for index in range(layout.segment_count):
        yield segment_plaintext(layout, data_length, index, read)


def segment_plaintext(layout: ObjectLayout, data_length: int, index: int, read: Callable[[int, int], bytes]
                      ) -> bytes:
    """Plaintext of segment ``index`` alone (as ``padded_segments`` yields it), for pipelines that work out
    of order; OSError if ``read`` comes back short (the file shrank)."""
    if layout.padded_size != padded_length(data_length):
        raise ValueError(f"layout holds {layout.padded_size} padded bytes; {data_length} bytes of data need "
                         f"{padded_length(data_length)}")
    trailer_start = layout.padded_size - TRAILER_BYTES
    start = index * layout.segment_size
    end = start + layout.plain_length(index)
    parts = []
    if start < data_length:
        chunk = read(start, min(end, data_length) - start)
        if len(chunk) != min(end, data_length) - start:
            raise OSError(f"file shrank while being read (wanted {min(end, data_length) - start} bytes "
                          f"at offset {start}, got {len(chunk)})")
        parts.append(chunk)
    zeros_end = min(end, trailer_start)
    if zeros_end > max(start, data_length):
        parts.append(bytes(zeros_end - max(start, data_length)))
    if end > trailer_start:  # a segment may end inside the trailer: take only the part within this segment
        parts.append(struct.pack(">Q", data_length)[max(start, trailer_start) - trailer_start:end - trailer_start])
    return parts[0] if len(parts) == 1 else b"".join(parts)


def encode_segment_blocks(file_key: bytes, object_id: str, layout: ObjectLayout, index: int,
                          plaintext: bytes) -> list[bytes | memoryview]:
    """Seal segment ``index`` and cut it into the n blocks that extend the n shares.

    Blocks may be views into the sealed segment (no copy): write or hash them, ``bytes()`` them to keep them.
    """
    if len(plaintext) != layout.plain_length(index):
        raise ValueError(f"segment {index} must hold {layout.plain_length(index)} bytes, got {len(plaintext)}")
    sealed = seal_segment(file_key, object_id, index, layout.is_last(index), plaintext)
    return encode_segment_views(layout.params, sealed)


def decode_segment_plaintext(file_key: bytes, object_id: str, layout: ObjectLayout, index: int,
                             blocks: Mapping[int, bytes]) -> bytes:
    """Rebuild and open segment ``index`` from any k of its blocks (IntegrityError if anything was altered)."""
    sealed = decode_segment(layout.params, blocks, layout.sealed_length(index))
    return open_segment(file_key, object_id, index, layout.is_last(index), sealed)

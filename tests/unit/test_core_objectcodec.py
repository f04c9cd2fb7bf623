"""fincryptfs.core.layout + objectcodec: a whole object through pad → seal → erasure-code and back."""

from __future__ import annotations

import itertools
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs.core import objectcodec
from fincryptfs.core.crypto import TAG_BYTES
from fincryptfs.core.errors import ErasureError, IntegrityError, RemoteProtocolError
from fincryptfs.core.layout import ObjectLayout
from fincryptfs.core.padding import TRAILER_BYTES, data_length_from_tail, padded_length

KEY = bytes(range(32))
OBJ = "0f" * 32


def _encode_object(data: bytes, segment_size: int, k: int, n: int) -> tuple[ObjectLayout, list[bytearray]]:
    layout = objectcodec.plan_object(len(data), segment_size, k, n)
    shares = [bytearray() for _ in range(n)]
    for index, plain in enumerate(objectcodec.padded_segments(layout, len(data),
                                                              lambda off, size: data[off:off + size])):
        assert len(plain) == layout.plain_length(index)
        assert layout.block_offset(index) == len(shares[0])
        blocks = objectcodec.encode_segment_blocks(KEY, OBJ, layout, index, plain)
        assert all(len(b) == layout.block_length(index) for b in blocks)
        for share, block in zip(shares, blocks, strict=True):
            share += block
    return layout, shares


def _decode_object(layout: ObjectLayout, shares: dict[int, bytes]) -> bytes:
    stream = bytearray()
    for index in range(layout.segment_count):
        start, size = layout.block_offset(index), layout.block_length(index)
        blocks = {i: bytes(s[start:start + size]) for i, s in shares.items()}
        stream += objectcodec.decode_segment_plaintext(KEY, OBJ, layout, index, blocks)
    assert len(stream) == layout.padded_size
    length = data_length_from_tail(layout.padded_size, bytes(stream[-TRAILER_BYTES:]))
    assert stream[length:-TRAILER_BYTES] == bytes(layout.padded_size - length - TRAILER_BYTES)
    return bytes(stream[:length])


@st.composite
def objects(draw: st.DrawFn) -> tuple[bytes, int, int, int]:
    n = draw(st.integers(min_value=2, max_value=8))
    k = draw(st.integers(min_value=1, max_value=n - 1))
    segment_size = draw(st.sampled_from([4096, 4097, 5000, 8192, 12345]))
    length = draw(st.integers(min_value=0, max_value=40_000))
    seed = draw(st.binary(min_size=1, max_size=64))
    data = (seed * (length // len(seed) + 1))[:length]
    return data, segment_size, k, n


@settings(max_examples=60, deadline=None)
@given(objects(), st.data())
def test_object_round_trip_from_any_k_shares(obj: tuple[bytes, int, int, int], draw: st.DataObject) -> None:
    data, segment_size, k, n = obj
    layout, shares = _encode_object(data, segment_size, k, n)
    assert layout.padded_size == padded_length(len(data))
    assert all(len(s) == layout.share_size for s in shares)
    subset = draw.draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k, unique=True))
    assert _decode_object(layout, {i: bytes(shares[i]) for i in subset}) == data


@settings(max_examples=40, deadline=None)
@given(objects(), st.data())
def test_tampered_block_is_detected(obj: tuple[bytes, int, int, int], draw: st.DataObject) -> None:
    data, segment_size, k, n = obj
    layout, shares = _encode_object(data, segment_size, k, n)
    index = draw.draw(st.integers(0, layout.segment_count - 1))
    subset = draw.draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k, unique=True))
    start, size = layout.block_offset(index), layout.block_length(index)
    blocks = {i: bytearray(shares[i][start:start + size]) for i in subset}
    victim = draw.draw(st.sampled_from(subset))
    # flip a byte that carries sealed data (the zero-fill of the last primary block is not authenticated)
    pos = draw.draw(st.integers(0, size - 1))
    if victim == k - 1 and subset == list(range(k)):
        pos = min(pos, layout.sealed_length(index) - (k - 1) * size - 1)
    blocks[victim][pos] ^= 0x40
    with pytest.raises((IntegrityError, ErasureError)):
        objectcodec.decode_segment_plaintext(KEY, OBJ, layout, index, {i: bytes(b) for i, b in blocks.items()})


def test_wrong_segment_order_is_detected() -> None:
    data = bytes(range(256)) * 100
    layout, shares = _encode_object(data, 4096, 2, 4)
    blocks1 = {i: bytes(shares[i][layout.block_offset(1):layout.block_offset(2)]) for i in (0, 3)}
    with pytest.raises(IntegrityError):
        objectcodec.decode_segment_plaintext(KEY, OBJ, layout, 0, blocks1)


def test_plaintext_of_wrong_length_is_refused() -> None:
    layout = objectcodec.plan_object(10_000, 4096, 3, 6)
    with pytest.raises(ValueError, match="must hold 4096 bytes"):
        objectcodec.encode_segment_blocks(KEY, OBJ, layout, 0, b"short")


def test_file_shrinking_while_read_is_an_error() -> None:
    layout = objectcodec.plan_object(10_000, 4096, 3, 6)
    with pytest.raises(OSError, match="file shrank"):
        list(objectcodec.padded_segments(layout, 10_000, lambda off, size: b"x" * (size - 1)))


def test_padded_segments_of_a_huge_file_use_bounded_memory() -> None:
    # 16 GiB + 1 byte of data: Padmé adds up to 256 MiB of zeros; they must be made a segment at a time
    length = 16 * 2**30 + 1
    segment_size = 4 * 2**20
    layout = objectcodec.plan_object(length, segment_size, 3, 6)
    assert layout.padded_size - length > 200 * 2**20
    first_tail_segment = length // segment_size

    def read(offset: int, size: int) -> bytes:
        return b"\x01" * size if offset == first_tail_segment * segment_size else bytes(size)

    tracemalloc.start()
    try:
        gen = objectcodec.padded_segments(layout, length, read)
        for index, plain in enumerate(itertools.islice(gen, first_tail_segment, None), first_tail_segment):
            assert len(plain) == layout.plain_length(index)
            if index == first_tail_segment:
                assert plain[:1] == b"\x01" and plain[1:] == bytes(len(plain) - 1)
            elif layout.is_last(index):
                assert data_length_from_tail(layout.padded_size, plain[-8:]) == length
                assert plain[:-8] == bytes(len(plain) - 8)
            else:
                assert plain == bytes(len(plain))
            del plain
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 * segment_size, f"padding used {peak} bytes of memory"


def test_layout_arithmetic() -> None:
    layout = ObjectLayout(padded_size=10_000, segment_size=4096, k=3, n=6)
    assert layout.segment_count == 3
    assert [layout.plain_length(i) for i in range(3)] == [4096, 4096, 10_000 - 8192]
    assert layout.sealed_length(2) == 10_000 - 8192 + TAG_BYTES
    full_block = -(-(4096 + TAG_BYTES) // 3)
    assert layout.block_offset(2) == 2 * full_block
    assert layout.share_size == 2 * full_block + -(-(10_000 - 8192 + TAG_BYTES) // 3)
    assert layout.is_last(2) and not layout.is_last(1)
    assert list(layout.segments_for_range(4095, 2)) == [0, 1]
    assert list(layout.segments_for_range(9999, 100)) == [2]
    assert list(layout.segments_for_range(10_000, 5)) == []
    assert list(layout.segments_for_range(0, 0)) == []
    with pytest.raises(IndexError):
        layout.plain_length(3)
    with pytest.raises(ValueError):
        layout.segments_for_range(-1, 1)


@pytest.mark.parametrize("fields", [
    (0, 4096, 3, 6), (2**50 + 1, 4096, 3, 6), (4096, 4095, 3, 6), (4096, 64 * 2**20 + 1, 3, 6),
    (4096, 4096, 3, 3), (True, 4096, 1, 2), (4096.0, 4096, 1, 2),
])
def test_invalid_layouts(fields: tuple[int, int, int, int]) -> None:
    with pytest.raises((RemoteProtocolError, ErasureError)):
        ObjectLayout(*fields)


def test_padded_segments_equal_data_plus_padding_tail() -> None:
    from fincryptfs.core.padding import padding_tail

    for length in (0, 1, 4087, 4088, 4089, 5000, 8184, 12_000, 70_000):
        data = bytes(i % 251 for i in range(length))
        layout = objectcodec.plan_object(length, 4096, 2, 4)

        def read(off: int, size: int, d: bytes = data) -> bytes:
            return d[off:off + size]

        stream = b"".join(objectcodec.padded_segments(layout, length, read))
        assert stream == data + padding_tail(length)


def test_padded_segments_refuse_a_layout_for_another_length() -> None:
    layout = objectcodec.plan_object(100_000, 4096, 2, 4)
    with pytest.raises(ValueError, match="padded bytes"):
        list(objectcodec.padded_segments(layout, 10, lambda off, size: bytes(size)))


@pytest.mark.parametrize("tail_in_last", range(1, TRAILER_BYTES))
def test_length_trailer_split_across_two_segments(tail_in_last: int) -> None:
    """A segment size (FINCRYPT_SEGMENT_SIZE may be any number of bytes) can end a segment inside the 8-byte
    length trailer: the segment before the last must then hold only the trailer's first bytes."""
    length = 4171
    padded = padded_length(length)  # 4352
    segment_size = padded - tail_in_last
    data = bytes(i % 251 for i in range(length))
    layout, shares = _encode_object(data, segment_size, 2, 4)
    assert layout.segment_count == 2 and layout.plain_length(1) == tail_in_last
    assert _decode_object(layout, {0: bytes(shares[0]), 3: bytes(shares[3])}) == data

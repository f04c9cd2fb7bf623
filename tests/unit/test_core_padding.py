"""fincryptfs.core.padding: Padmé, the 4 KiB floor and the length trailer."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs.core import padding
from fincryptfs.core.errors import IntegrityError

lengths = st.integers(min_value=0, max_value=2**50)


@settings(max_examples=500, deadline=None)
@given(lengths)
def test_padme_properties(length: int) -> None:
    padded = padding.padme(length)
    assert padded >= length
    if length >= 2:
        e = length.bit_length() - 1
        low_bits = e - e.bit_length()
        assert padded % (1 << low_bits) == 0, "the low e - s bits must be zero"
        assert padded - length < 1 << low_bits  # the smallest such value
    if length >= 256:
        assert padded - length <= 0.12 * length


@settings(max_examples=300, deadline=None)
@given(lengths)
def test_padme_is_monotone_and_idempotent(length: int) -> None:
    padded = padding.padme(length)
    assert padding.padme(padded) == padded
    assert padding.padme(length + 1) >= padded


def test_padme_small_and_known_values() -> None:
    assert [padding.padme(n) for n in range(10)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10]
    assert padding.padme(1000) == 1024  # e=9, s=4: the low 5 bits are cleared
    assert padding.padme(4104) == 4352  # e=12, s=4: the low 8 bits are cleared
    assert padding.padme(2**20 + 1) == 2**20 + 2**15
    with pytest.raises(ValueError):
        padding.padme(-1)


@settings(max_examples=300, deadline=None)
@given(lengths)
def test_padded_length_bounds(length: int) -> None:
    total = padding.padded_length(length)
    assert total >= length + padding.TRAILER_BYTES
    assert total >= padding.MIN_PADDED


def test_floor_makes_small_files_alike() -> None:
    assert {padding.padded_length(n) for n in range(0, 4089)} == {4096}
    assert padding.padded_length(4089) > 4096


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=2**22))
def test_tail_round_trip(length: int) -> None:
    tail = padding.padding_tail(length)
    total = padding.padded_length(length)
    assert len(tail) == total - length
    assert tail[:-8] == bytes(len(tail) - 8)
    assert padding.data_length_from_tail(total, tail) == length
    assert padding.data_length_from_tail(total, tail[-8:]) == length


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=2**40), st.integers(min_value=0, max_value=2**64 - 1))
def test_inconsistent_trailer_is_detected(length: int, claimed: int) -> None:
    total = padding.padded_length(length)
    trailer = struct.pack(">Q", claimed)
    if padding.padded_length(claimed) == total:
        assert padding.data_length_from_tail(total, trailer) == claimed
    else:
        with pytest.raises(IntegrityError, match="does not match"):
            padding.data_length_from_tail(total, trailer)


def test_short_tail_is_refused() -> None:
    with pytest.raises(IntegrityError, match="too short"):
        padding.data_length_from_tail(4096, b"\x00" * 7)

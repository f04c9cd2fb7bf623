"""fincryptfs.core.erasure: k-of-n coding with zfec, parameters and redundancy policy."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs.core import erasure
from fincryptfs.core.erasure import ErasureParams
from fincryptfs.core.errors import ErasureError, PolicyError


@st.composite
def params(draw: st.DrawFn, max_n: int = 20) -> ErasureParams:
    n = draw(st.integers(min_value=2, max_value=max_n))
    k = draw(st.integers(min_value=1, max_value=n - 1))
    return ErasureParams(k, n)


@settings(max_examples=200, deadline=None)
@given(params(), st.binary(max_size=3000), st.data())
def test_any_k_blocks_decode(p: ErasureParams, sealed: bytes, data: st.DataObject) -> None:
    blocks = erasure.encode_segment(p, sealed)
    assert len(blocks) == p.n
    size = erasure.block_length(len(sealed), p.k)
    assert all(len(b) == size for b in blocks)
    # the first k blocks are the sealed bytes themselves (systematic code), zero-filled at the end
    assert b"".join(blocks[: p.k])[: len(sealed)] == sealed
    subset = data.draw(st.lists(st.integers(0, p.n - 1), min_size=p.k, max_size=p.n, unique=True))
    chosen = {i: blocks[i] for i in subset}
    assert erasure.decode_segment(p, chosen, len(sealed)) == sealed


def test_decode_with_parity_only_at_full_width() -> None:
    p = ErasureParams(100, 256)
    sealed = bytes(range(256)) * 50
    blocks = erasure.encode_segment(p, sealed)
    assert erasure.decode_segment(p, {i: blocks[i] for i in range(156, 256)}, len(sealed)) == sealed


@pytest.mark.parametrize("k,n", [(0, 2), (-1, 3), (3, 3), (4, 3), (1, 257), (200, 300), (1, 1)])
def test_invalid_params(k: int, n: int) -> None:
    with pytest.raises(ErasureError, match="need 1 <= k < n <= 256"):
        ErasureParams(k, n)


def test_non_integer_params() -> None:
    with pytest.raises(ErasureError, match="integers"):
        ErasureParams(1.0, 3)  # type: ignore[arg-type]


def test_extreme_valid_params() -> None:
    assert ErasureParams(1, 2).expansion == 2
    assert ErasureParams(255, 256).n == 256


@pytest.mark.parametrize("k,n,minimum", [(3, 5, 6), (4, 7, 8), (10, 19, 20), (5, 9, 10)])
def test_redundancy_below_two_is_refused(k: int, n: int, minimum: int) -> None:
    with pytest.raises(PolicyError, match=f"for k={k} use n >= {minimum}") as info:
        ErasureParams(k, n).check_redundancy()
    assert info.value.status == 409


def test_redundancy_at_least_two_is_accepted() -> None:
    for k, n in [(1, 2), (3, 6), (4, 10), (10, 20), (128, 256)]:
        ErasureParams(k, n).check_redundancy()
    with pytest.raises(PolicyError, match="use n >= 8"):
        ErasureParams(3, 7).check_redundancy(2.5)


def test_redundancy_floor_is_two_whatever_is_asked() -> None:
    with pytest.raises(PolicyError, match="use n >= 6"):
        ErasureParams(3, 5).check_redundancy(1.5)


@settings(max_examples=100, deadline=None)
@given(params(max_n=12), st.binary(max_size=2000), st.data())
def test_rebuild_blocks_recreates_missing(p: ErasureParams, sealed: bytes, data: st.DataObject) -> None:
    blocks = erasure.encode_segment(p, sealed)
    lost = data.draw(st.lists(st.integers(0, p.n - 1), min_size=1, max_size=p.n - p.k, unique=True))
    kept = {i: b for i, b in enumerate(blocks) if i not in lost}
    rebuilt = erasure.rebuild_blocks(p, kept, len(sealed), lost)
    assert rebuilt == {i: blocks[i] for i in lost}


def test_decode_errors() -> None:
    p = ErasureParams(3, 6)
    blocks = erasure.encode_segment(p, b"x" * 100)
    with pytest.raises(ErasureError, match="need 3 blocks"):
        erasure.decode_segment(p, {0: blocks[0], 4: blocks[4]}, 100)
    with pytest.raises(ErasureError, match="has 33 bytes, expected 34"):
        erasure.decode_segment(p, {0: blocks[0], 1: blocks[1][:-1], 4: blocks[4]}, 100)
    with pytest.raises(ErasureError, match="outside 0..5"):
        erasure.decode_segment(p, {0: blocks[0], 1: blocks[1], -1: blocks[4]}, 100)


def test_block_length() -> None:
    assert erasure.block_length(0, 3) == 1
    assert erasure.block_length(1, 3) == 1
    assert erasure.block_length(9, 3) == 3
    assert erasure.block_length(10, 3) == 4


@settings(max_examples=100, deadline=None)
@given(params(), st.binary(max_size=3000))
def test_views_equal_copies(p: ErasureParams, sealed: bytes) -> None:
    views = erasure.encode_segment_views(p, sealed)
    assert [bytes(v) for v in views] == erasure.encode_segment(p, sealed)
    assert all(len(v) == erasure.block_length(len(sealed), p.k) for v in views)


needs_fast = pytest.mark.skipif(not erasure.accelerated(), reason="the AVX2 coder is not built or not usable here")


@needs_fast
@settings(max_examples=200, deadline=None)
@given(params(max_n=40), st.binary(max_size=5000), st.data())
def test_fast_coder_is_zfec_byte_for_byte(p: ErasureParams, sealed: bytes, data: st.DataObject) -> None:
    """Shares stored by one client are decoded and repaired by others (and by mediators, with zfec or not):
    the AVX2 coder's parity and decoding must be zfec's exactly."""
    import zfec

    fast = erasure.encode_segment(p, sealed)
    size = erasure.block_length(len(sealed), p.k)
    primary = [bytes(fast[i]) for i in range(p.k)]
    assert fast[p.k:] == [bytes(b) for b in zfec.Encoder(p.k, p.n).encode(primary, list(range(p.k, p.n)))]
    nums = sorted(data.draw(st.lists(st.integers(0, p.n - 1), min_size=p.k, max_size=p.k, unique=True)))
    reference = zfec.Decoder(p.k, p.n).decode(tuple(fast[i] for i in nums), tuple(nums))
    assert erasure.decode_segment(p, {i: fast[i] for i in nums}, p.k * size) == b"".join(reference)


def test_zfec_path_gives_the_same_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    p = ErasureParams(3, 6)
    sealed = bytes(range(256)) * 41 + b"tail"
    fast = erasure.encode_segment(p, sealed)
    fast_decoded = erasure.decode_segment(p, {1: fast[1], 4: fast[4], 5: fast[5]}, len(sealed))
    monkeypatch.setattr(erasure, "_FAST", False)
    assert erasure.encode_segment(p, sealed) == fast
    assert erasure.decode_segment(p, {1: fast[1], 4: fast[4], 5: fast[5]}, len(sealed)) == fast_decoded == sealed


@needs_fast
def test_fast_coder_rejects_bad_input() -> None:
    from fincryptfs.core import _gf256

    with pytest.raises(ValueError, match="same length"):
        _gf256.combine(b"\x01\x02", [b"abc", b"ab"])
    with pytest.raises(ValueError, match="whole rows"):
        _gf256.combine(b"\x01\x02\x03", [b"abc", b"abc"])
    with pytest.raises(ValueError, match="1 to 256 inputs"):
        _gf256.combine(b"", [])
    assert _gf256.combine(b"\x01\x00\x00\x01", [b"xy", b"zw"]) == [b"xy", b"zw"]
    assert all(_gf256.mul(a, 1) == a and _gf256.mul(a, 0) == 0 for a in range(256))
    assert all(_gf256.mul(a, b) == erasure._mul(a, b) for a in range(0, 256, 7) for b in range(256))

"""fincryptfs.core.crypto: segment sealing, recovery phrases, key files, file-key wrapping, derived keys."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs.core import crypto
from fincryptfs.core.errors import ConfigError, IntegrityError, WrongKeyError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
OBJ = "ab" * 32
OTHER_OBJ = "cd" * 32

keys = st.binary(min_size=32, max_size=32)
object_ids = st.binary(min_size=32, max_size=32).map(bytes.hex)
indices = st.integers(min_value=0, max_value=2**64 - 1)
payloads = st.binary(max_size=2048)


# --- segments -----------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(keys, object_ids, indices, st.booleans(), payloads)
def test_seal_open_round_trip(key: bytes, oid: str, index: int, last: bool, data: bytes) -> None:
    sealed = crypto.seal_segment(key, oid, index, last, data)
    assert len(sealed) == len(data) + crypto.TAG_BYTES
    assert crypto.open_segment(key, oid, index, last, sealed) == data


@settings(max_examples=150, deadline=None)
@given(payloads, st.data())
def test_any_bit_flip_fails(data: bytes, draw: st.DataObject) -> None:
    sealed = bytearray(crypto.seal_segment(KEY, OBJ, 5, False, data))
    bit = draw.draw(st.integers(0, 8 * len(sealed) - 1))
    sealed[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(IntegrityError, match="failed authentication"):
        crypto.open_segment(KEY, OBJ, 5, False, bytes(sealed))


@settings(max_examples=100, deadline=None)
@given(payloads, indices, indices)
def test_reordered_segment_fails(data: bytes, index: int, other: int) -> None:
    if index == other:
        other = (other + 1) % 2**64
    sealed = crypto.seal_segment(KEY, OBJ, index, False, data)
    with pytest.raises(IntegrityError):
        crypto.open_segment(KEY, OBJ, other, False, sealed)


@settings(max_examples=100, deadline=None)
@given(payloads, st.booleans())
def test_flipped_last_flag_fails(data: bytes, last: bool) -> None:
    # opening a non-last segment as last = truncation; the last one as not-last = extension
    sealed = crypto.seal_segment(KEY, OBJ, 3, last, data)
    with pytest.raises(IntegrityError):
        crypto.open_segment(KEY, OBJ, 3, not last, sealed)


@settings(max_examples=100, deadline=None)
@given(payloads, object_ids, keys)
def test_wrong_object_id_or_key_fails(data: bytes, oid: str, key: bytes) -> None:
    sealed = crypto.seal_segment(KEY, OBJ, 0, True, data)
    if oid != OBJ:
        with pytest.raises(IntegrityError):
            crypto.open_segment(KEY, oid, 0, True, sealed)
    if key != KEY:
        with pytest.raises(IntegrityError):
            crypto.open_segment(key, OBJ, 0, True, sealed)


def test_truncated_or_extended_sealed_bytes_fail() -> None:
    sealed = crypto.seal_segment(KEY, OBJ, 0, True, b"hello world")
    for bad in (sealed[:-1], sealed[:crypto.TAG_BYTES - 1], b"", sealed + b"\x00", sealed[1:]):
        with pytest.raises(IntegrityError):
            crypto.open_segment(KEY, OBJ, 0, True, bad)


def test_nonce_is_big_endian_index_and_ad_layout() -> None:
    assert crypto.segment_nonce(0) == bytes(12)
    assert crypto.segment_nonce(0x0102) == bytes(10) + b"\x01\x02"
    assert crypto.segment_nonce(2**64 - 1) == bytes(4) + b"\xff" * 8
    for bad in (-1, 2**64):
        with pytest.raises(ValueError):
            crypto.segment_nonce(bad)
    ad = crypto.segment_ad(OBJ, 7, True)
    assert ad == b"fincrypt-segment-v1" + bytes.fromhex(OBJ) + (7).to_bytes(8, "big") + b"\x01"
    assert crypto.segment_ad(OBJ, 7, False)[-1:] == b"\x00"


def test_segments_with_distinct_indices_differ() -> None:
    data = bytes(64)
    assert crypto.seal_segment(KEY, OBJ, 0, False, data) != crypto.seal_segment(KEY, OBJ, 1, False, data)


# --- recovery phrase ----------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(keys)
def test_recovery_phrase_round_trip(master: bytes) -> None:
    phrase = crypto.recovery_phrase(master)
    assert len(phrase.split()) == 24
    assert crypto.master_key_from_phrase(phrase) == master
    # case, extra whitespace and surrounding spaces are tolerated
    messy = "  " + "   ".join(w.upper() for w in phrase.split()) + "\n"
    assert crypto.master_key_from_phrase(messy) == master


def test_recovery_phrase_wrong_word_count() -> None:
    words = crypto.recovery_phrase(KEY).split()
    for bad in (words[:23], words + words[:1], words[:12], []):
        with pytest.raises(WrongKeyError, match=f"24 words; this one has {len(bad)}"):
            crypto.master_key_from_phrase(" ".join(bad))


def test_recovery_phrase_unknown_word() -> None:
    words = crypto.recovery_phrase(KEY).split()
    words[5] = "fincryptz"
    with pytest.raises(WrongKeyError, match="not words of the recovery word list: fincryptz"):
        crypto.master_key_from_phrase(" ".join(words))


def test_recovery_phrase_bad_checksum_when_words_are_swapped() -> None:
    words = crypto.recovery_phrase(KEY).split()
    failures = 0
    for i in range(23):
        swapped = list(words)
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        if swapped == words:
            continue
        try:
            result = crypto.master_key_from_phrase(" ".join(swapped))
        except WrongKeyError as exc:
            assert "checksum" in str(exc)
            failures += 1
        else:  # an 8-bit checksum lets ~1/256 swaps through; they must at least give another key
            assert result != KEY
    assert failures >= 20
    # a fixed swap known to break the checksum for this key
    swapped = list(words)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(WrongKeyError, match="checksum does not match"):
        crypto.master_key_from_phrase(" ".join(swapped))


def test_recovery_phrase_rejects_bad_master_key() -> None:
    with pytest.raises(ValueError):
        crypto.recovery_phrase(b"short")


# --- derived keys -------------------------------------------------------------------------------------------


def test_account_signing_key_is_deterministic() -> None:
    a = crypto.account_signing_key(KEY)
    b = crypto.account_signing_key(bytes(KEY))
    assert a.seed == b.seed and a.id == b.id
    assert crypto.account_signing_key(OTHER_KEY).id != a.id
    # and it is recoverable from the phrase alone
    restored = crypto.master_key_from_phrase(crypto.recovery_phrase(KEY))
    assert crypto.account_signing_key(restored).id == a.id


def test_derive_key_separates_purposes() -> None:
    wrap = crypto.derive_key(KEY, "wrap")
    assert len(wrap) == 32
    assert wrap == crypto.derive_key(KEY, "wrap")
    assert wrap != crypto.derive_key(KEY, "pointer")
    assert wrap != crypto.derive_key(OTHER_KEY, "wrap")


# --- key file -----------------------------------------------------------------------------------------------


def test_key_file_without_passphrase() -> None:
    data = crypto.encode_key_file(KEY, None)
    assert not crypto.key_file_needs_passphrase(data)
    assert crypto.decode_key_file(data, None) == KEY
    assert crypto.decode_key_file(data, "ignored") == KEY


def test_key_file_with_passphrase() -> None:
    data = crypto.encode_key_file(KEY, "correct horse")
    assert crypto.key_file_needs_passphrase(data)
    assert KEY.hex() not in data.decode()
    assert crypto.decode_key_file(data, "correct horse") == KEY
    # NFC normalisation: the same passphrase typed with a combining accent opens it too
    data2 = crypto.encode_key_file(KEY, "caf\u00e9")
    assert crypto.decode_key_file(data2, "cafe\u0301") == KEY
    with pytest.raises(WrongKeyError, match="wrong passphrase"):
        crypto.decode_key_file(data, "wrong horse")
    with pytest.raises(WrongKeyError, match="none was given"):
        crypto.decode_key_file(data, None)


def _damaged_key_files() -> list[bytes]:
    good = json.loads(crypto.encode_key_file(KEY, "pw"))
    plain = json.loads(crypto.encode_key_file(KEY, None))
    variants: list[bytes] = [b"", b"not json", b"\xff\xfe", b"[]", b'{"v": 2, "kdf": "none"}', b'{"v": 1}']
    variants.append(crypto.encode_key_file(KEY, None)[:-10])
    for field in ("n", "r", "p", "salt", "nonce", "sealed"):
        doc = dict(good)
        del doc[field]
        variants.append(json.dumps(doc).encode())
    for field, value in (("n", 3), ("n", 2**30), ("r", 0), ("p", 99), ("salt", "zz"), ("nonce", "00"),
                         ("nonce", ""), ("sealed", "xyz"), ("kdf", "argon9"), ("n", "many"), ("nonce", 5)):
        doc = dict(good)
        doc[field] = value
        variants.append(json.dumps(doc).encode())
    for key_value in ("00" * 31, "zz" * 32, 17, None):
        doc = dict(plain)
        doc["key"] = key_value
        variants.append(json.dumps(doc).encode())
    return variants


@pytest.mark.parametrize("data", _damaged_key_files())
def test_damaged_key_file_is_config_error(data: bytes) -> None:
    with pytest.raises(ConfigError):
        crypto.decode_key_file(data, "pw")


def test_key_file_asking_for_too_much_memory_is_refused_before_the_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    """n and r each within range but together 16 GiB of scrypt memory: damaged or planted, never attempted."""
    calls: list[tuple[int, int, int]] = []

    def fake_scrypt(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
        calls.append((n, r, p))
        return bytes(32)

    doc = json.loads(crypto.encode_key_file(KEY, "pw"))
    doc.update(n=2**22, r=32)
    monkeypatch.setattr(crypto, "_scrypt", fake_scrypt)
    with pytest.raises(ConfigError, match="implausible scrypt parameters"):
        crypto.decode_key_file(json.dumps(doc).encode(), "pw")
    assert calls == []


def test_altered_key_file_says_so() -> None:
    doc = json.loads(crypto.encode_key_file(KEY, "pw"))
    doc["salt"] = "00" * 16
    with pytest.raises(WrongKeyError, match="or the file was altered"):
        crypto.decode_key_file(json.dumps(doc).encode(), "pw")
    del doc["salt"]
    with pytest.raises(ConfigError, match="lacks the field 'salt'"):
        crypto.decode_key_file(json.dumps(doc).encode(), "pw")


# --- file keys ----------------------------------------------------------------------------------------------


def test_wrap_unwrap_file_key() -> None:
    file_key = crypto.new_file_key()
    wrapped = crypto.wrap_file_key(KEY, OBJ, file_key)
    assert len(wrapped) == crypto.WRAPPED_KEY_BYTES
    assert crypto.unwrap_file_key(KEY, OBJ, wrapped) == file_key
    assert crypto.wrap_file_key(KEY, OBJ, file_key) != wrapped  # fresh nonce each time
    with pytest.raises(WrongKeyError):
        crypto.unwrap_file_key(KEY, OTHER_OBJ, wrapped)
    with pytest.raises(WrongKeyError):
        crypto.unwrap_file_key(OTHER_KEY, OBJ, wrapped)
    tampered = bytearray(wrapped)
    tampered[-1] ^= 1
    with pytest.raises(WrongKeyError):
        crypto.unwrap_file_key(KEY, OBJ, bytes(tampered))
    with pytest.raises(IntegrityError):
        crypto.unwrap_file_key(KEY, OBJ, wrapped[:-1])


def test_new_keys_are_fresh() -> None:
    assert len(crypto.new_master_key()) == 32
    assert crypto.new_file_key() != crypto.new_file_key()

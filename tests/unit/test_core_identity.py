"""fincryptfs.core.identity: Ed25519 keys, ids and identity files."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs.core import identity
from fincryptfs.core.errors import AuthError, ConfigError, RemoteProtocolError
from fincryptfs.core.identity import PublicKey, SigningKey

SEED = bytes(range(32))


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=256), st.binary(max_size=256))
def test_sign_verify(seed: bytes, message: bytes, other: bytes) -> None:
    key = SigningKey(seed)
    signature = key.sign(message)
    assert len(signature) == identity.SIGNATURE_BYTES
    key.public.verify(signature, message)
    if other != message:
        with pytest.raises(AuthError):
            key.public.verify(signature, other)
    wrong = SigningKey(hashlib.sha256(seed).digest())
    with pytest.raises(AuthError, match="bad signature"):
        wrong.public.verify(signature, message)
    bad = bytearray(signature)
    bad[0] ^= 1
    with pytest.raises(AuthError):
        key.public.verify(bytes(bad), message)
    with pytest.raises(AuthError, match="64 bytes"):
        key.public.verify(signature[:-1], message)


def test_id_is_hash_of_public_key() -> None:
    key = SigningKey(SEED)
    assert key.id == hashlib.sha256(b"fincrypt-id-v1" + key.public.raw).hexdigest()
    assert key.id == identity.id_of_public_key(key.public.raw)
    assert SigningKey.generate().id != key.id
    assert key.seed not in repr(key).encode() and SEED.hex() not in repr(key)


def test_public_key_text_round_trip() -> None:
    key = SigningKey(SEED).public
    text = key.to_text()
    assert len(text) == 43
    assert PublicKey.from_text(text) == key


@pytest.mark.parametrize("text", [None, 5, "", "a" * 42, "a" * 44, "!" * 43, "+" * 43, "/" * 43])
def test_public_key_text_errors(text: object) -> None:
    with pytest.raises(RemoteProtocolError):
        PublicKey.from_text(text)


def test_public_key_text_must_be_canonical() -> None:
    text = SigningKey(SEED).public.to_text()
    # the last character carries 2 unused bits; a different last character may decode to the same key
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    pos = alphabet.index(text[-1])
    alias = text[:-1] + alphabet[pos ^ 1]
    with pytest.raises(RemoteProtocolError):
        PublicKey.from_text(alias)


def test_public_key_length_checked() -> None:
    with pytest.raises(RemoteProtocolError, match="32 bytes"):
        PublicKey(b"x" * 31)
    with pytest.raises(ValueError):
        SigningKey(b"short")


def test_identity_file_round_trip() -> None:
    key = SigningKey(SEED)
    data = identity.encode_identity_file(key)
    assert data.startswith(b"fincrypt-ed25519-seed-v1\n")
    assert identity.decode_identity_file(data).id == key.id
    assert identity.decode_identity_file(data.rstrip(b"\n") + b"\r\n\n").id == key.id


@pytest.mark.parametrize("mangle", [
    lambda d: b"", lambda d: d[1:], lambda d: d[:-3], lambda d: d + b"00", lambda d: d.replace(b"0", b"g", 1),
    lambda d: b"fincrypt-ed25519-seed-v2\n" + d.split(b"\n", 1)[1], lambda d: d[:-1] + b"\xff",
])
def test_damaged_identity_file_is_config_error(mangle: object) -> None:
    data = identity.encode_identity_file(SigningKey(SEED))
    with pytest.raises(ConfigError, match="node.key"):
        identity.decode_identity_file(mangle(data), source="node.key")  # type: ignore[operator]

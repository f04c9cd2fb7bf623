"""Keys and authenticated encryption.

* The **master key** (256 random bits) is the one secret a user must keep. Its **recovery phrase** is the
  24-word BIP-39 encoding of those bits (library: ``mnemonic``, the reference implementation, chosen over a
  hand-made word list because the checksum and word list are a published standard many users already know).
* Every other account key is derived from it with HKDF-SHA256 and a purpose label, so a phrase alone restores
  the account signing key and the key that seals the manifest pointer (whose snapshot holds the per-file keys;
  ``wrap_file_key`` is defined but the client does not use it).
* The **key file** holds the master key either sealed under a passphrase (scrypt, n=2^15, r=8, p=1, then
  AES-256-GCM) or in clear for a file readable only by its owner.
* **Segments** are sealed with AES-256-GCM under a random per-object key. The 96-bit nonce is the segment index
  (big-endian): safe because a key seals exactly one object version and never two segments with one index.
  The associated data binds object id, segment index and a last-segment flag, so a flipped bit, a reordered,
  dropped, duplicated or appended segment, or a truncated object each fails to open.
"""

from __future__ import annotations

import json
import os
import struct
import unicodedata
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from mnemonic import Mnemonic

from .errors import ConfigError, IntegrityError, WrongKeyError
from .identity import SigningKey

KEY_BYTES = 32
TAG_BYTES = 16
NONCE_BYTES = 12
WRAPPED_KEY_BYTES = NONCE_BYTES + KEY_BYTES + TAG_BYTES
_SEGMENT_AD_TAG = b"fincrypt-segment-v1"
_WRAP_AD_TAG = b"fincrypt-file-key-v1"
_KEYFILE_AD_TAG = b"fincrypt-key-file-v1"
_MAX_SEGMENT_INDEX = 2**64 - 1

# scrypt cost: 2^15 * 8 * 128 B = 32 MiB of memory, ~0.1 s on one core. RFC 7914 recommends n=2^14 minimum
# for interactive use; a key file is opened once per mount, so we take twice that.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
# What a reader will spend on a key file's own parameters: a damaged or planted file asking for n=2^22, r=32
# (16 GiB) must be refused, not attempted.
SCRYPT_MAX_MEMORY = 2**30

_mnemonic = Mnemonic("english")


# --- master key and recovery phrase -------------------------------------------------------------------------


def new_master_key() -> bytes:
    """256 fresh random bits from the OS CSPRNG."""
    return os.urandom(KEY_BYTES)


def recovery_phrase(master_key: bytes) -> str:
    """The 24-word BIP-39 phrase that encodes ``master_key`` (with its 8-bit checksum)."""
    _check_key(master_key, "master key")
    return str(_mnemonic.to_mnemonic(master_key))


def master_key_from_phrase(phrase: str) -> bytes:
    """Recreate the master key from its phrase; case, extra spaces and Unicode forms are tolerated."""
    words = unicodedata.normalize("NFKD", phrase).lower().split()
    if len(words) != 24:
        raise WrongKeyError(f"a recovery phrase has 24 words; this one has {len(words)}")
    unknown = [w for w in words if w not in _mnemonic.wordlist]
    if unknown:
        raise WrongKeyError(f"not words of the recovery word list: {', '.join(unknown[:3])}")
    normalized = " ".join(words)
    if not _mnemonic.check(normalized):
        raise WrongKeyError("the recovery phrase's checksum does not match: a word is wrong or out of order")
    return bytes(_mnemonic.to_entropy(normalized))


def derive_key(master_key: bytes, purpose: str) -> bytes:
    """A 256-bit key for one named purpose (HKDF-SHA256, no salt: the master key is uniformly random)."""
    _check_key(master_key, "master key")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=b"fincrypt/" + purpose.encode())
    return hkdf.derive(master_key)


def account_signing_key(master_key: bytes) -> SigningKey:
    """The client's Ed25519 account key; derived, so the recovery phrase restores the account id too."""
    return SigningKey(derive_key(master_key, "account-signing-v1"))


# --- key file -----------------------------------------------------------------------------------------------


def encode_key_file(master_key: bytes, passphrase: str | None) -> bytes:
    """Bytes of a key file; with a passphrase the key is sealed under scrypt + AES-256-GCM."""
    _check_key(master_key, "master key")
    if passphrase is None:
        doc = {"v": 1, "kdf": "none", "key": master_key.hex()}
    else:
        salt = os.urandom(16)
        nonce = os.urandom(NONCE_BYTES)
        kek = _scrypt(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        sealed = AESGCM(kek).encrypt(nonce, master_key, _KEYFILE_AD_TAG)
        doc = {"v": 1, "kdf": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P,
               "salt": salt.hex(), "nonce": nonce.hex(), "sealed": sealed.hex()}
    return (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode()


def key_file_needs_passphrase(data: bytes) -> bool:
    return _parse_key_file(data).get("kdf") == "scrypt"


def decode_key_file(data: bytes, passphrase: str | None) -> bytes:
    """The master key in a key file; WrongKeyError for a wrong passphrase, ConfigError for a damaged file."""
    doc = _parse_key_file(data)
    try:
        if doc["kdf"] == "none":
            key = bytes.fromhex(doc["key"])
            _check_key(key, "key in the key file")
            return key
        if doc["kdf"] != "scrypt":
            raise ConfigError(f"key file uses an unknown key derivation {doc['kdf']!r}")
        if passphrase is None:
            raise WrongKeyError("this key file is protected by a passphrase; none was given")
        n, r, p = int(doc["n"]), int(doc["r"]), int(doc["p"])
        if not (2**10 <= n <= 2**22 and 1 <= r <= 32 and 1 <= p <= 16) or 128 * n * r > SCRYPT_MAX_MEMORY:
            raise ConfigError(f"key file has implausible scrypt parameters (n={n}, r={r}, p={p}): it is damaged")
        kek = _scrypt(passphrase, bytes.fromhex(doc["salt"]), n, r, p)
        sealed = bytes.fromhex(doc["sealed"])
        nonce = bytes.fromhex(doc["nonce"])
        if len(nonce) != NONCE_BYTES or len(sealed) != KEY_BYTES + TAG_BYTES:
            raise ConfigError("key file is damaged: the sealed key or its nonce has the wrong length")
    except KeyError as exc:
        raise ConfigError(f"key file is damaged: it lacks the field {exc}") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"key file is damaged: {exc}") from exc
    try:
        return AESGCM(kek).decrypt(nonce, sealed, _KEYFILE_AD_TAG)
    except InvalidTag as exc:
        # GCM cannot tell a wrong passphrase from an altered salt, parameter, nonce or sealed key: say both
        raise WrongKeyError("wrong passphrase for this key file (or the file was altered)") from exc


def _parse_key_file(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError("key file is damaged: not JSON") from exc
    if not isinstance(doc, dict) or doc.get("v") != 1 or "kdf" not in doc:
        raise ConfigError("not a Fincrypt key file (version 1)")
    return doc


def _scrypt(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    secret = unicodedata.normalize("NFC", passphrase).encode()
    return Scrypt(salt=salt, length=KEY_BYTES, n=n, r=r, p=p).derive(secret)


# --- per-object keys ----------------------------------------------------------------------------------------


def new_file_key() -> bytes:
    """A fresh key for one object version. Never reused: segment nonces rely on it."""
    return os.urandom(KEY_BYTES)


def wrap_file_key(wrap_key: bytes, object_id: str, file_key: bytes) -> bytes:
    """Seal a file key under the master-derived wrap key, bound to its object id."""
    _check_key(wrap_key, "wrap key")
    _check_key(file_key, "file key")
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(wrap_key).encrypt(nonce, file_key, _WRAP_AD_TAG + bytes.fromhex(object_id))


def unwrap_file_key(wrap_key: bytes, object_id: str, wrapped: bytes) -> bytes:
    if len(wrapped) != WRAPPED_KEY_BYTES:
        raise IntegrityError(f"a wrapped file key is {WRAPPED_KEY_BYTES} bytes, got {len(wrapped)}")
    try:
        return AESGCM(wrap_key).decrypt(
            wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _WRAP_AD_TAG + bytes.fromhex(object_id)
        )
    except InvalidTag as exc:
        raise WrongKeyError(f"file key of object {object_id[:16]}… does not open with this account key") from exc


# --- segments -----------------------------------------------------------------------------------------------


def segment_nonce(index: int) -> bytes:
    if not 0 <= index <= _MAX_SEGMENT_INDEX:
        raise ValueError("segment index out of range")
    return index.to_bytes(NONCE_BYTES, "big")


def segment_ad(object_id: str, index: int, is_last: bool) -> bytes:
    return _SEGMENT_AD_TAG + bytes.fromhex(object_id) + struct.pack(">QB", index, 1 if is_last else 0)


def seal_segment(file_key: bytes, object_id: str, index: int, is_last: bool, plaintext: bytes) -> bytes:
    """AES-256-GCM ciphertext || tag of one segment."""
    return AESGCM(file_key).encrypt(segment_nonce(index), plaintext, segment_ad(object_id, index, is_last))


def open_segment(file_key: bytes, object_id: str, index: int, is_last: bool, sealed: bytes) -> bytes:
    """Plaintext of one sealed segment, or IntegrityError if anything about it is not as sealed."""
    if len(sealed) < TAG_BYTES:
        raise IntegrityError(f"segment {index} of object {object_id[:16]}… is truncated")
    try:
        return AESGCM(file_key).decrypt(segment_nonce(index), sealed, segment_ad(object_id, index, is_last))
    except InvalidTag as exc:
        raise IntegrityError(
            f"segment {index} of object {object_id[:16]}… failed authentication: it was altered, "
            "reordered or truncated, or the key is wrong"
        ) from exc


def _check_key(key: bytes, what: str) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
        raise ValueError(f"{what} must be {KEY_BYTES} bytes")

"""Ed25519 identities for nodes, mediators and client accounts.

An id is ``SHA-256("fincrypt-id-v1" || raw public key)`` in hex, so an id names exactly one key and cannot be
claimed by anyone without that key. Signatures are detached and always over bytes that already carry a
domain-separation prefix (see :mod:`fincryptfs.core.wire`), so a signature made for one purpose can never be
replayed as another.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import AuthError, ConfigError, RemoteProtocolError

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
SEED_BYTES = 32
_ID_TAG = b"fincrypt-id-v1"
_KEY_FILE_HEADER = b"fincrypt-ed25519-seed-v1\n"


def id_of_public_key(raw: bytes) -> str:
    """The 64-hex id that names the holder of this public key."""
    return hashlib.sha256(_ID_TAG + raw).hexdigest()


@dataclass(frozen=True)
class PublicKey:
    """A verified-length Ed25519 public key."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != PUBLIC_KEY_BYTES:
            raise RemoteProtocolError(f"public key must be {PUBLIC_KEY_BYTES} bytes, got {len(self.raw)}")

    @property
    def id(self) -> str:
        return id_of_public_key(self.raw)

    def to_text(self) -> str:
        return base64.urlsafe_b64encode(self.raw).decode("ascii").rstrip("=")

    @classmethod
    def from_text(cls, text: object) -> PublicKey:
        if not isinstance(text, str) or len(text) != 43:
            raise RemoteProtocolError("public key must be 43 characters of unpadded base64url")
        try:
            raw = base64.urlsafe_b64decode(text + "=")
        except ValueError as exc:
            raise RemoteProtocolError("public key is not valid base64url") from exc
        key = cls(raw)
        if key.to_text() != text:  # no aliases: '+', '/', stray characters or set unused bits
            raise RemoteProtocolError("public key is not canonical unpadded base64url")
        return key

    def verify(self, signature: bytes, message: bytes) -> None:
        """Raise AuthError unless ``signature`` is this key's signature of ``message``."""
        if len(signature) != SIGNATURE_BYTES:
            raise AuthError(f"signature must be {SIGNATURE_BYTES} bytes, got {len(signature)}")
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except (InvalidSignature, ValueError) as exc:
            raise AuthError(f"bad signature for key {self.id[:16]}…") from exc


class SigningKey:
    """An Ed25519 private key. Deliberately not a dataclass: it must never be printed or compared."""

    __slots__ = ("_key", "_seed", "public")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"an Ed25519 seed is {SEED_BYTES} bytes")
        self._seed = bytes(seed)
        self._key = Ed25519PrivateKey.from_private_bytes(self._seed)
        self.public = PublicKey(self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(os.urandom(SEED_BYTES))

    @property
    def id(self) -> str:
        return self.public.id

    @property
    def seed(self) -> bytes:
        return self._seed

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"SigningKey(id={self.id[:16]}…)"


def encode_identity_file(key: SigningKey) -> bytes:
    """Bytes of a node's identity file (the daemon writes it with mode 0600)."""
    return _KEY_FILE_HEADER + key.seed.hex().encode("ascii") + b"\n"


def decode_identity_file(data: bytes, *, source: str = "identity file") -> SigningKey:
    """Parse an identity file; a damaged file is a ConfigError naming ``source``."""
    if not data.startswith(_KEY_FILE_HEADER):
        raise ConfigError(f"{source} is not a Fincrypt identity file (wrong header)")
    body = data[len(_KEY_FILE_HEADER):].strip()
    try:
        seed = bytes.fromhex(body.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{source} is damaged: the key is not hex") from exc
    if len(seed) != SEED_BYTES:
        raise ConfigError(f"{source} is damaged: the key has {len(seed)} bytes, expected {SEED_BYTES}")
    return SigningKey(seed)

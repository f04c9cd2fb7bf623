"""Signed peer records: what the DHT stores under a key instead of BitTorrent's bare ``ip:port``.

A record is a :class:`~fincryptfs.core.wire.Envelope` of kind ``dht-record`` whose body names the DHT key it
is announced under, the holder's role and URL and an expiry time. The signer's public key *is* the record's id
(``id_of_public_key``), so nobody can announce a URL for someone else's identity, and binding the key into the
body stops a record announced under one key being replayed under another. Records are checked when a node
stores them and again by whoever retrieves them: a DHT node is never trusted to have checked.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..core.errors import RemoteProtocolError
from ..core.identity import PublicKey, SigningKey
from ..core.messages import check_url
from ..core.wire import JSON, Envelope, Fields

RECORD_KIND = "dht-record"
KEY_BYTES = 32
MAX_RECORD_TTL = 2 * 3600  # a record must be re-announced at least this often
MAX_URL_LEN = 256  # keeps a record well under a datagram's budget
CLOCK_SKEW = 300
_ROLE_PATTERN = r"[a-z][a-z0-9_-]{0,15}"

MEDIATORS_KEY = hashlib.sha256(b"fincrypt-mediators-v1").digest()


def mediators_key(region: str | None = None) -> bytes:
    """The well-known DHT key mediators announce under; a region (e.g. ``eu``) gives a narrower key."""
    if region is None:
        return MEDIATORS_KEY
    return hashlib.sha256(b"fincrypt-mediators-v1/" + region.encode("utf-8")).digest()


@dataclass(frozen=True)
class PeerRecord:
    """A verified announcement: the holder of ``public_key`` (id ``id``) serves ``role`` at ``url``."""

    key: bytes
    public_key: PublicKey
    role: str
    url: str
    expires_at: int
    envelope: Envelope

    @property
    def id(self) -> str:
        return self.public_key.id

    @classmethod
    def sign(cls, identity: SigningKey, *, key: bytes, role: str, url: str, expires_at: int) -> PeerRecord:
        body = {"key": key.hex(), "role": role, "url": url.rstrip("/"), "expires_at": expires_at}
        return cls.from_json(Envelope.seal(RECORD_KIND, body, identity).to_json())

    def to_json(self) -> dict[str, JSON]:
        return self.envelope.to_json()

    @classmethod
    def from_json(cls, obj: object) -> PeerRecord:
        """Parse and verify the signature (not freshness: see :func:`check_fresh`)."""
        envelope = Envelope.from_json(obj, kind=RECORD_KIND)
        f = Fields(envelope.body, "dht record")
        key = f.hex("key", length=KEY_BYTES)
        role = f.str("role", max_len=16, pattern=_ROLE_PATTERN)
        # strangers' URLs: refused here, once, if any later user could not parse them (core.messages.check_url)
        url = check_url(f.str("url", max_len=MAX_URL_LEN), "dht record url")
        expires_at = f.int("expires_at")
        f.done()
        return cls(key, envelope.signer, role, url, expires_at, envelope)

    def check_fresh(self, now: float, *, key: bytes | None = None) -> None:
        """Raise unless the record is for ``key`` (if given), unexpired, and not dated too far ahead."""
        if key is not None and self.key != key:
            raise RemoteProtocolError("record was announced for a different key")
        if self.expires_at <= now:
            raise RemoteProtocolError("record has expired")
        if self.expires_at > now + MAX_RECORD_TTL + CLOCK_SKEW:
            raise RemoteProtocolError(f"record expires more than {MAX_RECORD_TTL} s ahead")

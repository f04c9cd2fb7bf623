"""Announce tokens (BEP 5): ``HMAC-SHA256(secret, ip)[:16]`` with a secret that rotates.

A node hands a token to whoever asks ``get_peers`` and accepts ``announce_peer`` only with a token it made for
that same IP under the current or the previous secret. So an announcer must be able to receive datagrams at
the address it claims (no spoofed-source announcements), and a token lives one to two rotation periods.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

TOKEN_BYTES = 16
SECRET_BYTES = 32


@dataclass(frozen=True)
class TokenSecrets:
    current: bytes
    previous: bytes
    rotated_at: float

    def rotate(self, new_secret: bytes, now: float) -> TokenSecrets:
        return TokenSecrets(new_secret, self.current, now)


def make_token(secret: bytes, ip: str) -> bytes:
    return hmac.new(secret, ip.encode("ascii"), hashlib.sha256).digest()[:TOKEN_BYTES]


def issue_token(secrets: TokenSecrets, ip: str) -> bytes:
    return make_token(secrets.current, ip)


def token_valid(secrets: TokenSecrets, token: bytes, ip: str) -> bool:
    return any(hmac.compare_digest(make_token(s, ip), token) for s in (secrets.current, secrets.previous))

"""One small exception tree for the whole project.

Every error carries a message a user or operator can act on. Errors that describe something a *remote* party
sent carry an HTTP status hint so the daemons translate them once, at the ASGI boundary.
"""

from __future__ import annotations


class FincryptError(Exception):
    """Base of every error Fincrypt raises on purpose."""


class ConfigError(FincryptError):
    """A setting is missing or malformed; the message names the variable."""


class CryptoError(FincryptError):
    """Decryption or authentication failed: wrong key, or the data was altered."""


class WrongKeyError(CryptoError):
    """A key file or wrapped key could not be opened with the key or passphrase given."""


class IntegrityError(CryptoError):
    """Data failed an integrity check (GCM tag, Merkle proof, hash): it was altered, truncated or reordered."""


class ErasureError(FincryptError):
    """Erasure-coding parameters are invalid or too few blocks are available."""


class ProtocolError(FincryptError):
    """A message broke the protocol.

    ``status`` is the HTTP status the receiving daemon should answer with.
    """

    status: int = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed, oversized, unsigned or forged (a 4xx on our side)."""


class AuthError(RemoteProtocolError):
    """A signature, grant or timestamp did not check out."""

    status = 401


class ForbiddenError(RemoteProtocolError):
    """The request is well-formed and signed, but its signer may not do this."""

    status = 403


class ReplayError(AuthError):
    """A nonce or single-use grant was seen before."""


class TooLargeError(RemoteProtocolError):
    """A body or field exceeds the size allowed for it."""

    status = 413


class PolicyError(FincryptError):
    """A request is valid but refused by policy (redundancy below the minimum, not enough nodes, ...)."""

    status: int = 409

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status

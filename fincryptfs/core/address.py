"""Bitcoin address checksums, checked where an operator types an address (``STORAGED_PAYOUT_ADDRESS``).

An address carries a checksum so that a mistyped one is refused rather than paid: base58check (legacy and
P2SH addresses, 4 bytes of double SHA-256) or bech32/bech32m (segwit, BIP 173 and BIP 350). The network is
not checked here: the node cannot know which one its mediators pay on (the mediator checks that).

Written here, not taken from bitcoinlib (the mediator's wallet library): importing bitcoinlib sets up its own
data folder, configuration and database, which a storage node has no use for, and these two checksums are
fixed by their standards (BIP 173, BIP 350, base58check) and fit in a page.
"""

from __future__ import annotations

import hashlib

_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_BECH32_CONSTANTS = (1, 0x2BC830A3)  # bech32 (witness v0), bech32m (v1 and later)


def checksum_ok(address: str) -> bool:
    """Whether ``address`` is a well-formed bech32/bech32m or base58check string with a matching checksum."""
    lowered = address.lower()
    if "1" in lowered and lowered.rpartition("1")[0].isalpha() and address in (lowered, address.upper()):
        hrp, _, data = lowered.rpartition("1")
        if len(data) >= 6 and all(c in _BECH32 for c in data):
            return _bech32_ok(hrp, data)
    return _base58check_ok(address)


def _bech32_polymod(values: list[int]) -> int:
    generator = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
    check = 1
    for value in values:
        top = check >> 25
        check = (check & 0x1FFFFFF) << 5 ^ value
        for i, g in enumerate(generator):
            if (top >> i) & 1:
                check ^= g
    return check


def _bech32_ok(hrp: str, data: str) -> bool:
    values = [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp] + [_BECH32.index(c) for c in data]
    return len(hrp) + 1 + len(data) <= 90 and _bech32_polymod(values) in _BECH32_CONSTANTS


def _base58check_ok(address: str) -> bool:
    if not address or any(c not in _BASE58 for c in address):
        return False
    number = 0
    for c in address:
        number = number * 58 + _BASE58.index(c)
    body = number.to_bytes((number.bit_length() + 7) // 8, "big")
    raw = b"\0" * (len(address) - len(address.lstrip("1"))) + body
    if len(raw) < 5:
        return False
    payload, checksum = raw[:-4], raw[-4:]
    return hashlib.sha256(hashlib.sha256(payload).digest()).digest()[:4] == checksum

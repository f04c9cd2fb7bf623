"""Length hiding: how long the stored object is, given how long the file is.

Scheme: the plaintext stream of an object is ``data || zeros || u64 big-endian len(data)``, padded to
``max(MIN_PADDED, padme(len(data) + 8))`` bytes.

* Padmé (Nikitin et al., PETS 2019) rounds a length L to a value whose low bits are zero, leaking only
  O(log log L) bits, with at most ~12% overhead (less for large files).
* The floor of 4 KiB makes every file below ~4 KiB look alike; this is where most distinguishing small
  files (keys, configs, short notes) live, and the cost in absolute bytes is small.
* The trailer makes an object self-describing, so a manifest object can be opened with nothing but its key.
"""

from __future__ import annotations

import struct

from .errors import IntegrityError

TRAILER_BYTES = 8
MIN_PADDED = 4096


def padme(length: int) -> int:
    """Padmé: round ``length`` up so that only its top ~log2(log2(length)) bits may be non-zero."""
    if length < 0:
        raise ValueError("length must be >= 0")
    if length < 2:
        return length
    e = length.bit_length() - 1  # floor(log2 L)
    s = e.bit_length()  # floor(log2 e) + 1
    last_bits = e - s
    mask = (1 << last_bits) - 1
    return (length + mask) & ~mask


def padded_length(data_length: int) -> int:
    """Length of the padded plaintext stream that holds ``data_length`` bytes of file data."""
    return max(MIN_PADDED, padme(data_length + TRAILER_BYTES))


def padding_tail(data_length: int) -> bytes:
    """The zeros and trailer that follow the file data in its padded stream."""
    total = padded_length(data_length)
    return bytes(total - data_length - TRAILER_BYTES) + struct.pack(">Q", data_length)


def data_length_from_tail(padded_size: int, tail: bytes) -> int:
    """Read the true length from the last bytes of a padded stream, checking it is consistent."""
    if len(tail) < TRAILER_BYTES:
        raise IntegrityError("padded stream too short to hold its length trailer")
    (length,) = struct.unpack(">Q", tail[-TRAILER_BYTES:])
    if padded_length(length) != padded_size:
        raise IntegrityError(f"length trailer {length} does not match a padded size of {padded_size}")
    return int(length)

"""Identifiers: share, object, node and account ids.

All four are 256-bit values written as 64 lowercase hex characters. Each kind has exactly one parser so that a
share id is validated the same way in a URL path, a JSON body and a file name: anything that is not exactly 64
characters of ``0-9a-f`` (``../x``, ``%2e%2e``, NUL, upper case, absolute paths) is refused before it can reach
a file system call.

Share and object ids are random. Node and account ids are the hash of an Ed25519 public key
(see :mod:`fincryptfs.core.identity`), so the same parsers serve them.
"""

from __future__ import annotations

import os
import re
from typing import NewType

from .errors import RemoteProtocolError

ShareId = NewType("ShareId", str)
ObjectId = NewType("ObjectId", str)
NodeId = NewType("NodeId", str)
AccountId = NewType("AccountId", str)

ID_BYTES = 32
ID_HEX_LEN = 2 * ID_BYTES
_ID_RE = re.compile(r"[0-9a-f]{64}")


def _parse(kind: str, value: object) -> str:
    if not isinstance(value, str):
        raise RemoteProtocolError(f"{kind} id must be a string of {ID_HEX_LEN} hex characters")
    if len(value) != ID_HEX_LEN or _ID_RE.fullmatch(value) is None:
        shown = value[:80].encode("unicode_escape").decode("ascii")
        raise RemoteProtocolError(
            f"invalid {kind} id {shown!r}: expected exactly {ID_HEX_LEN} lowercase hex characters"
        )
    return value


def parse_share_id(value: object) -> ShareId:
    """Return ``value`` as a ShareId or raise RemoteProtocolError (status 400)."""
    return ShareId(_parse("share", value))


def parse_object_id(value: object) -> ObjectId:
    """Return ``value`` as an ObjectId or raise RemoteProtocolError (status 400)."""
    return ObjectId(_parse("object", value))


def parse_node_id(value: object) -> NodeId:
    """Return ``value`` as a NodeId or raise RemoteProtocolError (status 400)."""
    return NodeId(_parse("node", value))


def parse_account_id(value: object) -> AccountId:
    """Return ``value`` as an AccountId or raise RemoteProtocolError (status 400)."""
    return AccountId(_parse("account", value))


def new_share_id() -> ShareId:
    """A fresh random share id (256 bits from the OS CSPRNG)."""
    return ShareId(os.urandom(ID_BYTES).hex())


def new_object_id() -> ObjectId:
    """A fresh random object id (256 bits from the OS CSPRNG)."""
    return ObjectId(os.urandom(ID_BYTES).hex())

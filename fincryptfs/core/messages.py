"""Every message the client, storage nodes and mediators exchange, as frozen dataclasses with strict codecs.

``to_json()`` gives the canonical JSON body; ``from_json()`` validates every field (ids through their one
parser each, sizes within limits, no unknown fields) and raises RemoteProtocolError. Messages that a third
party carries on are sealed in an :class:`~fincryptfs.core.wire.Envelope`; the others travel as the body of
a signed request. The storage proof, the one bulky message, has a compact binary form (``ProofResponse``).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .challenge import NONCE_BYTES, LeafProof, ShareProof
from .errors import AuthError, RemoteProtocolError, TooLargeError
from .identity import SIGNATURE_BYTES, PublicKey, SigningKey
from .ids import (
    AccountId,
    NodeId,
    ObjectId,
    ShareId,
    parse_account_id,
    parse_node_id,
    parse_object_id,
    parse_share_id,
)
from .layout import ObjectLayout
from .merkle import HASH_BYTES, LEAF_SIZE
from .wire import Envelope, Fields, b64decode, b64encode

MAX_SHARES_PER_CHALLENGE = 100_000
MAX_URL_LEN = 512
# host: a name or dotted IPv4 address, or an IPv6 address in brackets; then an optional port and a plain path
_URL_PATTERN = r"https?://(?:[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?(?:/[A-Za-z0-9._~/\-]*)?"
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"


def check_url(value: str, what: str) -> str:
    """``value`` if it is an http(s) URL that every later user can parse, else RemoteProtocolError.

    A peer's URL is used far from where it arrives (placement, audits, repairs, clients): one that fails to
    parse there would break those for everyone, so it is refused where it enters. The host is a DNS name, a
    dotted IPv4 address or a bracketed IPv6 address; the port, if any, is in 1..65535."""
    if len(value) > MAX_URL_LEN or re.fullmatch(_URL_PATTERN, value) is None:
        raise RemoteProtocolError(f"{what} must be an http:// or https:// URL of at most {MAX_URL_LEN} characters "
                                  "with a host name, an IPv4 address or an [IPv6] address, an optional port "
                                  f"and a plain path (got {value[:80]!r})")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise RemoteProtocolError(f"{what} {value[:80]!r} is not a valid URL: {exc}") from exc
    host = parts.hostname or ""
    if port is not None and not 1 <= port <= 65535:
        raise RemoteProtocolError(f"{what} {value[:80]!r}: the port must be in 1..65535")
    try:
        if "[" in parts.netloc:
            ipaddress.IPv6Address(host)
        elif re.fullmatch(r"[0-9.]+", host):
            ipaddress.IPv4Address(host)
        elif len(host) > 253 or not all(re.fullmatch(_HOST_LABEL, label) for label in host.split(".")):
            raise ValueError("a host name is dot-separated labels of letters, digits and inner hyphens")
    except ValueError as exc:
        raise RemoteProtocolError(f"{what} {value[:80]!r} has an invalid host: {exc}") from exc
    return value


def _url(f: Fields, name: str) -> str:
    value: str = f.str(name, max_len=MAX_URL_LEN)
    return check_url(value, name).rstrip("/")


def _ids(values: list[Any], parse: Any) -> tuple[Any, ...]:
    return tuple(parse(v) for v in values)


def _check_signer(envelope: Envelope, expected: str, role: str) -> None:
    if envelope.signer.id != expected:
        raise AuthError(f"{envelope.kind} is signed by {envelope.signer.id[:16]}…, not by the {role} it names")


# --- grants and receipts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadGrant:
    """A mediator's permission for one node to store one share of exactly this size, once.

    ``merkle_root`` is the root the bytes must have, or None for a share the client streams while it encodes
    it (it cannot know the root before the last byte): the node then states the root of what it received in
    its receipt, and the mediator commits the share only if that root is the one the client computed.
    """

    KIND = "grant"
    mediator_id: NodeId
    node_id: NodeId
    account_id: AccountId
    share_id: ShareId
    share_size: int
    merkle_root: bytes | None
    expires_at: int
    grant_id: str

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "mediator_id": self.mediator_id, "node_id": self.node_id, "account_id": self.account_id,
            "share_id": self.share_id, "share_size": self.share_size, "expires_at": self.expires_at,
            "grant_id": self.grant_id}
        if self.merkle_root is not None:
            body["merkle_root"] = b64encode(self.merkle_root)
        return body

    @classmethod
    def from_json(cls, obj: object) -> UploadGrant:
        f = Fields(obj, "grant")
        grant = cls(parse_node_id(f.raw("mediator_id")), parse_node_id(f.raw("node_id")),
                    parse_account_id(f.raw("account_id")), parse_share_id(f.raw("share_id")),
                    f.int("share_size", lo=0, hi=2**50), f.bytes("merkle_root", length=HASH_BYTES, optional=True),
                    f.int("expires_at"), f.str("grant_id", pattern=r"[0-9a-f]{32}"))
        f.done()
        return grant

    def seal(self, mediator_key: SigningKey) -> Envelope:
        return Envelope.seal(self.KIND, self.to_json(), mediator_key)

    @classmethod
    def open(cls, envelope: Envelope) -> UploadGrant:
        grant = cls.from_json(envelope.body)
        _check_signer(envelope, grant.mediator_id, "mediator")
        return grant


@dataclass(frozen=True)
class StorageReceipt:
    """A node's signed statement that a share is durably stored (issued only after fsync + rename)."""

    KIND = "receipt"
    node_id: NodeId
    mediator_id: NodeId
    account_id: AccountId
    share_id: ShareId
    share_size: int
    merkle_root: bytes
    grant_id: str
    stored_at: int

    def to_json(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "mediator_id": self.mediator_id, "account_id": self.account_id,
                "share_id": self.share_id, "share_size": self.share_size,
                "merkle_root": b64encode(self.merkle_root), "grant_id": self.grant_id,
                "stored_at": self.stored_at}

    @classmethod
    def from_json(cls, obj: object) -> StorageReceipt:
        f = Fields(obj, "receipt")
        receipt = cls(parse_node_id(f.raw("node_id")), parse_node_id(f.raw("mediator_id")),
                      parse_account_id(f.raw("account_id")), parse_share_id(f.raw("share_id")),
                      f.int("share_size", lo=0, hi=2**50), f.bytes("merkle_root", length=HASH_BYTES),
                      f.str("grant_id", pattern=r"[0-9a-f]{32}"), f.int("stored_at"))
        f.done()
        return receipt

    def seal(self, node_key: SigningKey) -> Envelope:
        return Envelope.seal(self.KIND, self.to_json(), node_key)

    @classmethod
    def open(cls, envelope: Envelope) -> StorageReceipt:
        receipt = cls.from_json(envelope.body)
        _check_signer(envelope, receipt.node_id, "node")
        return receipt

    def matches(self, grant: UploadGrant) -> bool:
        """The receipt answers this grant (and, if the grant names a root, states that root)."""
        return (self.node_id, self.mediator_id, self.account_id, self.share_id, self.share_size,
                self.grant_id) == (grant.node_id, grant.mediator_id, grant.account_id, grant.share_id,
                                   grant.share_size, grant.grant_id) and (
            grant.merkle_root is None or grant.merkle_root == self.merkle_root)


# --- node announcements -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeAnnouncement:
    """What a storage node tells a mediator about itself (body of a request signed by the node's key).

    ``price`` is the asking price in millisatoshi per GiB-hour; ``None`` means "float": take the mediator's bid.
    ``shares_lost``: how many shares this run of the node (``boot_id``, random per start) found missing or
    corrupt; a mediator that sees it grow audits the node out of turn, so repair starts before the next round.
    """

    node_id: NodeId
    url: str
    price: int | None
    capacity_bytes: int
    free_bytes: int
    operator: str
    payout_address: str | None
    boot_id: str | None = None
    shares_lost: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "url": self.url, "price": self.price,
                "capacity_bytes": self.capacity_bytes, "free_bytes": self.free_bytes, "operator": self.operator,
                "payout_address": self.payout_address, "boot_id": self.boot_id, "shares_lost": self.shares_lost}

    @classmethod
    def from_json(cls, obj: object) -> NodeAnnouncement:
        f = Fields(obj, "announcement")
        ann = cls(parse_node_id(f.raw("node_id")), _url(f, "url"),
                  f.int("price", lo=0, hi=10**15, optional=True),
                  f.int("capacity_bytes", hi=2**60), f.int("free_bytes", hi=2**60),
                  f.str("operator", max_len=64, pattern=r"[A-Za-z0-9._@-]*"),
                  f.str("payout_address", max_len=100, optional=True, pattern=r"[A-Za-z0-9]+"),
                  f.str("boot_id", max_len=32, optional=True, pattern=r"[0-9a-f]{16,32}"),
                  f.int("shares_lost", hi=2**40, optional=True) or 0)
        f.done()
        if ann.free_bytes > ann.capacity_bytes:
            raise RemoteProtocolError("announcement: free_bytes exceeds capacity_bytes")
        return ann


# --- placement and commit -----------------------------------------------------------------------------------


def _layout_json(layout: ObjectLayout) -> dict[str, int]:
    return {"padded_size": layout.padded_size, "segment_size": layout.segment_size, "k": layout.k,
            "n": layout.n}


def layout_from_json(obj: object) -> ObjectLayout:
    f = Fields(obj, "layout")
    layout = ObjectLayout(f.int("padded_size", hi=2**62), f.int("segment_size", hi=2**40), f.int("k", hi=256),
                          f.int("n", hi=256))
    f.done()
    return layout


def layout_to_json(layout: ObjectLayout) -> dict[str, int]:
    return _layout_json(layout)


@dataclass(frozen=True)
class ShareSpec:
    """One share as the client computed it: position, random id, exact size and Merkle root (None while the
    client has not encoded it yet: it streams the share and the node's receipt states the root)."""

    index: int
    share_id: ShareId
    share_size: int
    merkle_root: bytes | None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"index": self.index, "share_id": self.share_id, "share_size": self.share_size}
        if self.merkle_root is not None:
            body["merkle_root"] = b64encode(self.merkle_root)
        return body

    @classmethod
    def from_json(cls, obj: object) -> ShareSpec:
        f = Fields(obj, "share")
        spec = cls(f.int("index", hi=255), parse_share_id(f.raw("share_id")), f.int("share_size", hi=2**50),
                   f.bytes("merkle_root", length=HASH_BYTES, optional=True))
        f.done()
        return spec


@dataclass(frozen=True)
class PlaceRequest:
    """Client → mediator: find nodes for these shares of an object (all n, or the ones to re-place)."""

    object_id: ObjectId
    layout: ObjectLayout
    shares: tuple[ShareSpec, ...]
    exclude_nodes: tuple[NodeId, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"object_id": self.object_id, "layout": _layout_json(self.layout),
                "shares": [s.to_json() for s in self.shares], "exclude_nodes": list(self.exclude_nodes)}

    @classmethod
    def from_json(cls, obj: object) -> PlaceRequest:
        f = Fields(obj, "place request")
        req = cls(parse_object_id(f.raw("object_id")), layout_from_json(f.raw("layout")),
                  tuple(ShareSpec.from_json(s) for s in f.list("shares", max_items=256)),
                  _ids(f.list("exclude_nodes", max_items=1024), parse_node_id))
        f.done()
        _check_share_set(req.layout, req.shares, complete=False)
        return req


def _check_share_set(layout: ObjectLayout, shares: tuple[Any, ...], *, complete: bool) -> None:
    if not shares:
        raise RemoteProtocolError("no shares given")
    indices = [s.index for s in shares]
    if len(set(indices)) != len(indices) or any(i >= layout.n for i in indices):
        raise RemoteProtocolError(f"share indices must be distinct and below n={layout.n}")
    if len({s.share_id for s in shares}) != len(shares):
        raise RemoteProtocolError("share ids must be distinct")
    for s in shares:
        if s.share_size != layout.share_size:
            raise RemoteProtocolError(
                f"share {s.index} claims {s.share_size} bytes; the layout gives {layout.share_size}")
    if complete and len(shares) > layout.n:
        raise RemoteProtocolError("more shares than n")


@dataclass(frozen=True)
class Placement:
    """Mediator → client: where one share goes, with the grant that node will accept."""

    index: int
    node_id: NodeId
    node_url: str
    grant: Envelope

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "node_id": self.node_id, "node_url": self.node_url,
                "grant": self.grant.to_json()}

    @classmethod
    def from_json(cls, obj: object) -> Placement:
        f = Fields(obj, "placement")
        p = cls(f.int("index", hi=255), parse_node_id(f.raw("node_id")), _url(f, "node_url"),
                Envelope.from_json(f.raw("grant"), kind=UploadGrant.KIND))
        f.done()
        return p


@dataclass(frozen=True)
class CommittedShare:
    index: int
    share_id: ShareId
    node_id: NodeId
    share_size: int
    merkle_root: bytes
    receipt: Envelope

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "share_id": self.share_id, "node_id": self.node_id,
                "share_size": self.share_size, "merkle_root": b64encode(self.merkle_root),
                "receipt": self.receipt.to_json()}

    @classmethod
    def from_json(cls, obj: object) -> CommittedShare:
        f = Fields(obj, "committed share")
        c = cls(f.int("index", hi=255), parse_share_id(f.raw("share_id")), parse_node_id(f.raw("node_id")),
                f.int("share_size", hi=2**50), f.bytes("merkle_root", length=HASH_BYTES),
                Envelope.from_json(f.raw("receipt"), kind=StorageReceipt.KIND))
        f.done()
        receipt = StorageReceipt.open(c.receipt)
        if (receipt.share_id, receipt.node_id, receipt.share_size, receipt.merkle_root) != (
                c.share_id, c.node_id, c.share_size, c.merkle_root):
            raise RemoteProtocolError(f"receipt for share {c.index} does not match the share it is attached to")
        return c


@dataclass(frozen=True)
class CommitRequest:
    """Client → mediator: the object is stored; here are at least ``happy`` receipts.

    ``roots`` (optional): the Merkle roots of all n shares, by index. A client that streamed its shares placed
    them without roots; a share it could not store is rebuilt later by repair, which needs that root.
    """

    object_id: ObjectId
    layout: ObjectLayout
    shares: tuple[CommittedShare, ...]
    roots: tuple[bytes, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"object_id": self.object_id, "layout": _layout_json(self.layout),
                                "shares": [s.to_json() for s in self.shares]}
        if self.roots is not None:
            body["roots"] = [b64encode(root) for root in self.roots]
        return body

    @classmethod
    def from_json(cls, obj: object) -> CommitRequest:
        f = Fields(obj, "commit request")
        object_id, layout = parse_object_id(f.raw("object_id")), layout_from_json(f.raw("layout"))
        shares = tuple(CommittedShare.from_json(s) for s in f.list("shares", max_items=256))
        roots = None
        if f.raw("roots", optional=True) is not None:
            listed = f.list("roots", max_items=256)
            if len(listed) != layout.n:
                raise RemoteProtocolError(f"commit request: roots must list all n={layout.n} shares' roots")
            roots = tuple(b64decode(r, field="commit request.roots", length=HASH_BYTES) for r in listed)
        f.done()
        req = cls(object_id, layout, shares, roots)
        _check_share_set(req.layout, req.shares, complete=True)
        if len({s.node_id for s in req.shares}) != len(req.shares):
            raise RemoteProtocolError("two shares of one object on one node")
        if roots is not None and any(roots[s.index] != s.merkle_root for s in shares):
            raise RemoteProtocolError("commit request: a committed share's root differs from its entry in roots")
        return req


# --- manifest pointer ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestPointer:
    """An account's pointer to its latest encrypted tree snapshot, signed by the account key.

    ``sealed`` is opaque to the mediator: the snapshot object's key and length, sealed under a key derived
    from the master key. Versions only grow; the mediator stores a new one only if it is current + 1.
    """

    KIND = "pointer"
    account_id: AccountId
    version: int
    object_id: ObjectId
    sealed: bytes
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {"account_id": self.account_id, "version": self.version, "object_id": self.object_id,
                "sealed": b64encode(self.sealed), "created_at": self.created_at}

    @classmethod
    def from_json(cls, obj: object) -> ManifestPointer:
        f = Fields(obj, "pointer")
        p = cls(parse_account_id(f.raw("account_id")), f.int("version", lo=1), parse_object_id(f.raw("object_id")),
                f.bytes("sealed", max_length=4096), f.int("created_at"))
        f.done()
        return p

    def seal(self, account_key: SigningKey) -> Envelope:
        return Envelope.seal(self.KIND, self.to_json(), account_key)

    @classmethod
    def open(cls, envelope: Envelope) -> ManifestPointer:
        pointer = cls.from_json(envelope.body)
        _check_signer(envelope, pointer.account_id, "account")
        return pointer


# --- challenges ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """Mediator → node (a signed request): prove these shares under this fresh nonce."""

    mediator_id: NodeId
    node_id: NodeId
    round_id: int
    nonce: bytes
    leaves_per_share: int
    share_ids: tuple[ShareId, ...]

    def to_json(self) -> dict[str, Any]:
        return {"mediator_id": self.mediator_id, "node_id": self.node_id, "round_id": self.round_id,
                "nonce": b64encode(self.nonce), "leaves_per_share": self.leaves_per_share,
                "share_ids": list(self.share_ids)}

    @classmethod
    def from_json(cls, obj: object) -> Challenge:
        f = Fields(obj, "challenge")
        c = cls(parse_node_id(f.raw("mediator_id")), parse_node_id(f.raw("node_id")), f.int("round_id"),
                f.bytes("nonce", length=NONCE_BYTES), f.int("leaves_per_share", lo=1, hi=64),
                _ids(f.list("share_ids", max_items=MAX_SHARES_PER_CHALLENGE), parse_share_id))
        f.done()
        return c


_PROOF_MAGIC = b"FCPR\x01"
_PROOF_TAG = b"fincrypt-proof-v1\x00"
_HEAD = struct.Struct(">32s32sQ32sI")
_SHARE_HEAD = struct.Struct(">32sBB")
_LEAF_HEAD = struct.Struct(">QHB")


@dataclass(frozen=True)
class ProofResponse:
    """Node → mediator: the answer to one challenge, in a compact binary form signed by the node.

    Layout: ``"FCPR" 0x01 | node_id 32 | mediator_id 32 | round u64 | nonce 32 | share count u32`` then per
    share ``share_id 32 | held u8 | leaf count u8`` and per leaf ``index u64 | length u16 | path length u8 |
    data | path hashes``; then a 64-byte Ed25519 signature over ``"fincrypt-proof-v1" 0x00`` + all before.
    A share the node does not hold is listed with held = 0 and no leaves.
    """

    node_id: NodeId
    mediator_id: NodeId
    round_id: int
    nonce: bytes
    proofs: tuple[ShareProof, ...]
    missing: tuple[ShareId, ...]

    def encode(self, node_key: SigningKey) -> bytes:
        parts = [_PROOF_MAGIC, _HEAD.pack(bytes.fromhex(self.node_id), bytes.fromhex(self.mediator_id),
                                          self.round_id, self.nonce, len(self.proofs) + len(self.missing))]
        for proof in self.proofs:
            parts.append(_SHARE_HEAD.pack(bytes.fromhex(proof.share_id), 1, len(proof.leaves)))
            for leaf in proof.leaves:
                parts.append(_LEAF_HEAD.pack(leaf.index, len(leaf.data), len(leaf.path)))
                parts.append(leaf.data)
                parts.extend(leaf.path)
        for share_id in self.missing:
            parts.append(_SHARE_HEAD.pack(bytes.fromhex(share_id), 0, 0))
        unsigned = b"".join(parts)
        return unsigned + node_key.sign(_PROOF_TAG + unsigned)

    @classmethod
    def decode(cls, data: bytes, node_key: PublicKey, *, max_bytes: int) -> ProofResponse:
        """Parse and verify a proof response from the node holding ``node_key``."""
        if len(data) > max_bytes:
            raise TooLargeError(f"proof response of {len(data)} bytes exceeds {max_bytes}")
        if len(data) < len(_PROOF_MAGIC) + _HEAD.size + SIGNATURE_BYTES or not data.startswith(_PROOF_MAGIC):
            raise RemoteProtocolError("not a proof response (bad magic or too short)")
        unsigned, signature = data[:-SIGNATURE_BYTES], data[-SIGNATURE_BYTES:]
        node_key.verify(signature, _PROOF_TAG + unsigned)
        view = memoryview(unsigned)
        at = len(_PROOF_MAGIC)
        node_raw, mediator_raw, round_id, nonce, count = _HEAD.unpack_from(view, at)
        at += _HEAD.size
        proofs: list[ShareProof] = []
        missing: list[ShareId] = []
        try:
            for _ in range(count):
                share_raw, held, leaf_total = _SHARE_HEAD.unpack_from(view, at)
                at += _SHARE_HEAD.size
                share_id = ShareId(share_raw.hex())
                if held == 0:
                    missing.append(share_id)
                    continue
                leaves = []
                for _ in range(leaf_total):
                    index, length, path_len = _LEAF_HEAD.unpack_from(view, at)
                    at += _LEAF_HEAD.size
                    if length > LEAF_SIZE:
                        raise RemoteProtocolError("proof leaf longer than a leaf")
                    leaf_data = bytes(view[at:at + length])
                    at += length
                    path = tuple(bytes(view[at + i * HASH_BYTES:at + (i + 1) * HASH_BYTES]) for i in range(path_len))
                    at += path_len * HASH_BYTES
                    if len(leaf_data) != length or at > len(view):
                        raise RemoteProtocolError("proof response is truncated")
                    leaves.append(LeafProof(index, leaf_data, path))
                proofs.append(ShareProof(share_id, tuple(leaves)))
        except struct.error as exc:
            raise RemoteProtocolError("proof response is truncated") from exc
        if at != len(view):
            raise RemoteProtocolError("proof response has trailing bytes")
        return cls(NodeId(node_raw.hex()), NodeId(mediator_raw.hex()), round_id, nonce, tuple(proofs),
                   tuple(missing))

"""The client's data plane: whole files in, network objects out, and back.

An *object* is one version of one file: padded, cut into segments, each sealed under the object's own key and
erasure-coded into n blocks; block i of every segment, concatenated, is share i, stored on its own node. What
the client must remember to read it again is a :class:`StoredObject` (id, key, size, layout and the Merkle root
of every share): the FUSE layer keeps it in its SQLite tree, and the tree snapshot travels in the
network as an ordinary object (see :mod:`fincryptfs.manifest`).

The roots in a StoredObject are the ones the client computed while encoding, so a reader trusts neither the
nodes nor the mediator for integrity. :class:`ObjectStore` is the one entry point; the pipelines live in
:mod:`fincryptfs.uploader` and :mod:`fincryptfs.downloader` (see docs/client-data-path.md).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from .core.crypto import KEY_BYTES
from .core.errors import FincryptError, RemoteProtocolError
from .core.identity import SigningKey
from .core.ids import parse_object_id, parse_share_id
from .core.layout import ObjectLayout
from .core.merkle import HASH_BYTES
from .core.messages import layout_from_json, layout_to_json
from .core.wire import Fields, b64encode
from .mediator_client import MediatorClient

if TYPE_CHECKING:
    from .uploader import MembersReader


class UploadError(FincryptError):
    """Fewer than ``happy`` shares could be stored; nothing was committed. The message says how many and why."""


class ReadError(FincryptError):
    """Fewer than k shares could be fetched and verified; the message names the failing nodes."""


class FileChangedError(FincryptError):
    """The file changed while it was being uploaded (its size or mtime, or the bytes a later pass read again);
    upload it again, under a new key, once it is quiet."""


@dataclass(frozen=True)
class ShareRef:
    """One share of an object: its position, its random id, and the Merkle root the client computed."""

    index: int
    share_id: str
    merkle_root: bytes

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "share_id": self.share_id, "merkle_root": b64encode(self.merkle_root)}

    @classmethod
    def from_json(cls, obj: object) -> ShareRef:
        f = Fields(obj, "share ref")
        ref = cls(f.int("index", hi=255), parse_share_id(f.raw("share_id")), f.bytes("merkle_root", length=HASH_BYTES))
        f.done()
        return ref


@dataclass(frozen=True)
class StoredObject:
    """Everything needed to read an object back, given a mediator that knows where its shares are.

    ``shares`` names all n shares, those stored at upload and those left for the mediator's repair to rebuild
    against the root committed for them, so that a share rebuilt later can be read. Records written before
    that list only the shares stored at upload (the JSON is the same); a reader takes either.
    """

    object_id: str
    file_key: bytes
    size: int  # plaintext bytes
    layout: ObjectLayout
    shares: tuple[ShareRef, ...]

    def to_json(self) -> dict[str, Any]:
        """For the client's SQLite and the encrypted manifest (the key is in it: never store it in clear)."""
        return {"object_id": self.object_id, "file_key": base64.b64encode(self.file_key).decode("ascii"),
                "size": self.size, "layout": layout_to_json(self.layout),
                "shares": [s.to_json() for s in self.shares]}

    @classmethod
    def from_json(cls, obj: object) -> StoredObject:
        f = Fields(obj, "stored object")
        raw_key = f.str("file_key", max_len=64)
        try:
            file_key = base64.b64decode(raw_key, validate=True)
        except ValueError as exc:
            raise RemoteProtocolError("stored object: file_key is not base64") from exc
        if len(file_key) != KEY_BYTES:
            raise RemoteProtocolError(f"stored object: file_key must be {KEY_BYTES} bytes")
        stored = cls(parse_object_id(f.raw("object_id")), file_key, f.int("size", hi=2**50),
                     layout_from_json(f.raw("layout")),
                     tuple(ShareRef.from_json(s) for s in f.list("shares", max_items=256)))
        f.done()
        indices = [s.index for s in stored.shares]
        if len(set(indices)) != len(indices) or any(i >= stored.layout.n for i in indices):
            raise RemoteProtocolError("stored object: share indices must be distinct and below n")
        if stored.size > stored.layout.padded_size:
            raise RemoteProtocolError("stored object: size exceeds the padded size")
        return stored

    def share(self, index: int) -> ShareRef | None:
        for ref in self.shares:
            if ref.index == index:
                return ref
        return None


class ObjectStore:
    """Store and fetch whole files as objects; memory stays bounded whatever the file size."""

    def __init__(self, *, mediator_url: str, account_key: SigningKey, k: int, n: int, happy: int,
                 segment_size: int, spool_dir: Path, http: httpx.AsyncClient, cpu: trio.CapacityLimiter,
                 hedge_after: float = 5.0, place_rounds: int = 3, run_share_bytes: int = 8 * 2**20) -> None:
        if not 1 <= k <= happy <= n:
            raise ValueError(f"need 1 <= k <= happy <= n; got k={k}, happy={happy}, n={n}")
        self.mediator = MediatorClient(url=mediator_url, account_key=account_key, http=http)
        self.account_key = account_key
        self.k, self.n, self.happy = k, n, happy
        self.segment_size = segment_size
        self.spool_dir = Path(spool_dir)
        self.http = http
        self.cpu = cpu
        self.hedge_after = hedge_after
        self.place_rounds = place_rounds
        self.run_share_bytes = run_share_bytes  # share bytes fetched per node per request (bounds read memory)

    async def put_file(self, path: Path, *, progress: Callable[[int], None] | None = None,
                       before_place: Callable[[str], None] | None = None,
                       before_commit: Callable[[str], None] | None = None) -> StoredObject:
        """Encode, place, store and commit ``path``; UploadError if fewer than ``happy`` shares were stored.

        ``progress`` is called with the number of file bytes encoded so far, then with the file size once the
        object is committed. ``before_commit(object_id)`` is called just before the commit request, so that a
        caller can record the object durably (a client killed after the commit would otherwise never learn
        of an object it pays for). ``before_place(object_id)`` likewise before the first place request: a
        client killed while the shares stream out would otherwise leave them placed and stored until the
        mediator's sweep a day later.
        """
        from .uploader import upload_file

        return await upload_file(self, Path(path), progress=progress, before_place=before_place,
                                 before_commit=before_commit)

    async def put_members(self, members: MembersReader, *, before_place: Callable[[str], None] | None = None,
                          before_commit: Callable[[str], None] | None = None) -> StoredObject:
        """``put_file`` of the concatenation ``members`` reads (a pack, without a staging copy); afterwards
        ``members.damaged`` lists the members whose range must not be referenced."""
        from .uploader import Source, upload_source

        source = Source.of(members, segment_size=self.segment_size, k=self.k, n=self.n)
        return await upload_source(self, source, before_place=before_place, before_commit=before_commit)

    async def read_range(self, obj: StoredObject, offset: int, length: int) -> bytes:
        """Plaintext bytes [offset, offset + length) of the object (short at end of file, as read(2) is)."""
        from .downloader import read_range

        return await read_range(self, obj, offset, length)

    async def fetch_to_file(self, obj: StoredObject, dest: Path, *,
                            progress: Callable[[Path, int], None] | None = None, clobber: bool = True) -> bool:
        """Write the whole plaintext to ``dest`` (via a temporary file renamed into place when complete); see
        ``downloader.fetch_to_file`` for ``progress`` and ``clobber``."""
        from .downloader import fetch_to_file

        return await fetch_to_file(self, obj, Path(dest), progress=progress, clobber=clobber)

    async def delete(self, object_id: str) -> None:
        """Release the object: the mediator tells the nodes to delete its shares and billing stops."""
        await self.mediator.delete_object(object_id)

    async def health(self, object_id: str) -> dict[str, Any]:
        """The mediator's view of the object's health: ``{"healthy", "total", "state"}``."""
        return (await self.mediator.object_info(object_id)).health

    async def account(self) -> dict[str, Any]:
        return await self.mediator.account()

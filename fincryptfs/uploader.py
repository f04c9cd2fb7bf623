"""The upload path: file → shares streamed to their nodes while they are encoded → receipted, committed object.

Ordering (docs/client-data-path.md): the mediator places the n shares first, knowing their sizes but not their
Merkle roots (open grants); one pass over the file then seals, erasure-codes and hashes each segment in worker
threads while the event loop hands block i of every segment to the PUT of share i, so encoding and sending
overlap and no encoded byte touches the local disk. Each node states the root of what it received in its
receipt, which is accepted only if it is the root computed here. A share whose node failed is placed again,
now with its root, and sent by another pass that re-encodes the file (sealing is deterministic for an
object: its key is fresh and a segment's nonce is its index) but sends only the missing shares; a segment
whose plaintext is not what the first pass sealed is refused before it is sealed again (``SealedDigests``),
so one (key, nonce) never seals two plaintexts. The object is committed once ``happy`` receipts are in; if
the upload fails, what landed is released. Memory is bounded by ``ORDERED_WINDOW`` segments plus
``SEND_QUEUE`` blocks per share, whatever the file size.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import httpx
import trio
from cryptography.hazmat.primitives.poly1305 import Poly1305

from .core.crypto import new_file_key
from .core.errors import FincryptError, RemoteProtocolError
from .core.ids import NodeId, ObjectId, ShareId, new_object_id, new_share_id
from .core.layout import ObjectLayout
from .core.merkle import HashedChunk, RootBuilder, hash_chunk
from .core.messages import (
    CommitRequest,
    CommittedShare,
    Placement,
    PlaceRequest,
    ShareSpec,
    StorageReceipt,
    UploadGrant,
)
from .core.objectcodec import encode_segment_blocks, plan_object, segment_plaintext
from .core.wire import Envelope, decode_object
from .objectstore import FileChangedError, ShareRef, StoredObject, UploadError
from .rpc import PeerError, read_at_most, why_unreachable

if TYPE_CHECKING:
    from .objectstore import ObjectStore

log = logging.getLogger(__name__)

ORDERED_WINDOW = 4  # segments in flight in run_ordered: both cores stay busy while the event loop catches up
SEND_QUEUE = 6  # blocks queued per share between the encoder and that share's PUT
WRITE_PIECE = 2**20  # largest single write to a local file (see pwrite_all)
RELEASE_RETRY = 0.2  # seconds between releases of an object whose place request was cut short
MAX_PUT_ANSWER = 65536  # bytes of a node's answer to a PUT read at most: a signed receipt is about 1 KB
# Seconds a node has for its whole answer (headers and receipt) once it has the share's last byte: it only has
# to fsync and sign. httpx's timeouts are per read, so without this a node sending its answer a byte at a time
# held the upload for as long as it liked (a 1 KB receipt at one byte every 20 s: over five hours).
PUT_ANSWER_TIMEOUT = 60.0
T = TypeVar("T")

Block = bytes | memoryview


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset``, at most WRITE_PIECE bytes per call.

    Why pieces: measured on Linux 6.18 / ext4, a 256 MiB fetch in 2 MiB segments took 1.0-1.3 s (and 40 %
    more CPU) writing each segment with one call, 0.81-0.87 s writing it in 1 MiB pieces; the kernel's time
    went to allocating page-cache memory, presumably larger folios for larger aligned writes.
    """
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view[:WRITE_PIECE], offset)
        view, offset = view[written:], offset + written


async def run_ordered(cpu: trio.CapacityLimiter, count: int, job: Callable[[int], T],
                      consume: Callable[[int, T], Awaitable[None]], window: int = ORDERED_WINDOW) -> None:
    """``consume(i, job(i))`` for i in 0..count-1 in order, the jobs in worker threads, at most ``window`` ahead.

    Unlike batches of jobs, no core idles while a batch's slowest job finishes or while the consumer works;
    memory stays bounded by ``window`` results. The first expected error is raised as is.
    """
    results: dict[int, T | BaseException] = {}
    done: dict[int, trio.Event] = {}
    slots = trio.Semaphore(window)

    async def run(i: int) -> None:
        try:
            results[i] = await trio.to_thread.run_sync(job, i, limiter=cpu)
        except (OSError, ValueError, FincryptError) as exc:
            results[i] = exc
        done.setdefault(i, trio.Event()).set()

    async def start_all(nursery: trio.Nursery) -> None:
        for i in range(count):
            await slots.acquire()
            nursery.start_soon(run, i)

    failed: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(start_all, nursery)
        for i in range(count):
            await done.setdefault(i, trio.Event()).wait()
            del done[i]
            result = results.pop(i)
            slots.release()
            if not isinstance(result, BaseException):
                try:
                    await consume(i, result)
                    continue
                except (OSError, ValueError, FincryptError) as exc:
                    result = exc
            failed = result
            nursery.cancel_scope.cancel()
            break
    if failed is not None:
        raise failed


# --- encoding -------------------------------------------------------------------------------------------------


# Opening what should be a regular file: never follow a symbolic link, and never block on a FIFO that was put in
# its place (``put`` reads sources by name after its walk saw them, so either can appear meanwhile).
_OPEN_REGULAR = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
# What reading a file that was replaced by something else (or removed) fails with: not a disk error.
_NOT_THE_FILE = frozenset({errno.ENOENT, errno.ELOOP, errno.ESPIPE, errno.EISDIR, errno.ENXIO})


class FileReader:
    """The bytes of one open file, which must not change while they are read (size and mtime are checked)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, _OPEN_REGULAR)
        st = os.fstat(self.fd)
        self.size, self.mtime_ns = st.st_size, st.st_mtime_ns

    def read(self, at: int, length: int) -> bytes:
        return os.pread(self.fd, length, at)

    def describe(self, at: int, length: int) -> str:
        """Who to blame for bytes [at, at + length) in a message."""
        return str(self.path)

    def check_unchanged(self) -> None:
        st = os.fstat(self.fd)
        if (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns):
            raise FileChangedError(f"{self.path} changed while it was being backed up (size {self.size} → "
                                   f"{st.st_size}); it will be uploaded again once it is quiet")

    def close(self) -> None:
        os.close(self.fd)


class MembersReader:
    """Files read as one concatenation, each for the size it was given: a pack read straight from the cache
    copies of its members, without staging it in a file first.

    A member that is missing, shorter than its size or no longer a regular file reads as zeros and is listed in
    ``damaged``: its range of the object is garbage and must not be referenced (it was deleted or rewritten
    meanwhile; the caller's version check catches the usual cases, this one catches the rest). Members are
    opened per read, so a pack of many files holds no descriptors between segments; reads may run in several
    threads at once.
    """

    def __init__(self, members: Sequence[tuple[Path, int]]) -> None:
        self.paths = [path for path, _ in members]
        self.offsets = list(itertools.accumulate((size for _, size in members), initial=0))
        self.size = self.offsets[-1]
        self.damaged: set[int] = set()

    def placement(self, index: int) -> tuple[int, int]:
        """(offset, size) of member ``index`` in the object."""
        return self.offsets[index], self.offsets[index + 1] - self.offsets[index]

    def read(self, at: int, length: int) -> bytes:
        end = min(at + length, self.size)
        parts: list[bytes] = []
        index = bisect.bisect_right(self.offsets, at) - 1
        while at < end:
            start, stop = self.offsets[index], self.offsets[index + 1]
            want = min(end, stop) - at
            if want > 0:
                parts.append(self._read_member(index, at - start, want))
                at += want
            index += 1
        return b"".join(parts)

    def _read_member(self, index: int, offset: int, length: int) -> bytes:
        try:
            fd = os.open(self.paths[index], _OPEN_REGULAR)
        except OSError as exc:
            if exc.errno not in _NOT_THE_FILE:
                raise  # e.g. EIO, EMFILE: the pack is retried later
            data = b""
        else:
            try:
                data = os.pread(fd, length, offset)
            except OSError as exc:
                if exc.errno not in _NOT_THE_FILE:
                    raise
                data = b""
            finally:
                os.close(fd)
        if len(data) < length:
            self.damaged.add(index)
            data += bytes(length - len(data))
        return data

    def describe(self, at: int, length: int) -> str:
        """The members that hold bytes [at, at + length), for a message."""
        names = [str(path) for path, start, stop in zip(self.paths, self.offsets[:-1], self.offsets[1:], strict=True)
                 if start < at + length and stop > at]
        more = f" or {len(names) - 3} more" if len(names) > 3 else ""
        return f"one of the files packed together ({', '.join(names[:3])}{more})" if names else \
            f"one of the {len(self.paths)} files packed together"

    def check_unchanged(self) -> None:
        pass  # per member: ``damaged``, the caller's version check, and ``SealedDigests`` between passes

    def close(self) -> None:
        pass


PlainReader = FileReader | MembersReader

DIGEST_BYTES = 16  # a Poly1305 tag


@dataclass
class SealedDigests:
    """A keyed digest of the plaintext each segment of one object was first sealed with, so that its (key,
    nonce) never seals another.

    Why: a share whose node failed is sent again by another pass that reads the source again and seals it again
    under the same key and per-segment nonces. That is safe only if the pass reads the very bytes the first one
    did: two ciphertexts of different plaintexts under one AES-GCM (key, nonce) give away the XOR of the
    plaintexts and the means to forge tags under that key. Size and mtime cannot tell (a same-size rewrite
    within the mtime's granularity, a restored mtime, a pack member the mount rewrites), so every later sealing
    is checked first, against the digest recorded at the first: ``FileChangedError`` if it differs, and the
    upload starts over under a new key.

    The digest is Poly1305 under a random key drawn per object, kept in memory and never revealed, used as a
    universal hash: two different segments of at most 64 MiB collide with probability below 2^-81, whatever
    was written. It runs at ~5x the speed of SHA-256 (9.5 against 1.7 GB/s on one core with SHA extensions):
    it adds ~3 % to the encoding CPU of a first pass, SHA-256 would add ~15 %. Memory: 16 bytes per segment
    plus one flag byte (17 KiB for 2 GiB in 2 MiB segments, 8.5 MiB in 4 KiB segments).
    """

    key: bytes = field(repr=False)
    digests: bytearray = field(repr=False)
    sealed: bytearray = field(repr=False)  # 1 at a segment sealed once already

    @classmethod
    def for_segments(cls, count: int) -> SealedDigests:
        return cls(os.urandom(32), bytearray(DIGEST_BYTES * count), bytearray(count))

    def admit(self, index: int, plaintext: bytes) -> bool:
        """Record segment ``index``'s digest if it was never sealed; else whether ``plaintext`` is the one it was
        sealed with. Segments may be admitted from several threads at once, never one segment twice at once."""
        digest = Poly1305.generate_tag(self.key, plaintext)
        at = index * DIGEST_BYTES
        if not self.sealed[index]:
            self.digests[at:at + DIGEST_BYTES] = digest
            self.sealed[index] = 1
            return True
        return self.digests[at:at + DIGEST_BYTES] == digest


@dataclass(frozen=True)
class Source:
    """What is being uploaded, open, and the object it becomes: ids, key and layout fixed once."""

    reader: PlainReader
    layout: ObjectLayout
    object_id: ObjectId
    file_key: bytes
    share_ids: tuple[ShareId, ...]
    sealed: SealedDigests

    @classmethod
    def of(cls, reader: PlainReader, *, segment_size: int, k: int, n: int) -> Source:
        layout = plan_object(reader.size, segment_size, k, n)
        return cls(reader, layout, new_object_id(), new_file_key(), tuple(new_share_id() for _ in range(n)),
                   SealedDigests.for_segments(layout.segment_count))

    @classmethod
    def open(cls, path: Path, *, segment_size: int, k: int, n: int) -> Source:
        reader = FileReader(path)
        try:
            return cls.of(reader, segment_size=segment_size, k=k, n=n)
        except BaseException:
            reader.close()
            raise

    @property
    def size(self) -> int:
        return self.reader.size

    def close(self) -> None:
        self.reader.close()

    def encode(self, index: int, *, hashed: bool) -> tuple[list[Block], list[HashedChunk] | None]:
        """Segment ``index`` as its n blocks (the same bytes on every pass), and their leaf hashes if asked;
        FileChangedError, before anything is sealed, if its plaintext is not the one it was first sealed with."""
        try:
            plaintext = segment_plaintext(self.layout, self.size, index, self.reader.read)
        except OSError as exc:
            if not isinstance(self.reader, FileReader):
                raise  # members are padded, never short: this is the disk failing
            raise FileChangedError(f"{self.reader.path} changed while it was being backed up ({exc}); it will "
                                   "be uploaded again once it is quiet") from exc
        if not self.sealed.admit(index, plaintext):
            what = self.reader.describe(index * self.layout.segment_size, self.layout.plain_length(index))
            raise FileChangedError(f"{what} changed while it was being backed up (read again to resend a share, "
                                   "it gave other bytes); it will be uploaded again once it is quiet")
        blocks = encode_segment_blocks(self.file_key, self.object_id, self.layout, index, plaintext)
        if not hashed:
            return blocks, None
        offset = self.layout.block_offset(index)
        return blocks, [hash_chunk(offset, block) for block in blocks]

    def check_unchanged(self) -> None:
        self.reader.check_unchanged()


# --- sending shares -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Landed:
    """A share a node says it stored: its receipt (checked against the grant, not yet against our root)."""

    placement: Placement
    receipt: StorageReceipt
    envelope: Envelope


async def put_share(http: httpx.AsyncClient, placement: Placement, share_id: ShareId, share_size: int,
                    blocks: trio.MemoryReceiveChannel[Block]) -> Landed:
    """Stream one share, block by block as the encoder produces them, to its node; its receipt."""
    grant = UploadGrant.open(placement.grant)
    if (grant.node_id, grant.share_id, grant.share_size) != (placement.node_id, share_id, share_size):
        raise PeerError(f"mediator issued a grant for share {placement.index} that does not match what was asked")
    url = f"{placement.node_url}/v1/shares/{share_id}"
    headers = {"fincrypt-grant": placement.grant.to_header(), "content-length": str(share_size),
               "content-type": "application/octet-stream"}

    answer_by = trio.CancelScope()  # its deadline starts once the body is sent

    async def body() -> AsyncIterator[bytes]:
        async for block in blocks:
            yield block  # type: ignore[misc]  # h11 sends any bytes-like object
        answer_by.deadline = trio.current_time() + PUT_ANSWER_TIMEOUT

    with answer_by:
        try:
            async with http.stream("PUT", url, content=body(), headers=headers) as response:
                answer, whole = await read_at_most(response, MAX_PUT_ANSWER)
        except httpx.HTTPError as exc:
            raise PeerError(f"node {placement.node_url} is unreachable: {why_unreachable(exc)}") from exc
    if answer_by.cancelled_caught:
        raise PeerError(f"node {placement.node_url} did not answer within {PUT_ANSWER_TIMEOUT:g} s of receiving "
                        f"share {placement.index} (too slow or stalling): the share goes to another node")
    if response.status_code != 201:
        raise PeerError(f"node {placement.node_url} refused share {placement.index}: {response.status_code} "
                        f"{answer[:300].decode('utf-8', 'replace')}", response.status_code)
    if not whole:
        raise PeerError(f"node {placement.node_url} answered share {placement.index} with more than "
                        f"{MAX_PUT_ANSWER} bytes; a receipt is about 1 KB")
    try:
        envelope = Envelope.from_json(decode_object(answer).get("receipt"), kind=StorageReceipt.KIND)
        receipt = StorageReceipt.open(envelope)
    except RemoteProtocolError as exc:
        raise PeerError(f"node {placement.node_url} sent a bad receipt for share {placement.index}: {exc}") from exc
    if not receipt.matches(grant):
        raise PeerError(f"node {placement.node_url} sent a receipt that does not match its grant")
    return Landed(placement, receipt, envelope)


async def send_pass(store: ObjectStore, source: Source, placements: dict[int, Placement],
                    builders: list[RootBuilder] | None, progress: Callable[[int], None] | None = None
                    ) -> dict[int, Landed | str]:
    """One pass over the file: every segment encoded (and hashed into ``builders`` if given), block i streamed
    to ``placements[i]``. Per placed share: what landed, or why not. A failing node does not stop the others;
    an encoding error (the file changed) cancels every PUT and is raised."""
    results: dict[int, Landed | str] = {}
    hashed = builders is not None
    failed: BaseException | None = None

    async def send_one(index: int, placement: Placement, blocks: trio.MemoryReceiveChannel[Block]) -> None:
        async with blocks:  # closing it tells the encoder to stop feeding this share
            try:
                results[index] = await put_share(store.http, placement, source.share_ids[index],
                                                 source.layout.share_size, blocks)
            except (PeerError, RemoteProtocolError, OSError) as exc:
                results[index] = str(exc)

    async with trio.open_nursery() as nursery:
        senders: dict[int, trio.MemorySendChannel[Block]] = {}
        for index, placement in placements.items():
            send, receive = trio.open_memory_channel[Block](SEND_QUEUE)
            senders[index] = send
            nursery.start_soon(send_one, index, placement, receive)

        async def feed(segment: int, encoded: tuple[list[Block], list[HashedChunk] | None]) -> None:
            blocks, hashes = encoded
            if builders is not None and hashes is not None:
                for builder, chunk in zip(builders, hashes, strict=True):
                    builder.update_hashed(chunk)
            for index, send in list(senders.items()):
                try:
                    await send.send(blocks[index])
                except trio.BrokenResourceError:  # that share's PUT failed; its reason is in results
                    del senders[index]
            if progress is not None:
                progress(min(source.size, (segment + 1) * source.layout.segment_size))

        try:
            await run_ordered(store.cpu, source.layout.segment_count,
                              lambda segment: source.encode(segment, hashed=hashed), feed)
        except (OSError, ValueError, FincryptError) as exc:
            failed = exc
            nursery.cancel_scope.cancel()
        for send in senders.values():
            send.close()  # end of every body: the nodes now check, fsync and answer
    if failed is not None:
        raise failed
    return results


@dataclass
class PlaceState:
    """Whether the mediator may hold the object being uploaded (what releasing it after a failure needs)."""

    answered: bool = False  # a place request was granted: the mediator holds the object
    unanswered: bool = False  # a place request went out and its answer never came (cancelled, cut off)


async def store_shares(store: ObjectStore, source: Source, progress: Callable[[int], None] | None = None,
                       placing: PlaceState | None = None) -> tuple[dict[int, CommittedShare], list[bytes]]:
    """Place and stream shares until all n are stored, placement runs out, or the rounds are used up; the
    stored shares and the roots of all n."""
    placing = PlaceState() if placing is None else placing
    n = source.layout.n
    stored: dict[int, CommittedShare] = {}
    failures: dict[int | str, str] = {}
    excluded: set[NodeId] = set()
    roots: list[bytes] | None = None
    for _round in range(store.place_rounds):
        todo = [i for i in range(n) if i not in stored]
        if not todo:
            break
        specs = tuple(ShareSpec(i, source.share_ids[i], source.layout.share_size, roots[i] if roots else None)
                      for i in todo)
        request = PlaceRequest(source.object_id, source.layout, specs,
                               tuple(sorted(excluded | {c.node_id for c in stored.values()})))
        placing.unanswered = True
        try:
            placements = {p.index: p for p in await store.mediator.place(request)}
        except PeerError as exc:
            placing.unanswered = exc.unreachable  # refused: the answer came; unreachable: it may have landed
            if exc.status == 503 and stored:
                for index in todo:
                    failures[index] = f"{failures.get(index, 'not placed')}; no other node to retry on"
                failures["mediator"] = str(exc)
                break  # the mediator has no more nodes; maybe what is stored is enough
            raise UploadError(f"could not place object {source.object_id[:16]}…: {exc}") from exc
        placing.unanswered, placing.answered = False, True
        for index in todo:
            if index not in placements:
                failures[index] = "the mediator placed it nowhere"
        builders = [RootBuilder() for _ in range(n)] if roots is None else None  # O(log size) memory each
        results = await send_pass(store, source, {i: placements[i] for i in todo if i in placements}, builders,
                                  progress if roots is None else None)
        await trio.to_thread.run_sync(source.check_unchanged)
        if builders is not None:
            roots = [builder.finish() for builder in builders]
            for i, builder in enumerate(builders):
                if builder.size != source.layout.share_size:
                    raise AssertionError(f"share {i} has {builder.size} bytes, the layout says "
                                         f"{source.layout.share_size}")
        assert roots is not None
        for index, result in results.items():
            if isinstance(result, Landed) and result.receipt.merkle_root != roots[index]:
                result = (f"node {result.placement.node_url} stored share {index} with another Merkle root than "
                          "the one sent (damaged on the way?)")
            if isinstance(result, Landed):
                stored[index] = CommittedShare(index, source.share_ids[index], result.placement.node_id,
                                               source.layout.share_size, roots[index], result.envelope)
                failures.pop(index, None)
            else:
                failures[index] = result
                excluded.add(placements[index].node_id)
                log.info("share %d of object %s not stored: %s", index, source.object_id[:16], result)
    if len(stored) < store.happy:
        ordered = sorted(failures.items(), key=lambda item: (isinstance(item[0], str), str(item[0]).zfill(3)))
        reasons = "; ".join(f"share {i}: {why}" if isinstance(i, int) else f"{i}: {why}" for i, why in ordered)
        raise UploadError(f"stored only {len(stored)} of {n} shares of object {source.object_id[:16]}…, need "
                          f"{store.happy}: {reasons}")
    assert roots is not None
    return stored, roots


async def _release_quietly(store: ObjectStore, object_id: str, placing: PlaceState, timeout: float = 10) -> None:
    """Drop a half-stored object so the shares that did land are released instead of orphaned (the mediator
    sweeps what this misses a day after the grants expire). Nothing to drop if it was never placed. A place
    request cut short may reach the mediator's database after this release does (another connection): a
    "no such object" is then asked again until ``timeout`` (a fresh-clone CI run left such an object pending)."""
    if not (placing.answered or placing.unanswered):
        return
    with trio.move_on_after(timeout):
        while True:
            try:
                await store.mediator.delete_object(object_id)
            except PeerError as exc:
                if exc.status == 404 and placing.unanswered and not placing.answered:
                    await trio.sleep(RELEASE_RETRY)
                    continue
                if exc.status != 404:
                    log.warning("could not release the half-stored object %s: %s", object_id[:16], exc)
            return


async def upload_file(store: ObjectStore, path: Path, *, progress: Callable[[int], None] | None = None,
                      before_place: Callable[[str], None] | None = None,
                      before_commit: Callable[[str], None] | None = None) -> StoredObject:
    source = await trio.to_thread.run_sync(lambda: Source.open(path, segment_size=store.segment_size, k=store.k,
                                                               n=store.n))
    return await upload_source(store, source, progress=progress, before_place=before_place,
                               before_commit=before_commit)


async def upload_source(store: ObjectStore, source: Source, *, progress: Callable[[int], None] | None = None,
                        before_place: Callable[[str], None] | None = None,
                        before_commit: Callable[[str], None] | None = None) -> StoredObject:
    """Store and commit ``source`` (closed on return); see ``ObjectStore.put_file``."""
    placing = PlaceState()
    try:
        if before_place is not None:
            before_place(source.object_id)
        try:
            stored, roots = await store_shares(store, source, progress, placing)
            shares = tuple(stored[i] for i in sorted(stored))
            if before_commit is not None:
                before_commit(source.object_id)
            try:  # every root: a share that could not be stored is rebuilt by repair against it
                await store.mediator.commit(CommitRequest(source.object_id, source.layout, shares, tuple(roots)))
            except PeerError as exc:
                raise UploadError(f"the mediator refused to commit object {source.object_id[:16]}…: {exc}"
                                  ) from exc
        except (FincryptError, OSError):
            await _release_quietly(store, source.object_id, placing)
            raise
        except BaseException:  # cancelled (superseded, shutting down; maybe in a group): release what landed, quickly
            with trio.CancelScope(shield=True):
                await _release_quietly(store, source.object_id, placing, timeout=2)
            raise
    finally:
        source.close()
    if progress is not None:
        progress(source.size)
    # every root, as committed: a share stored only later, by repair, must be readable too
    return StoredObject(source.object_id, source.file_key, source.size, source.layout,
                        tuple(ShareRef(i, source.share_ids[i], root) for i, root in enumerate(roots)))

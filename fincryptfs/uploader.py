"""The upload path: file → spooled shares → placed, stored, receipted, committed object.

Ordering (docs/client-data-path.md): every share is encoded to a spool file and its Merkle root known *before*
the mediator is asked for placements, because a grant names the exact size and root a node may accept; the
object is committed only once ``happy`` nodes returned receipts that match their grants; spool files are
removed whatever happens. Memory is bounded by ``ORDERED_WINDOW`` segments plus ``STREAM_CHUNK`` per share
in flight, whatever the file size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import trio

from .core.crypto import new_file_key
from .core.errors import FincryptError, RemoteProtocolError
from .core.ids import NodeId, ObjectId, new_object_id, new_share_id
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
from .rpc import PeerError

if TYPE_CHECKING:
    from .objectstore import ObjectStore

log = logging.getLogger(__name__)

ORDERED_WINDOW = 4  # segments in flight in run_ordered: both cores stay busy while the event loop catches up
STREAM_CHUNK = 2**20  # large reads and sends: each costs a thread round trip and a few syscalls
T = TypeVar("T")


async def run_in_threads(cpu: trio.CapacityLimiter, jobs: Sequence[Callable[[], T]]) -> list[T]:
    """Run blocking jobs concurrently in worker threads; results in order, the first expected error raised."""
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    async def run(i: int, job: Callable[[], T]) -> None:
        try:
            results[i] = await trio.to_thread.run_sync(job, limiter=cpu)
        except (OSError, ValueError, FincryptError) as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for i, job in enumerate(jobs):
            nursery.start_soon(run, i, job)
    if errors:
        raise errors[0]
    return results


# --- encoding to spool files ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedObject:
    """An object encoded to n spool files, ready to place."""

    object_id: ObjectId
    file_key: bytes
    size: int
    layout: ObjectLayout
    specs: tuple[ShareSpec, ...]
    spool_paths: tuple[Path, ...]


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _open_spool(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)


async def run_ordered(cpu: trio.CapacityLimiter, count: int, job: Callable[[int], T],
                      consume: Callable[[int, T], Awaitable[None]], window: int = ORDERED_WINDOW) -> None:
    """``consume(i, job(i))`` for i in 0..count-1 in order, the jobs in worker threads, at most ``window`` ahead.

    Unlike batches of ``run_in_threads``, no core idles while a batch's slowest job finishes or while the
    consumer works; memory stays bounded by ``window`` results. The first expected error is raised as is.
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


async def encode_to_spool(path: Path, *, spool_dir: Path, segment_size: int, k: int, n: int,
                          cpu: trio.CapacityLimiter, spool_paths: list[Path],
                          progress: Callable[[int], None] | None = None) -> EncodedObject:
    """Encode ``path`` into n spool files (appended to ``spool_paths`` as created, so the caller cleans up).

    Each segment is one job in a worker thread: read, seal, erasure-code, write block i at its offset in
    spool file i, and hash the whole leaves of every block (``merkle.hash_chunk``). The event loop only feeds
    the n RootBuilders in segment order, where at most one leaf per block straddles a segment boundary.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    outs: list[int] = []
    try:
        before = os.fstat(fd)
        size = before.st_size
        layout = plan_object(size, segment_size, k, n)
        object_id, file_key = new_object_id(), new_file_key()
        share_ids = [new_share_id() for _ in range(n)]
        for i in range(n):
            spool = spool_dir / f"{object_id}.{i}.share"
            outs.append(_open_spool(spool))
            spool_paths.append(spool)
        builders = [RootBuilder() for _ in range(n)]  # O(log size) memory each

        def read(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        def encode(index: int) -> list[HashedChunk]:
            try:
                plaintext = segment_plaintext(layout, size, index, read)
            except OSError as exc:
                raise FileChangedError(f"{path} changed while it was being backed up ({exc}); "
                                       "it will be uploaded again once it is quiet") from exc
            blocks = encode_segment_blocks(file_key, object_id, layout, index, plaintext)
            del plaintext
            offset = layout.block_offset(index)
            hashed = []
            for out, block in zip(outs, blocks, strict=True):
                pwrite_all(out, block, offset)
                hashed.append(hash_chunk(offset, block))
            return hashed

        async def feed(index: int, hashed: list[HashedChunk]) -> None:
            for builder, chunk in zip(builders, hashed, strict=True):
                builder.update_hashed(chunk)
            if progress is not None:
                progress(min(size, (index + 1) * segment_size))

        await run_ordered(cpu, layout.segment_count, encode, feed)
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise FileChangedError(f"{path} changed while it was being backed up (size {before.st_size} → "
                                   f"{after.st_size}); it will be uploaded again once it is quiet")
        for i, builder in enumerate(builders):
            if builder.size != layout.share_size:
                raise AssertionError(f"share {i} has {builder.size} bytes, layout says {layout.share_size}")
        specs = tuple(ShareSpec(i, share_ids[i], layout.share_size, builders[i].finish()) for i in range(n))
        return EncodedObject(object_id, file_key, size, layout, specs, tuple(spool_paths))
    finally:
        os.close(fd)
        for out in outs:
            os.close(out)


# --- storing shares on nodes ----------------------------------------------------------------------------------


async def _spool_chunks(path: Path) -> AsyncIterator[bytes]:
    """The spool file in STREAM_CHUNK reads, each in a worker thread (a read from disk may block)."""
    fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        offset = 0
        while chunk := await trio.to_thread.run_sync(os.pread, fd, STREAM_CHUNK, offset):
            offset += len(chunk)
            yield chunk
    finally:
        os.close(fd)


async def put_share(http: httpx.AsyncClient, placement: Placement, spec: ShareSpec, spool: Path) -> CommittedShare:
    """Stream one spool file to its node and return the share with its verified receipt."""
    grant = UploadGrant.open(placement.grant)
    if (grant.node_id, grant.share_id, grant.share_size, grant.merkle_root) != (
            placement.node_id, spec.share_id, spec.share_size, spec.merkle_root):
        raise PeerError(f"mediator issued a grant for share {spec.index} that does not match what was asked")
    url = f"{placement.node_url}/v1/shares/{spec.share_id}"
    headers = {"fincrypt-grant": placement.grant.to_header(), "content-length": str(spec.share_size),
               "content-type": "application/octet-stream"}
    try:
        response = await http.put(url, content=_spool_chunks(spool), headers=headers)
    except httpx.HTTPError as exc:
        raise PeerError(f"node {placement.node_url} is unreachable: {type(exc).__name__} {exc}".rstrip()) from exc
    if response.status_code != 201:
        raise PeerError(f"node {placement.node_url} refused share {spec.index}: {response.status_code} "
                        f"{response.text[:300]}", response.status_code)
    try:
        envelope = Envelope.from_json(decode_object(response.content).get("receipt"), kind=StorageReceipt.KIND)
        receipt = StorageReceipt.open(envelope)
    except RemoteProtocolError as exc:
        raise PeerError(f"node {placement.node_url} sent a bad receipt for share {spec.index}: {exc}") from exc
    if not receipt.matches(grant):
        raise PeerError(f"node {placement.node_url} sent a receipt that does not match its grant")
    return CommittedShare(spec.index, spec.share_id, placement.node_id, spec.share_size, spec.merkle_root,
                          envelope)


async def store_shares(store: ObjectStore, encoded: EncodedObject) -> dict[int, CommittedShare]:
    """Place and store shares until all n are stored, placement runs out, or the rounds are used up."""
    stored: dict[int, CommittedShare] = {}
    failures: dict[int | str, str] = {}
    excluded: set[NodeId] = set()
    todo = list(encoded.specs)
    for _round in range(store.place_rounds):
        if not todo:
            break
        request = PlaceRequest(encoded.object_id, encoded.layout, tuple(todo),
                               tuple(sorted(excluded | {c.node_id for c in stored.values()})))
        try:
            placements = await store.mediator.place(request)
        except PeerError as exc:
            if exc.status == 503 and stored:
                for spec in todo:
                    failures[spec.index] = f"{failures.get(spec.index, 'not placed')}; no other node to retry on"
                failures["mediator"] = str(exc)
                break  # the mediator has no more nodes; maybe what is stored is enough
            raise UploadError(f"could not place object {encoded.object_id[:16]}…: {exc}") from exc
        by_index = {p.index: p for p in placements}
        results: dict[int, CommittedShare | str] = {}

        async def put_one(spec: ShareSpec, placement: Placement, results: dict[int, CommittedShare | str]) -> None:
            try:
                results[spec.index] = await put_share(store.http, placement, spec,
                                                      encoded.spool_paths[spec.index])
            except (PeerError, RemoteProtocolError, OSError) as exc:
                results[spec.index] = str(exc)
                excluded.add(placement.node_id)

        async with trio.open_nursery() as nursery:
            for spec in todo:
                if spec.index in by_index:
                    nursery.start_soon(put_one, spec, by_index[spec.index], results)
                else:
                    results[spec.index] = "the mediator placed it nowhere"
        for index, result in results.items():
            if isinstance(result, CommittedShare):
                stored[index] = result
                failures.pop(index, None)
            else:
                failures[index] = result
                log.info("share %d of object %s not stored: %s", index, encoded.object_id[:16], result)
        todo = [s for s in encoded.specs if s.index not in stored]
    if len(stored) < store.happy:
        ordered = sorted(failures.items(), key=lambda item: (isinstance(item[0], str), str(item[0]).zfill(3)))
        reasons = "; ".join(f"share {i}: {why}" if isinstance(i, int) else f"{i}: {why}" for i, why in ordered)
        raise UploadError(f"stored only {len(stored)} of {len(encoded.specs)} shares of object "
                          f"{encoded.object_id[:16]}…, need {store.happy}: {reasons}")
    return stored


async def _release_quietly(store: ObjectStore, object_id: str) -> None:
    """Drop a half-stored object so the shares that did land are released instead of orphaned."""
    with trio.move_on_after(10):
        try:
            await store.mediator.delete_object(object_id)
        except PeerError as exc:
            if exc.status != 404:
                log.warning("could not release the half-stored object %s: %s", object_id[:16], exc)


async def upload_file(store: ObjectStore, path: Path, *, progress: Callable[[int], None] | None = None
                      ) -> StoredObject:
    spool_paths: list[Path] = []
    store.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        encoded = await encode_to_spool(path, spool_dir=store.spool_dir, segment_size=store.segment_size,
                                        k=store.k, n=store.n, cpu=store.cpu, spool_paths=spool_paths,
                                        progress=progress)
        try:
            stored = await store_shares(store, encoded)
            shares = tuple(stored[i] for i in sorted(stored))
            try:
                await store.mediator.commit(CommitRequest(encoded.object_id, encoded.layout, shares))
            except PeerError as exc:
                raise UploadError(f"the mediator refused to commit object {encoded.object_id[:16]}…: {exc}"
                                  ) from exc
        except UploadError:
            await _release_quietly(store, encoded.object_id)
            raise
    finally:
        for spool in spool_paths:
            try:
                spool.unlink()
            except FileNotFoundError:
                pass
    if progress is not None:
        progress(encoded.size)
    return StoredObject(encoded.object_id, encoded.file_key, encoded.size, encoded.layout,
                        tuple(ShareRef(c.index, c.share_id, c.merkle_root) for c in shares))

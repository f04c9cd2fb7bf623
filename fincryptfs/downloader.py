"""The read path: any k of n shares, fastest first, every byte checked against the client's own Merkle roots.

A read is planned as *runs* of consecutive segments (pure arithmetic over the layout, :func:`plan_runs`), each
fetched with one ranged GET per node of at most ``MAX_RUN_SHARE_BYTES``. For each run, k fetches start at
once; when one fails, or nothing arrives for ``hedge_after`` seconds, another node is tried; once k ranges have
verified against the roots recorded at upload (never the mediator's word), the rest are cancelled. A node that
served bad bytes is reported to the mediator and skipped for the rest of the read. Fewer than k good ranges is
a :class:`~fincryptfs.objectstore.ReadError`: the reader gets an error, never wrong bytes.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import trio

from .core.errors import FincryptError, IntegrityError, RemoteProtocolError
from .core.layout import ObjectLayout
from .core.merkle import HASH_BYTES, LEAF_SIZE, verify_run
from .core.objectcodec import decode_segment_plaintext
from .core.wire import b64decode, decode_object
from .mediator_client import ObjectInfo
from .objectstore import ReadError, StoredObject
from .rpc import PeerError, signed_headers, why_unreachable
from .uploader import pwrite_all, run_ordered

if TYPE_CHECKING:
    from .objectstore import ObjectStore

log = logging.getLogger(__name__)

MAX_RUN_SHARE_BYTES = 8 * 2**20
# A ranged GET must be over within GET_GRACE seconds plus one second per GET_MIN_RATE bytes asked (8 MiB: 158 s).
# httpx's timeouts are per read: a node sending a byte now and then never trips them, and a read with no other
# node left to ask waited for it for ever. Fastest-first hedging overtakes a slow node long before this.
GET_GRACE = 30.0
GET_MIN_RATE = 64 * 1024
_HEALTHY_STATES = frozenset({"stored", "proven"})
_BAD_STATES = frozenset({"lost", "missing", "deleted", "failed"})


@dataclass(frozen=True)
class Run:
    """Consecutive segments fetched together, and the whole leaves of each share that hold their blocks."""

    segments: range
    first_leaf: int
    leaf_count: int

    @property
    def share_start(self) -> int:
        return self.first_leaf * LEAF_SIZE


def plan_runs(layout: ObjectLayout, segments: range, max_share_bytes: int = MAX_RUN_SHARE_BYTES, *,
              ramp: bool = False) -> list[Run]:
    """Cut ``segments`` into runs whose blocks span at most ``max_share_bytes`` of each share (at least one).

    ``ramp``: the first runs grow (1, 2, 4 … segments), so that a reader streaming a cold file gets its first
    bytes after one segment has been fetched and opened, not after a whole run of up to k × ``max_share_bytes``.
    Only for streaming: each extra run is another round trip to k nodes (a cold read of 2,000 packed small
    files, whose packs were fetched ramped, went from ~1,200 to ~900 files/s).
    """
    full_block = layout.block_length(0)
    per_run = max(1, max_share_bytes // full_block)
    runs = []
    start, ramp_size = segments.start, 1 if ramp else per_run
    while start < segments.stop:
        seg = range(start, min(start + min(ramp_size, per_run), segments.stop))
        start, ramp_size = seg.stop, ramp_size * 2
        begin = layout.block_offset(seg[0])
        end = layout.block_offset(seg[-1]) + layout.block_length(seg[-1])
        first_leaf = begin // LEAF_SIZE
        runs.append(Run(seg, first_leaf, (end - 1) // LEAF_SIZE - first_leaf + 1))
    return runs


@dataclass(frozen=True)
class Source:
    """One share to read from: where the mediator says it is, and the root the client recorded for it."""

    index: int
    share_id: str
    node_id: str
    node_url: str
    merkle_root: bytes

    def describe(self) -> str:
        return f"node {self.node_url} (share {self.index})"


def sources_for(obj: StoredObject, info: ObjectInfo) -> list[Source]:
    """Readable shares: those the mediator can locate *and* whose root the client recorded (any index, whoever
    stored it: the uploader or the mediator's repair), healthy first, then those in another state (placed but
    never stored, on a node that went offline), lost ones last."""
    roots = {ref.index: ref.merkle_root for ref in obj.shares}
    located = [s for s in info.shares if s.index in roots]
    located.sort(key=lambda s: (s.state not in _HEALTHY_STATES, s.state in _BAD_STATES, s.index))
    return [Source(s.index, s.share_id, s.node_id, s.node_url, roots[s.index]) for s in located]


class ObjectReader:
    """One read of one object: remembers which nodes were fast and which were bad across its runs."""

    def __init__(self, store: ObjectStore, obj: StoredObject, sources: list[Source]) -> None:
        self.store = store
        self.obj = obj
        self.layout = obj.layout
        self.order = list(sources)
        # by source, not by share index: the mediator may locate one index twice (a copy a node damaged and
        # the one repair rebuilt elsewhere), and the bad copy must not hide the good one
        self.bad: set[Source] = set()
        self.failures: dict[Source, str] = {}

    @classmethod
    async def open(cls, store: ObjectStore, obj: StoredObject) -> ObjectReader:
        try:
            info = await store.mediator.object_info(obj.object_id)
        except PeerError as exc:
            raise ReadError(f"cannot locate the shares of object {obj.object_id[:16]}…: {exc}") from exc
        return cls(store, obj, sources_for(obj, info))

    async def fetch_verified(self, source: Source, run: Run) -> bytearray:
        """Leaves of ``run`` from one node, checked against the client's root (IntegrityError otherwise)."""
        url = (f"{source.node_url}/v1/shares/{source.share_id}"
               f"?first_leaf={run.first_leaf}&leaf_count={run.leaf_count}")
        data, proof_text = await get_leaf_range(self.store, url, run.leaf_count * LEAF_SIZE, source.node_id)
        try:
            proof_raw = b64decode(proof_text, field="fincrypt-proof header", max_length=128 * HASH_BYTES)
        except RemoteProtocolError as exc:
            raise IntegrityError(f"{source.describe()} sent a malformed proof: {exc}") from exc
        if len(proof_raw) % HASH_BYTES:
            raise IntegrityError(f"{source.describe()} sent a proof that is not a whole number of hashes")
        proof = [proof_raw[i:i + HASH_BYTES] for i in range(0, len(proof_raw), HASH_BYTES)]
        await trio.to_thread.run_sync(verify_run, source.merkle_root, self.layout.share_size, run.first_leaf,
                                      run.leaf_count, data, proof, limiter=self.store.cpu)
        return data

    async def _attempt(self, source: Source, run: Run, send: trio.MemorySendChannel[tuple[Source, object]]
                       ) -> None:
        try:
            result: object = await self.fetch_verified(source, run)
        except (PeerError, IntegrityError, RemoteProtocolError) as exc:
            result = exc
        send.send_nowait((source, result))

    async def fetch_run(self, run: Run) -> dict[int, bytearray]:
        """k verified share ranges for ``run``, fastest first; ReadError naming every failure otherwise."""
        k = self.layout.k
        got: dict[int, bytearray] = {}
        winners: list[Source] = []
        candidates = [s for s in self.order if s not in self.bad]
        candidates.reverse()  # pop() takes the preferred one
        send, recv = trio.open_memory_channel[tuple[Source, object]](math.inf)
        bad_now: list[tuple[Source, str]] = []
        running = 0
        async with trio.open_nursery() as nursery:
            def launch() -> None:
                nonlocal running
                while candidates and candidates[-1].index in got:  # another copy of a block already in
                    candidates.pop()
                if candidates:
                    running += 1
                    nursery.start_soon(self._attempt, candidates.pop(), run, send)

            for _ in range(k):
                launch()
            while len(got) < k and running:
                with trio.move_on_after(self.store.hedge_after) as waiting:
                    source, result = await recv.receive()
                if waiting.cancelled_caught:
                    launch()  # someone is slow: ask one more node
                    continue
                running -= 1
                if isinstance(result, bytearray):
                    got[source.index] = result
                    winners.append(source)
                    continue
                self.failures[source] = f"{source.describe()}: {result}"
                if isinstance(result, IntegrityError | RemoteProtocolError):
                    self.bad.add(source)
                    bad_now.append((source, str(result)))
                launch()
            nursery.cancel_scope.cancel()
        for source, problem in bad_now:
            await self._report(source, problem)
        if len(got) < k:
            raise ReadError(
                f"object {self.obj.object_id[:16]}…, segments {run.segments.start}-{run.segments.stop - 1}: "
                f"only {len(got)} of the {k} shares needed could be fetched and verified "
                f"({len(self.order)} located); " + ("; ".join(self.failures.values()) or "no share is located"))
        # next run: the nodes that answered first go first
        self.order = winners + [s for s in self.order if s not in winners]
        return got

    async def _report(self, source: Source, problem: str) -> None:
        log.warning("object %s: %s served bad data: %s", self.obj.object_id[:16], source.describe(), problem)
        try:
            await self.store.mediator.report(self.obj.object_id, source.share_id, source.node_id, problem)
        except PeerError as exc:
            log.warning("could not report %s to the mediator: %s", source.describe(), exc)

    async def read(self, offset: int, length: int) -> bytes:
        """Plaintext bytes [offset, offset + length), short at end of file (reuse one reader for many reads)."""
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        end = min(offset + length, self.obj.size)
        if end <= offset:
            return b""
        parts: list[bytes] = []
        seg_size = self.layout.segment_size

        async def keep(index: int, plaintext: bytes) -> None:
            base = index * seg_size
            parts.append(plaintext[max(offset - base, 0):end - base])

        await self.each_segment(self.layout.segments_for_range(offset, end - offset), keep)
        return b"".join(parts)

    async def each_segment(self, segments: range, consume: Callable[[int, bytes], Awaitable[None]], *,
                           ramp: bool = False) -> None:
        """Call ``consume(index, plaintext)`` for every segment in order (``ramp``: see ``plan_runs``).

        The next run is fetched and verified while this one is decoded (segments in worker threads, in order,
        ``run_ordered``), so the network and both cores stay busy; memory is bounded by two runs.
        """
        layout, obj = self.layout, self.obj
        runs = plan_runs(layout, segments, self.store.run_share_bytes, ramp=ramp)
        send, recv = trio.open_memory_channel[tuple[Run, dict[int, bytearray]]](0)
        failed: list[BaseException] = []

        async def fetch_all() -> None:
            async with send:
                for run in runs:
                    try:
                        ranges = await self.fetch_run(run)
                    except (ReadError, PeerError) as exc:
                        failed.append(exc)
                        return
                    await send.send((run, ranges))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch_all)
            async with recv:
                async for run, ranges in recv:
                    def decode(index: int, ranges: dict[int, bytearray] = ranges, base: int = run.share_start
                               ) -> bytes:
                        start = layout.block_offset(index) - base
                        end = start + layout.block_length(index)
                        blocks = {i: bytes(data[start:end]) for i, data in ranges.items()}
                        try:
                            return decode_segment_plaintext(obj.file_key, obj.object_id, layout, index, blocks)
                        except FincryptError as exc:
                            raise ReadError(f"segment {index} of object {obj.object_id[:16]}… does not decrypt "
                                            f"although its shares match the recorded roots (wrong key?): {exc}"
                                            ) from exc

                    first = run.segments.start

                    def decode_nth(i: int, d: Callable[[int], bytes] = decode, f: int = first) -> bytes:
                        return d(f + i)

                    async def consume_nth(i: int, plaintext: bytes, f: int = first) -> None:
                        await consume(f + i, plaintext)

                    try:
                        await run_ordered(self.store.cpu, len(run.segments), decode_nth, consume_nth)
                    except (FincryptError, OSError) as exc:  # raised here, not as a group from the nursery
                        failed.append(exc)
                        nursery.cancel_scope.cancel()
                        break
                    ranges.clear()
        if failed:
            raise failed[0]


async def get_leaf_range(store: ObjectStore, url: str, limit: int, node_id: str) -> tuple[bytearray, str]:
    """A signed ranged GET from node ``node_id``, streamed into one buffer of at most ``limit`` bytes; (body,
    proof header).

    Streamed rather than through rpc.call so a node cannot make the client buffer more than it asked for, and
    so no httpx Response (which sits in a reference cycle) keeps a run's bytes alive until the next GC pass.
    """
    headers = signed_headers(store.account_key, "GET", url, b"", audience=node_id)
    allowed = GET_GRACE + limit / GET_MIN_RATE
    try:
        with trio.fail_after(allowed):
            async with store.http.stream("GET", url, headers=headers) as response:
                cap = limit if response.status_code == 200 else 4096
                body = bytearray(cap)  # filled in place: growing it chunk by chunk cost a copy per reallocation
                filled = 0
                with memoryview(body) as view:
                    async for chunk in response.aiter_raw():
                        if filled + len(chunk) > cap:
                            if response.status_code == 200:
                                raise IntegrityError(f"{_peer(url)} sent more than the {limit} bytes asked for")
                            break
                        view[filled:filled + len(chunk)] = chunk
                        filled += len(chunk)
                del body[filled:]
                status, proof = response.status_code, response.headers.get("fincrypt-proof", "")
    except trio.TooSlowError as exc:
        raise PeerError(f"{_peer(url)} did not send the {limit} bytes asked for within {allowed:.0f} s (too slow "
                        "or stalling)") from exc
    except httpx.HTTPError as exc:
        raise PeerError(f"{_peer(url)} is unreachable: {why_unreachable(exc)}") from exc
    if status != 200:
        try:
            reason = str(decode_object(bytes(body)).get("error", ""))[:300]
        except FincryptError:
            reason = body[:200].decode("utf-8", "replace")
        raise PeerError(f"{_peer(url)} refused GET {httpx.URL(url).path}: {status} {reason}", status)
    return body, proof


def _peer(url: str) -> str:
    parsed = httpx.URL(url)
    return f"node {parsed.scheme}://{parsed.host}:{parsed.port}"


async def read_range(store: ObjectStore, obj: StoredObject, offset: int, length: int) -> bytes:
    if offset < 0 or length < 0:
        raise ValueError("offset and length must be >= 0")
    if min(offset + length, obj.size) <= offset:
        return b""
    reader = await ObjectReader.open(store, obj)
    return await reader.read(offset, length)


Progress = Callable[[Path, int], None]  # (the partial file, how many bytes from its start are written)


async def fetch_to_file(store: ObjectStore, obj: StoredObject, dest: Path, *, progress: Progress | None = None,
                        clobber: bool = True) -> bool:
    """Write the whole plaintext to a temporary file next to ``dest``, in file order, and rename it into place.

    ``progress`` hears of the temporary file once it exists and after each segment lands, so a reader may use
    the front of a file before its end has arrived. ``clobber=False``: if ``dest`` appeared meanwhile (a newer
    version written by someone else), it is kept and the fetched copy dropped. True if ``dest`` is the fetched
    copy.

    Every segment of the padded stream is fetched, those holding only padding too: stopping after the last
    one holding data showed each node where the file ends to within a segment: a file of 1 GiB to 2 MiB, where
    its padded size leaves 32 MiB open (docs/threat-model.md). It costs the padding's bytes, at most 12 %.
    """
    tmp = dest.with_name(f".{dest.name}.{os.urandom(4).hex()}.part")
    seg_size = obj.layout.segment_size
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            if progress is not None:
                progress(tmp, 0)
            async def write(index: int, plaintext: bytes) -> None:
                keep = memoryview(plaintext)[:max(0, obj.size - index * seg_size)]
                if not keep:  # padding only
                    return
                await trio.to_thread.run_sync(pwrite_all, fd, keep, index * seg_size)
                if progress is not None:
                    progress(tmp, index * seg_size + len(keep))

            reader = await ObjectReader.open(store, obj)
            await reader.each_segment(range(obj.layout.segment_count), write, ramp=progress is not None)
        finally:
            os.close(fd)
        if not clobber and dest.exists():  # no await between this check and the rename
            return False
        os.replace(tmp, dest)
        return True
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass

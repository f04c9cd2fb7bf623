"""Repair planning and share rebuilding, pure: which shares to rebuild, and their bytes from any k others.

Erasure coding is over ciphertext, so the mediator rebuilds a lost share without any key: for every segment,
take that segment's block from k surviving shares (``ObjectLayout`` gives every offset), run zfec, and cut out
the missing blocks. A rebuilt share must hash to the Merkle root recorded at commit, or it is not stored.

Repairs stream: ``segment_batches`` cuts the shares into runs of whole segments of at most a few MiB; for each
run the mediator reads that byte range of k source shares (leaf ranges with Merkle proofs, checked against the
recorded roots), ``rebuild_range`` rebuilds the missing shares' bytes for it, and they go straight into the
PUT bodies to the new nodes, which check the whole share against its root before they store it. The
mediator's memory per repair is a few runs, whatever the share size.

Thresholds: an object is repaired when fewer than ``n - 1`` shares are healthy, when the healthy shares hold
less than the minimum expansion (healthy / k < 2 by default), or when at most k are left (see
:func:`mediatord.service.repair_threshold`); with fewer than k left it is *irreparable*: no repair traffic is
sent (it could not succeed), an alert is logged, and it recovers on its own if enough nodes come back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fincryptfs.core.erasure import rebuild_blocks
from fincryptfs.core.errors import ErasureError
from fincryptfs.core.layout import ObjectLayout


@dataclass(frozen=True)
class RepairPlan:
    action: str  # none | repair | irreparable
    sources: tuple[int, ...]  # indices of healthy shares, best first
    missing: tuple[int, ...]  # indices to rebuild


def plan_repair(layout: ObjectLayout, healthy: Sequence[int], threshold: int, *, evict: bool = False
                ) -> RepairPlan:
    """Decide what to do for an object whose shares ``healthy`` (indices) are proven or stored on live nodes.

    ``evict``: some share sits on a disqualified node; it is moved even above the threshold, since that node
    will never count again.
    """
    have = tuple(sorted(set(healthy)))
    missing = tuple(i for i in range(layout.n) if i not in have)
    if len(have) < layout.k:
        return RepairPlan("irreparable", have, missing)
    if len(have) >= threshold and not (evict and missing):
        return RepairPlan("none", have, missing)
    return RepairPlan("repair", have, missing)


def segment_batches(layout: ObjectLayout, max_bytes: int) -> list[range]:
    """Consecutive runs of segments whose blocks total at most ``max_bytes`` per share (at least one segment)."""
    batches: list[range] = []
    start = 0
    while start < layout.segment_count:
        end, size = start + 1, layout.block_length(start)
        while end < layout.segment_count and size + layout.block_length(end) <= max_bytes:
            size += layout.block_length(end)
            end += 1
        batches.append(range(start, end))
        start = end
    return batches


def share_range(layout: ObjectLayout, segments: range) -> tuple[int, int]:
    """The byte range [start, end) that ``segments``' blocks occupy in every share."""
    last = segments[-1]
    return layout.block_offset(segments[0]), layout.block_offset(last) + layout.block_length(last)


def rebuild_range(layout: ObjectLayout, sources: Mapping[int, bytes | memoryview], segments: range,
                  wanted: Sequence[int]) -> dict[int, bytes]:
    """The bytes of shares ``wanted`` over ``segments``, from k sources' bytes over the same range."""
    if len(sources) < layout.k:
        raise ErasureError(f"need {layout.k} shares to rebuild, have {len(sources)}")
    start, end = share_range(layout, segments)
    use = dict(sorted(sources.items())[: layout.k])
    for index, data in use.items():
        if len(data) != end - start:
            raise ErasureError(f"share {index} gave {len(data)} bytes for a range of {end - start}")
    out = {i: bytearray() for i in wanted}
    views = {i: memoryview(d) for i, d in use.items()}
    for seg in segments:
        at, length = layout.block_offset(seg) - start, layout.block_length(seg)
        blocks = {i: bytes(v[at:at + length]) for i, v in views.items()}
        for i, block in rebuild_blocks(layout.params, blocks, layout.sealed_length(seg), list(wanted)).items():
            out[i] += block
    return {i: bytes(b) for i, b in out.items()}


def rebuild_shares(layout: ObjectLayout, sources: Mapping[int, bytes], wanted: Sequence[int]) -> dict[int, bytes]:
    """The shares numbered ``wanted`` in full, from k whole source shares (index → bytes)."""
    for index, data in sources.items():
        if len(data) != layout.share_size:
            raise ErasureError(f"share {index} has {len(data)} bytes, the layout gives {layout.share_size}")
    return rebuild_range(layout, sources, range(layout.segment_count), wanted)

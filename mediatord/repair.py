"""Repair planning and share rebuilding, pure: which shares to rebuild, and their bytes from any k others.

Erasure coding is over ciphertext, so the mediator rebuilds a lost share without any key: for every segment,
take that segment's block from k surviving shares (``ObjectLayout`` gives every offset), run zfec, and cut out
the missing blocks. A rebuilt share must hash to the Merkle root recorded at commit, or it is not stored.

Thresholds: an object is repaired when fewer than ``n - 1`` shares are healthy (see
:func:`mediatord.service.repair_threshold`); with fewer than k left it is *irreparable*: no repair traffic is
sent (it could not succeed), an alert is logged, and it recovers on its own if enough nodes come back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fincryptfs.core.erasure import rebuild_blocks
from fincryptfs.core.errors import ErasureError, IntegrityError
from fincryptfs.core.layout import ObjectLayout
from fincryptfs.core.merkle import TreeBuilder


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


def rebuild_shares(layout: ObjectLayout, sources: Mapping[int, bytes], wanted: Sequence[int]) -> dict[int, bytes]:
    """The shares numbered ``wanted``, rebuilt segment by segment from k source shares (index → bytes)."""
    if len(sources) < layout.k:
        raise ErasureError(f"need {layout.k} shares to rebuild, have {len(sources)}")
    use = dict(sorted(sources.items())[: layout.k])
    for index, data in use.items():
        if len(data) != layout.share_size:
            raise ErasureError(f"share {index} has {len(data)} bytes, the layout gives {layout.share_size}")
    out = {i: bytearray() for i in wanted}
    views = {i: memoryview(d) for i, d in use.items()}
    for seg in range(layout.segment_count):
        start, length = layout.block_offset(seg), layout.block_length(seg)
        blocks = {i: bytes(v[start:start + length]) for i, v in views.items()}
        for i, block in rebuild_blocks(layout.params, blocks, layout.sealed_length(seg), list(wanted)).items():
            out[i] += block
    return {i: bytes(b) for i, b in out.items()}


def share_root(data: bytes) -> bytes:
    builder = TreeBuilder()
    builder.update(data)
    return builder.finish().root


def check_rebuilt(rebuilt: Mapping[int, bytes], roots: Mapping[int, bytes]) -> None:
    """Raise IntegrityError unless every rebuilt share hashes to the root recorded for it."""
    for index, data in rebuilt.items():
        if share_root(data) != roots[index]:
            raise IntegrityError(f"rebuilt share {index} does not match its recorded Merkle root: a source share "
                                 "was corrupt")

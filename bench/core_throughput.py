"""Throughput of the core's write and read paths, against the primitives they are made of.

Over BENCH_MIB MiB (default 256) of plaintext in 1 MiB segments, k=3 of n=6:

(a) each primitive alone, on one core: AES-256-GCM seal, erasure encode (raw ``zfec.Encoder.encode`` of three
    ready-made primary blocks, and our ``erasure.encode_segment_views``: the AVX2 kernel where built, else zfec),
    SHA-256 Merkle leaf hashing of the six shares' blocks, decode from the three parity blocks (raw zfec, and
    ours);
(b) the full seal pipeline as the uploader runs it: per segment, in a ThreadPoolExecutor(2) with a bounded
    window in flight, read the plaintext (``segment_plaintext``), seal + erasure-code it
    (``encode_segment_blocks``), write the parity blocks at their share offsets (``pwrite``, page cache) and
    hash the whole leaves of all six blocks (``merkle.hash_chunk``); the main thread feeds the six
    ``RootBuilder``s in segment order (``update_hashed``), handling only the leaves that straddle segments;
(c) the reverse: read the blocks of shares 3, 4, 5 (parity only) back, decode_segment_plaintext in the pool,
    and check each segment against the source.

Figures are MB/s (10^6 bytes) of plaintext. Peak RSS comes from getrusage (ru_maxrss). The last line printed is
one JSON object with every figure; "pipeline_vs_slowest_primitive" is (b) over the slowest primitive (b) uses
(our erasure encode, AES or hashing, whichever is slowest), and "pipeline_vs_raw_zfec" is (b) over the
raw zfec figure.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import zfec

from fincryptfs.core import crypto, erasure, merkle, objectcodec
from fincryptfs.core.erasure import ErasureParams

MIB = 2**20
SEGMENT = MIB
K, N = 3, 6
PARITY = (3, 4, 5)
WINDOW = 6  # segments in flight: bounds memory to a few MiB whatever the object size
KEY = bytes(range(32))
OBJECT_ID = hashlib.sha256(b"bench").hexdigest()


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def source(total: int) -> Callable[[int, int], bytes]:
    """File data without holding it: a 4 MiB random pool read cyclically (not a multiple of the segment size)."""
    pool = os.urandom(4 * MIB + 4099)
    pool2 = pool + pool

    def read(offset: int, size: int) -> bytes:
        start = offset % len(pool)
        if size <= len(pool):
            return pool2[start:start + size]
        return b"".join(read(offset + i, min(len(pool), size - i)) for i in range(0, size, len(pool)))
    return read


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


def ordered(pool: ThreadPoolExecutor, jobs: Iterator[tuple[Callable[..., object], tuple[object, ...]]]
            ) -> Iterator[object]:
    """Results of ``jobs`` in submission order, with at most WINDOW running or waiting."""
    pending: collections.deque[Future[object]] = collections.deque()
    for fn, args in jobs:
        pending.append(pool.submit(fn, *args))
        if len(pending) >= WINDOW:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def main() -> None:
    total = int(float(os.environ.get("BENCH_MIB", "256")) * MIB)
    count = max(1, total // SEGMENT)
    total = count * SEGMENT
    read = source(total)
    params = ErasureParams(K, N)
    results: dict[str, float] = {}

    # --- (a) primitives, one core each --------------------------------------------------------------------
    plains = [read(i * SEGMENT, SEGMENT) for i in range(4)]
    def seal() -> None:
        for i in range(count):  # results are dropped at once: RSS must not grow with BENCH_MIB
            crypto.seal_segment(KEY, OBJECT_ID, i, False, plains[i % 4])

    def encode() -> None:
        for _ in range(count):
            erasure.encode_segment_views(params, sealed)

    sealed = crypto.seal_segment(KEY, OBJECT_ID, 0, False, plains[0])
    size = erasure.block_length(len(sealed), K)
    primary = [(sealed + bytes(size * K - len(sealed)))[i * size:(i + 1) * size] for i in range(K)]
    encoder = zfec.Encoder(K, N)

    def encode_raw() -> None:
        for _ in range(count):
            encoder.encode(primary, list(PARITY))

    results["aes_gcm_seal"] = mbps(total, timed(seal))
    results["zfec_encode_raw"] = mbps(total, timed(encode_raw))
    results["erasure_encode"] = mbps(total, timed(encode))
    blocks = erasure.encode_segment(params, sealed)

    whole = [memoryview(block)[:len(block) // merkle.LEAF_SIZE * merkle.LEAF_SIZE] for block in blocks]

    def hash_leaves() -> None:  # what the pipeline calls: the C accelerator when built
        for _ in range(count):
            for block in whole:
                merkle.hash_leaves(block)

    def hash_leaves_hashlib() -> None:  # one hashlib call per leaf, for comparison
        for _ in range(count):
            for block in blocks:
                for leaf in merkle.iter_leaves(block):
                    merkle.hash_leaf(leaf)
    results["sha256_leaf_hashing"] = mbps(total, timed(hash_leaves))
    results["sha256_leaf_hashing_hashlib"] = mbps(total, timed(hash_leaves_hashlib))
    parity = {i: blocks[i] for i in PARITY}

    def decode() -> None:
        for _ in range(count):
            erasure.decode_segment(params, parity, len(sealed))

    def decode_raw() -> None:
        decoder = zfec.Decoder(K, N)
        for _ in range(count):
            decoder.decode(tuple(parity[i] for i in PARITY), tuple(PARITY))
    results["zfec_decode_parity_raw"] = mbps(total, timed(decode_raw))
    results["erasure_decode_parity"] = mbps(total, timed(decode))

    # --- (b) full seal pipeline on two cores ---------------------------------------------------------------
    data_length = total - 64 * 1024 - 5  # not segment-aligned, so the padded tail is exercised
    layout = objectcodec.plan_object(data_length, SEGMENT, K, N)
    with tempfile.TemporaryDirectory(prefix="fincrypt-bench-") as tmp, ThreadPoolExecutor(2) as pool:
        files = {i: open(os.path.join(tmp, f"share{i}"), "w+b", buffering=0) for i in PARITY}  # noqa: SIM115
        builders = [merkle.RootBuilder() for _ in range(N)]

        def seal_one(index: int) -> list[merkle.HashedChunk]:
            plain = objectcodec.segment_plaintext(layout, data_length, index, read)
            seg_blocks = objectcodec.encode_segment_blocks(KEY, OBJECT_ID, layout, index, plain)
            offset = layout.block_offset(index)
            for i in PARITY:
                os.pwrite(files[i].fileno(), seg_blocks[i], offset)
            return [merkle.hash_chunk(offset, block) for block in seg_blocks]

        def seal_all() -> None:
            jobs = ((seal_one, (index,)) for index in range(layout.segment_count))
            for hashed in ordered(pool, jobs):
                for builder, chunk in zip(builders, hashed, strict=True):  # type: ignore[call-overload]
                    builder.update_hashed(chunk)

        seal_seconds = timed(seal_all)
        assert all(b.size == layout.share_size for b in builders)
        roots = [b.finish() for b in builders]
        with open(files[PARITY[0]].name, "rb") as check:
            assert merkle.MerkleTree.from_data(check.read()).root == roots[PARITY[0]]
        results["seal_pipeline_2_threads"] = mbps(layout.padded_size, seal_seconds)

        # --- (c) decode from parity only + open, on two cores ----------------------------------------------
        def open_segment(index: int) -> bytes:
            offset, size = layout.block_offset(index), layout.block_length(index)
            got = {i: os.pread(files[i].fileno(), size, offset) for i in PARITY}
            return objectcodec.decode_segment_plaintext(KEY, OBJECT_ID, layout, index, got)

        def open_all() -> None:
            expected = objectcodec.padded_segments(layout, data_length, read)
            jobs = ((open_segment, (index,)) for index in range(layout.segment_count))
            for plain, want in zip(ordered(pool, jobs), expected, strict=True):
                if plain != want:
                    raise SystemExit("decoded segment differs from the source")

        results["open_pipeline_parity_2_threads"] = mbps(layout.padded_size, timed(open_all))
        for f in files.values():
            f.close()

    slowest_name = min(("aes_gcm_seal", "erasure_encode", "sha256_leaf_hashing"),
                       key=results.__getitem__)
    ratio = results["seal_pipeline_2_threads"] / results[slowest_name]
    raw_ratio = results["seal_pipeline_2_threads"] / results["zfec_encode_raw"]
    peak = rss_mib()

    rows = [("(a) AES-256-GCM seal, 1 core", "aes_gcm_seal"),
            ("(a) zfec 3-of-6 encode, raw zfec.Encoder, 1 core", "zfec_encode_raw"),
            ("(a) 3-of-6 erasure.encode_segment_views, 1 core", "erasure_encode"),
            ("(a) SHA-256 leaf hashing of 6 shares, 1 core", "sha256_leaf_hashing"),
            ("(a) same, one hashlib call per leaf, 1 core", "sha256_leaf_hashing_hashlib"),
            ("(a) decode from parity (3,4,5), raw zfec.Decoder, 1 core", "zfec_decode_parity_raw"),
            ("(a) decode from parity (3,4,5), erasure.decode_segment, 1 core", "erasure_decode_parity"),
            ("(b) seal pipeline, ThreadPoolExecutor(2)", "seal_pipeline_2_threads"),
            ("(c) parity-only decode + open, ThreadPoolExecutor(2)", "open_pipeline_parity_2_threads")]
    print(f"core throughput over {total // MIB} MiB in {SEGMENT // MIB} MiB segments, k={K} n={N}, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, leaf hashing accelerator: "
          f"{'built' if merkle.ACCELERATED else 'not built (hashlib)'}, erasure coder: "
          f"{'AVX2 kernel' if erasure.accelerated() else 'zfec'}")
    print(f"{'stage':<54}{'MB/s':>10}")
    for label, key in rows:
        print(f"{label:<54}{results[key]:>10.1f}")
    print(f"{'pipeline / slowest primitive (' + slowest_name + ')':<54}{ratio:>10.2f}")
    print(f"{'pipeline / raw zfec encode':<54}{raw_ratio:>10.2f}")
    print(f"{'peak RSS (MiB)':<54}{peak:>10.1f}")
    print(json.dumps({"bench": "core_throughput", "mib": total // MIB, "segment_bytes": SEGMENT, "k": K, "n": N,
                      "leaf_hash_accelerated": merkle.ACCELERATED, "erasure_accelerated": erasure.accelerated(),
                      **{k: round(v, 1) for k, v in results.items()}, "slowest_primitive": slowest_name,
                      "pipeline_vs_slowest_primitive": round(ratio, 3),
                      "pipeline_vs_raw_zfec": round(raw_ratio, 3), "peak_rss_mib": round(peak, 1)}))


if __name__ == "__main__":
    main()

"""Mediator at scale: one full audit round's verification over 1,000 nodes x 1,000,000 shares kept in the real
SQLite schema, and the placement of 10,000 objects over those nodes. Prints a JSON object on its last line.

Shares are 4,096 bytes (one leaf), so a share's root is ``hash_root(4096, hash_leaf(data))`` of deterministic
data and every node's ProofResponse can be built fast and honestly. The timed part is the mediator's own work
per node: decode and signature check of the binary response, every Merkle proof, the verdict and its database
writes (share states, round record, pass record, reputation). Building the responses (the nodes' work) is not
timed. Targets: <= 60 CPU-s for the round, >= 20,000 proofs verified per second.

The first round turns every share from stored to proven (the most writing); the second, the steady state, only
records the round (MEDIATOR_BENCH_STEADY=0 skips it).

Usage: python bench/mediator_scale.py    (MEDIATOR_BENCH_SCALE=0.01 for a quick run: 10 nodes x 10,000 shares)
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

from fincryptfs.core.challenge import LeafProof, ShareProof, leaf_indices
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.layout import ObjectLayout
from fincryptfs.core.merkle import hash_leaf, hash_root
from fincryptfs.core.messages import ProofResponse
from fincryptfs.core.settings import MediatorSettings
from mediatord import audit, registry
from mediatord.db import MediatorDB
from mediatord.placement import place_shares
from mediatord.service import MediatorService
from mediatord.upkeep import _max_proof_bytes, apply_outcome

SHARE_SIZE = 4096
LAYOUT = ObjectLayout(8176, 8192, 2, 4)  # one segment whose blocks are exactly 4,096 bytes
BASE = hashlib.sha256(b"fincrypt-bench").digest() * (SHARE_SIZE // 32)


def share_data(number: int) -> bytes:
    return BASE[:-8] + struct.pack(">Q", number)


def populate(db: MediatorDB, nodes: list[SigningKey], share_count: int, now: float) -> None:
    conn = db._conn  # bulk load: one transaction, executemany
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO nodes (node_id, public_key, url, price, capacity, free, operator, payout_address,"
        " first_seen, last_seen) VALUES (?,?,?,?,?,?,?,?,?,?)",
        [(k.id, k.public.raw, f"http://10.{i // 250}.{i % 250}.1:8701", 100 + i % 50, 2**40, 2**39, f"op{i % 300}",
          None, now, now) for i, k in enumerate(nodes)])
    layout = json.dumps({"padded_size": LAYOUT.padded_size, "segment_size": LAYOUT.segment_size, "k": 2, "n": 4})
    objects = share_count // 4
    conn.executemany("INSERT INTO objects (object_id, account_id, layout, state, created_at, stored_bytes)"
                     " VALUES (?,?,?,?,?,?)", ((f"{o:064x}", "a" * 64, layout, "committed", now,
                                                LAYOUT.share_size * 4) for o in range(objects)))

    def rows():  # type: ignore[no-untyped-def]
        for number in range(share_count):
            obj, idx = divmod(number, 4)
            node = nodes[(obj + idx * 7) % len(nodes)]
            root = hash_root(SHARE_SIZE, hash_leaf(share_data(number)))
            yield (f"{number + 1:064x}", f"{obj:064x}", idx, node.id, root, SHARE_SIZE, "stored", now)
    conn.executemany("INSERT INTO shares (share_id, object_id, idx, node_id, root, size, state, updated_at)"
                     " VALUES (?,?,?,?,?,?,?,?)", rows())
    conn.execute("COMMIT")


def node_answer(state: audit.NodeAudit, key: SigningKey) -> bytes:
    """What an honest node sends: the challenged leaf (the whole 4 KiB share) with an empty path."""
    proofs = []
    for share_id in state.challenge.share_ids:
        number = int(share_id, 16) - 1
        index = leaf_indices(state.nonce, share_id, 1, state.leaves_per_share)[0]
        proofs.append(ShareProof(share_id, (LeafProof(index, share_data(number), ()),)))
    return ProofResponse(key.id, state.mediator_id, state.round_id, state.nonce, tuple(proofs),  # type: ignore[arg-type]
                         ()).encode(key)


def audit_round(service: MediatorService, by_id: dict[str, SigningKey], now: float
                ) -> tuple[float, float, float, int, int, float]:
    """One round as upkeep.audit_node does it, minus the network: (verify CPU, build CPU, record CPU, proofs,
    nodes passed, wall seconds without the node side)."""
    db = service.db
    round_id = db.next_round_id()
    verify_cpu = build_cpu = record_cpu = 0.0
    proofs = passed = 0
    wall0 = time.perf_counter()
    for node_id in db.audit_node_ids():
        c0 = time.process_time()
        node = db.node(node_id)
        shares = db.audit_shares(node_id)
        state = audit.start_audit(service.id, node_id, round_id,
                                  (audit.AuditedShare(s.share_id, s.root, s.size) for s in shares), 1)
        db.start_round(round_id, node_id, state.nonce, now)
        c1 = time.process_time()
        data = node_answer(state, by_id[node_id])
        c2 = time.process_time()
        response = ProofResponse.decode(data, by_id[node_id].public, max_bytes=_max_proof_bytes(len(shares), 1))
        state = audit.judge_response(state, response)
        result = audit.outcome(state)
        c25 = time.process_time()
        already = frozenset(s.share_id for s in shares if s.state == "proven")
        apply_outcome(service, node, round_id, True, result, service.settings.disqualify_after, now,  # type: ignore[arg-type]
                      already)
        c3 = time.process_time()
        verify_cpu += (c1 - c0) + (c3 - c2)
        build_cpu += c2 - c1
        record_cpu += c3 - c25
        proofs += len(shares)
        passed += result.result == "passed"
    return verify_cpu, build_cpu, record_cpu, proofs, passed, time.perf_counter() - wall0 - build_cpu


def main() -> None:
    scale = float(os.environ.get("MEDIATOR_BENCH_SCALE", "1"))
    node_count, share_count = max(4, int(1000 * scale)), max(100, int(1_000_000 * scale))
    placements = max(100, int(10_000 * min(1.0, scale * 10)))
    now = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        settings = MediatorSettings.from_env({"MEDIATORD_DATA_DIR": tmp}, home=Path(tmp))
        db = MediatorDB(Path(tmp) / "mediator.sqlite3")
        service = MediatorService(settings, SigningKey.generate(), db)
        keys = [SigningKey.generate() for _ in range(node_count)]
        by_id = {k.id: k for k in keys}
        t0 = time.perf_counter()
        populate(db, keys, share_count, now)
        load_s = time.perf_counter() - t0

        first = audit_round(service, by_id, now)
        steady = audit_round(service, by_id, now) if os.environ.get("MEDIATOR_BENCH_STEADY", "1") == "1" else None
        verify_cpu, build_cpu, record_cpu, proofs, passed, round_wall = first

        candidates = registry.candidates(db, service.pricing, now)
        p0 = time.process_time()
        for _ in range(placements):
            chosen = place_shares(candidates, LAYOUT.n, SHARE_SIZE, min_reputation=0.2)
            assert len({c.node_id for c in chosen}) == LAYOUT.n
        place_cpu = time.process_time() - p0
        db.close()

    rate = proofs / verify_cpu if verify_cpu else 0.0
    print(f"mediator scale: {node_count} nodes, {share_count} shares (SQLite load {load_s:.1f} s), "
          f"Python {sys.version.split()[0]}")
    print(f"audit round: {proofs} proofs verified in {verify_cpu:.1f} CPU-s ({rate:,.0f}/s), {passed} nodes passed;"
          f" of which {record_cpu:.1f} CPU-s recording results in SQLite;"
          f" building the answers (node side, untimed) took {build_cpu:.1f} CPU-s")
    if steady is not None:
        print(f"next round (shares already proven): {steady[3]} proofs in {steady[0]:.1f} CPU-s "
              f"({steady[3] / steady[0]:,.0f}/s), {steady[2]:.1f} CPU-s recording")
    print(f"placement: {placements} objects of {LAYOUT.n} shares in {place_cpu:.2f} CPU-s "
          f"({placements / place_cpu:,.0f}/s)")
    print(json.dumps({"bench": "mediator_scale", "nodes": node_count, "shares": share_count,
                      "audit_round_cpu_s": round(verify_cpu, 2), "audit_round_wall_s": round(round_wall, 2),
                      "audit_record_cpu_s": round(record_cpu, 2),
                      "steady_round_cpu_s": None if steady is None else round(steady[0], 2),
                      "steady_proofs_per_s": None if steady is None else round(steady[3] / steady[0]),
                      "proofs_per_s": round(rate), "nodes_passed": passed, "placements": placements,
                      "placement_cpu_s": round(place_cpu, 3), "target_round_cpu_s": 60,
                      "target_proofs_per_s": 20000, "meets_targets": verify_cpu <= 60 and rate >= 20000}))


if __name__ == "__main__":
    main()

"""Generate tests/vectors/core-v1.json: golden vectors that pin the core's byte formats.

Run once (``.venv/bin/python tests/vectors/make_core_vectors.py``) and commit the JSON. Every input is fixed,
and every primitive used is deterministic (AES-GCM with a fixed key and nonce, zfec, SHA-256, Ed25519), so
tests/unit/test_core_vectors.py recomputes each vector and a change to any format shows up as a failure.
Regenerating the file is a format change: bump the version in the file name and say so in docs/format.md.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fincryptfs.core import challenge, crypto, erasure, merkle, padding
from fincryptfs.core.challenge import ShareProof
from fincryptfs.core.erasure import ErasureParams
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.messages import ProofResponse
from fincryptfs.core.wire import Envelope

OUT = Path(__file__).with_name("core-v1.json")

FILE_KEY = bytes(range(32))
OBJECT_ID = bytes(range(100, 132)).hex()
SEGMENT_INDEX = 7
PLAINTEXT = b"Fincrypt golden vector: the quick brown fox jumps over the lazy dog.\n" * 3
MASTER_KEY = bytes.fromhex("00112233445566778899aabbccddeeff" * 2)
SIGNING_SEED = bytes(range(200, 232))
NODE_SEED = bytes(range(50, 82))
ERASURE_INPUT = bytes(range(256)) * 4 + b"tail"
SHARE = bytes((i * 7 + i // 4096) % 256 for i in range(5 * merkle.LEAF_SIZE + 123))
NONCE = bytes(range(32, 64))
SHARE_ID = bytes(range(1, 33)).hex()
PADME_INPUTS = [0, 1, 2, 9, 255, 256, 1000, 4096, 4097, 65_537, 10**6, 2**20 + 1, 10**9, 2**40 + 12345]
PADDED_INPUTS = [0, 1, 4088, 4089, 10_000, 2**20, 10**9]


def build() -> dict[str, Any]:
    sealed = crypto.seal_segment(FILE_KEY, OBJECT_ID, SEGMENT_INDEX, True, PLAINTEXT)
    blocks = erasure.encode_segment(ErasureParams(3, 6), ERASURE_INPUT)
    tree = merkle.MerkleTree.from_data(SHARE)
    first, span = 1, 3
    signer = SigningKey(SIGNING_SEED)
    body = {"share_id": SHARE_ID, "size": len(SHARE), "root": tree.root.hex(), "zeta": 1, "alpha": [True, None]}
    envelope = Envelope.seal("grant", body, signer)
    node = SigningKey(NODE_SEED)
    indices = challenge.leaf_indices(NONCE, SHARE_ID, tree.leaf_count, 3)
    proof = challenge.build_share_proof(NONCE, SHARE_ID, len(SHARE), 3,
                                        lambda i: SHARE[i * merkle.LEAF_SIZE:(i + 1) * merkle.LEAF_SIZE],
                                        lambda i: tree.range_proof(i))
    response = ProofResponse(node.id, signer.id, 42, NONCE, (proof, ShareProof("ab" * 32, ())),  # type: ignore
                             ("cd" * 32,))  # type: ignore[arg-type]
    return {
        "version": 1,
        "segment": {"file_key": FILE_KEY.hex(), "object_id": OBJECT_ID, "index": SEGMENT_INDEX, "last": True,
                    "plaintext": PLAINTEXT.hex(), "sealed": sealed.hex()},
        "padme": {str(n): padding.padme(n) for n in PADME_INPUTS},
        "padded_length": {str(n): padding.padded_length(n) for n in PADDED_INPUTS},
        "padding_tail_1000": padding.padding_tail(1000).hex(),
        "erasure": {"k": 3, "n": 6, "input": ERASURE_INPUT.hex(), "blocks": [b.hex() for b in blocks]},
        "merkle": {"share": SHARE.hex(), "size": len(SHARE), "root": tree.root.hex(), "first": first,
                   "span": span, "proof": [h.hex() for h in tree.range_proof(first, span)],
                   "tree_file_sha256": hashlib.sha256(tree.to_bytes()).hexdigest()},
        "challenge": {"nonce": NONCE.hex(), "share_id": SHARE_ID, "leaf_count": tree.leaf_count, "how_many": 3,
                      "indices": indices, "indices_of_1000000_leaves": challenge.leaf_indices(
                          NONCE, SHARE_ID, 10**6, 8)},
        "envelope": {"seed": SIGNING_SEED.hex(), "kind": "grant", "body": body,
                     "public_key": signer.public.to_text(), "signer_id": signer.id,
                     "canonical": envelope.to_bytes().decode("ascii"), "signature": envelope.signature.hex()},
        "recovery_phrase": {"master_key": MASTER_KEY.hex(), "phrase": crypto.recovery_phrase(MASTER_KEY),
                            "account_id": crypto.account_signing_key(MASTER_KEY).id},
        "proof_response": {"node_seed": NODE_SEED.hex(), "encoded": response.encode(node).hex()},
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(build(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")

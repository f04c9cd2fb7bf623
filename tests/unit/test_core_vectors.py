"""Golden vectors (tests/vectors/core-v1.json): the core's byte formats must not change silently.

Each vector is recomputed from the inputs stored in the file. If one fails, a format changed: either a bug, or a
deliberate change that needs a new vector file version and an update of docs/format.md.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fincryptfs.core import challenge, crypto, erasure, merkle, padding
from fincryptfs.core.erasure import ErasureParams
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.messages import ProofResponse
from fincryptfs.core.wire import Envelope, canonical_json

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "core-v1.json").read_text(encoding="utf-8"))


def test_vector_file_version() -> None:
    assert VECTORS["version"] == 1


def test_sealed_segment() -> None:
    v = VECTORS["segment"]
    key, plain, sealed = bytes.fromhex(v["file_key"]), bytes.fromhex(v["plaintext"]), bytes.fromhex(v["sealed"])
    assert crypto.seal_segment(key, v["object_id"], v["index"], v["last"], plain) == sealed
    assert crypto.open_segment(key, v["object_id"], v["index"], v["last"], sealed) == plain
    # the documented construction, built by hand: nonce = u96be(index), AAD = tag || object id || u64be || flag
    nonce = v["index"].to_bytes(12, "big")
    ad = b"fincrypt-segment-v1" + bytes.fromhex(v["object_id"]) + struct.pack(">QB", v["index"], int(v["last"]))
    assert AESGCM(key).encrypt(nonce, plain, ad) == sealed


def test_padding() -> None:
    for n, expected in VECTORS["padme"].items():
        assert padding.padme(int(n)) == expected, n
    for n, expected in VECTORS["padded_length"].items():
        assert padding.padded_length(int(n)) == expected, n
    assert padding.padding_tail(1000).hex() == VECTORS["padding_tail_1000"]


def test_erasure_blocks() -> None:
    v = VECTORS["erasure"]
    params = ErasureParams(v["k"], v["n"])
    data = bytes.fromhex(v["input"])
    blocks = [bytes.fromhex(b) for b in v["blocks"]]
    assert erasure.encode_segment(params, data) == blocks
    assert erasure.decode_segment(params, {3: blocks[3], 4: blocks[4], 5: blocks[5]}, len(data)) == data


def test_merkle_root_and_range_proof() -> None:
    v = VECTORS["merkle"]
    share = bytes.fromhex(v["share"])
    tree = merkle.MerkleTree.from_data(share)
    assert tree.root.hex() == v["root"]
    assert [h.hex() for h in tree.range_proof(v["first"], v["span"])] == v["proof"]
    assert hashlib.sha256(tree.to_bytes()).hexdigest() == v["tree_file_sha256"]
    leaves = [share[i * merkle.LEAF_SIZE:(i + 1) * merkle.LEAF_SIZE] for i in range(v["first"], v["first"] + v["span"])]
    merkle.verify_range(bytes.fromhex(v["root"]), v["size"], v["first"], leaves, [bytes.fromhex(h) for h in v["proof"]])


def test_challenge_leaf_indices() -> None:
    v = VECTORS["challenge"]
    nonce = bytes.fromhex(v["nonce"])
    assert challenge.leaf_indices(nonce, v["share_id"], v["leaf_count"], v["how_many"]) == v["indices"]
    assert challenge.leaf_indices(nonce, v["share_id"], 10**6, 8) == v["indices_of_1000000_leaves"]


def test_envelope_bytes_and_signature() -> None:
    v = VECTORS["envelope"]
    signer = SigningKey(bytes.fromhex(v["seed"]))
    assert signer.public.to_text() == v["public_key"] and signer.id == v["signer_id"]
    envelope = Envelope.seal(v["kind"], v["body"], signer)
    assert envelope.to_bytes().decode("ascii") == v["canonical"]
    assert envelope.signature.hex() == v["signature"]
    signed = b"fincrypt-envelope-v1\x00" + v["kind"].encode() + b"\x00" + canonical_json(v["body"])
    signer.public.verify(bytes.fromhex(v["signature"]), signed)
    assert Envelope.from_bytes(v["canonical"].encode(), kind=v["kind"]) == envelope


def test_recovery_phrase() -> None:
    v = VECTORS["recovery_phrase"]
    master = bytes.fromhex(v["master_key"])
    assert crypto.recovery_phrase(master) == v["phrase"]
    assert crypto.master_key_from_phrase(v["phrase"]) == master
    assert crypto.account_signing_key(master).id == v["account_id"]


def test_proof_response_encoding() -> None:
    v = VECTORS["proof_response"]
    node = SigningKey(bytes.fromhex(v["node_seed"]))
    encoded = bytes.fromhex(v["encoded"])
    decoded = ProofResponse.decode(encoded, node.public, max_bytes=len(encoded))
    assert decoded.encode(node) == encoded
    c = VECTORS["challenge"]
    assert decoded.nonce.hex() == c["nonce"] and decoded.round_id == 42
    assert [leaf.index for leaf in decoded.proofs[0].leaves] == c["indices"]
    root = bytes.fromhex(VECTORS["merkle"]["root"])
    challenge.verify_share_proof(decoded.nonce, c["share_id"], root, VECTORS["merkle"]["size"], c["how_many"],
                                 decoded.proofs[0])


@pytest.mark.parametrize("section", ["segment", "erasure", "merkle", "challenge", "envelope", "recovery_phrase",
                                     "proof_response", "padme", "padded_length"])
def test_every_section_is_present(section: str) -> None:
    assert VECTORS[section]

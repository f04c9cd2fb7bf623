"""fincryptfs.core.messages: strict codecs of every message, and the binary ProofResponse."""

from __future__ import annotations

import json
import struct
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs.core import messages as m
from fincryptfs.core.challenge import LeafProof, ShareProof
from fincryptfs.core.errors import AuthError, RemoteProtocolError, TooLargeError
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.ids import AccountId, NodeId, ObjectId, ShareId
from fincryptfs.core.layout import ObjectLayout
from fincryptfs.core.wire import Envelope, canonical_json, decode_json

MEDIATOR = SigningKey(bytes(range(32)))
NODE = SigningKey(bytes(range(1, 33)))
ACCOUNT = SigningKey(bytes(range(2, 34)))
MEDIATOR_ID, NODE_ID, ACCOUNT_ID = NodeId(MEDIATOR.id), NodeId(NODE.id), AccountId(ACCOUNT.id)

hex_ids = st.binary(min_size=32, max_size=32).map(bytes.hex)
share_ids = hex_ids.map(ShareId)
object_ids = hex_ids.map(ObjectId)
node_ids = hex_ids.map(NodeId)
account_ids = hex_ids.map(AccountId)
roots = st.binary(min_size=32, max_size=32)
u63 = st.integers(0, 2**63 - 1)
grant_ids = st.binary(min_size=16, max_size=16).map(bytes.hex)
urls = st.sampled_from(["http://127.0.0.1:8701", "https://node.example.org/base", "http://[::1]:9000/x_y"])


def _json_round_trip(cls: type, obj: object, optional: tuple[str, ...] = ()) -> None:
    """to_json → canonical bytes → decode → from_json gives the same object; unknown or missing fields fail."""
    body = obj.to_json()  # type: ignore[attr-defined]
    again = cls.from_json(decode_json(canonical_json(body)))  # type: ignore[attr-defined]
    assert again == obj
    with pytest.raises(RemoteProtocolError, match="unknown fields"):
        cls.from_json({**body, "zz_extra": 1})  # type: ignore[attr-defined]
    for name in body:
        if name in optional:
            continue
        with pytest.raises(RemoteProtocolError):
            cls.from_json({k: v for k, v in body.items() if k != name})  # type: ignore[attr-defined]


@st.composite
def grants(draw: st.DrawFn) -> m.UploadGrant:
    return m.UploadGrant(MEDIATOR_ID, draw(node_ids), draw(account_ids), draw(share_ids), draw(st.integers(0, 2**50)),
                         draw(st.none() | roots), draw(u63), draw(grant_ids))


@settings(max_examples=40, deadline=None)
@given(grants())
def test_upload_grant(grant: m.UploadGrant) -> None:
    _json_round_trip(m.UploadGrant, grant, optional=("merkle_root",))
    env = grant.seal(MEDIATOR)
    assert m.UploadGrant.open(Envelope.from_bytes(env.to_bytes(), kind="grant")) == grant
    with pytest.raises(AuthError, match="not by the mediator"):
        m.UploadGrant.open(grant.seal(NODE))
    with pytest.raises(RemoteProtocolError, match="expected a receipt envelope, got 'grant'"):
        Envelope.from_bytes(env.to_bytes(), kind="receipt")


@settings(max_examples=40, deadline=None)
@given(grants(), u63)
def test_storage_receipt(grant: m.UploadGrant, stored_at: int) -> None:
    root = grant.merkle_root if grant.merkle_root is not None else bytes(range(32))
    receipt = m.StorageReceipt(NODE_ID, grant.mediator_id, grant.account_id, grant.share_id,
                               grant.share_size, root, grant.grant_id, stored_at)
    _json_round_trip(m.StorageReceipt, receipt)
    env = receipt.seal(NODE)
    assert m.StorageReceipt.open(Envelope.from_bytes(env.to_bytes(), kind="receipt")) == receipt
    with pytest.raises(AuthError):
        m.StorageReceipt.open(receipt.seal(MEDIATOR))
    assert receipt.matches(m.UploadGrant(**{**grant.__dict__, "node_id": NODE_ID}))
    assert not receipt.matches(m.UploadGrant(**{**grant.__dict__, "node_id": NODE_ID,
                                               "share_size": grant.share_size + 1}))
    # an open grant (no root: the share was streamed) takes the receipt's root; a grant naming one must match
    assert receipt.matches(m.UploadGrant(**{**grant.__dict__, "node_id": NODE_ID, "merkle_root": None}))
    other = bytes(b ^ 1 for b in root)
    assert not receipt.matches(m.UploadGrant(**{**grant.__dict__, "node_id": NODE_ID, "merkle_root": other}))


@st.composite
def announcements(draw: st.DrawFn) -> m.NodeAnnouncement:
    capacity = draw(st.integers(0, 2**60))
    return m.NodeAnnouncement(draw(node_ids), draw(urls), draw(st.none() | st.integers(0, 10**15)),
                              capacity, draw(st.integers(0, capacity)),
                              draw(st.text("abcXYZ019._@-", max_size=64)),
                              draw(st.none() | st.text("abcdef0123456789XYZ", min_size=1, max_size=100)),
                              draw(st.none() | st.text("0123456789abcdef", min_size=16, max_size=32)),
                              draw(st.integers(0, 2**40)))


@settings(max_examples=40, deadline=None)
@given(announcements())
def test_node_announcement(ann: m.NodeAnnouncement) -> None:
    _json_round_trip(m.NodeAnnouncement, ann, optional=("price", "payout_address", "boot_id", "shares_lost"))
    body = ann.to_json()
    for name, bad in (("free_bytes", ann.capacity_bytes + 1), ("url", "ftp://x"), ("url", "http://a b"),
                      ("operator", "a b"), ("price", -1), ("capacity_bytes", 2**61), ("node_id", "../x"),
                      ("boot_id", "XYZ"), ("shares_lost", -1)):
        with pytest.raises(RemoteProtocolError):
            m.NodeAnnouncement.from_json({**body, name: bad})


def test_announcement_url_trailing_slash_is_normalised() -> None:
    body = m.NodeAnnouncement(NODE_ID, "http://a:1", None, 10, 5, "", None).to_json()
    assert m.NodeAnnouncement.from_json({**body, "url": "http://a:1/"}).url == "http://a:1"


BAD_URLS = ["http://[x", "http://[::1", "http://[::1]x", "http://[1::2::3]", "http://[v1.x]", "http://1.2.3.999",
            "http://a:99999", "http://a:0", "http://a:", "http://a..b", "http://-a", "http://.", "http://a b",
            "http://" + "a" * 64 + ".org", "http://user@a", "http://a?q", "ftp://a"]


@pytest.mark.parametrize("url", BAD_URLS)
def test_announcement_refuses_urls_that_a_parser_would_choke_on(url: str) -> None:
    body = m.NodeAnnouncement(NODE_ID, "http://a:1", None, 10, 5, "", None).to_json()
    with pytest.raises(RemoteProtocolError, match="url"):
        m.NodeAnnouncement.from_json({**body, "url": url})


@settings(max_examples=300, deadline=None)
@given(st.text("htps:/[]0123456789abcfx.-:%@ ", max_size=30) | st.builds(lambda h, p: f"http://{h}{p}",
       st.text("[]:0123456789abcdef.-x", max_size=20), st.text(":/0123456789", max_size=8)))
def test_an_accepted_url_parses_everywhere_it_is_used(url: str) -> None:
    """Whatever a peer sends: refused with RemoteProtocolError, or parsable by urlsplit and httpx alike."""
    try:
        accepted = m.check_url(url, "url")
    except RemoteProtocolError:
        return
    parts = urlsplit(accepted)
    assert parts.hostname and (parts.port is None or 1 <= parts.port <= 65535)
    assert httpx.URL(accepted).host


@st.composite
def layouts(draw: st.DrawFn) -> ObjectLayout:
    n = draw(st.integers(2, 16))
    return ObjectLayout(draw(st.integers(1, 2**40)), draw(st.integers(4096, 64 * 2**20)),
                        draw(st.integers(1, n - 1)), n)


@st.composite
def specs(draw: st.DrawFn, layout: ObjectLayout) -> tuple[m.ShareSpec, ...]:
    indices = draw(st.lists(st.integers(0, layout.n - 1), min_size=1, max_size=layout.n, unique=True))
    sids = draw(st.lists(share_ids, min_size=len(indices), max_size=len(indices), unique=True))
    return tuple(m.ShareSpec(i, s, layout.share_size, draw(st.none() | roots))
                 for i, s in zip(indices, sids, strict=True))


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_place_request(data: st.DataObject) -> None:
    layout = data.draw(layouts())
    req = m.PlaceRequest(data.draw(object_ids), layout, data.draw(specs(layout)),
                         tuple(data.draw(st.lists(node_ids, max_size=3))))
    _json_round_trip(m.PlaceRequest, req)
    body = req.to_json()
    assert m.layout_from_json(m.layout_to_json(layout)) == layout
    wrong_size = [{**s, "share_size": layout.share_size + 1} for s in body["shares"]]
    with pytest.raises(RemoteProtocolError, match="the layout gives"):
        m.PlaceRequest.from_json({**body, "shares": wrong_size})
    with pytest.raises(RemoteProtocolError, match="no shares"):
        m.PlaceRequest.from_json({**body, "shares": []})
    dup = body["shares"][:1] * 2
    with pytest.raises(RemoteProtocolError, match="distinct"):
        m.PlaceRequest.from_json({**body, "shares": dup})
    with pytest.raises(RemoteProtocolError):
        m.PlaceRequest.from_json({**body, "layout": {**body["layout"], "k": body["layout"]["n"]}})


def _commit_request(layout: ObjectLayout, count: int, with_roots: bool = False) -> m.CommitRequest:
    shares = []
    for i in range(count):
        node = SigningKey(bytes([i + 10]) * 32)
        node_id, sid, root = NodeId(node.id), ShareId(f"{i:064x}"), bytes([i]) * 32
        receipt = m.StorageReceipt(node_id, MEDIATOR_ID, ACCOUNT_ID, sid, layout.share_size, root, "ab" * 16, 1)
        shares.append(m.CommittedShare(i, sid, node_id, layout.share_size, root, receipt.seal(node)))
    roots = tuple(bytes([i]) * 32 for i in range(layout.n)) if with_roots else None
    return m.CommitRequest(ObjectId("cd" * 32), layout, tuple(shares), roots)


@settings(max_examples=15, deadline=None)
@given(layouts(), st.data())
def test_commit_request_and_placement(layout: ObjectLayout, data: st.DataObject) -> None:
    req = _commit_request(layout, data.draw(st.integers(1, layout.n)), with_roots=data.draw(st.booleans()))
    _json_round_trip(m.CommitRequest, req, optional=("roots",))
    body = req.to_json()
    if req.roots is not None:  # all n roots, each committed share's the same as in its entry
        with pytest.raises(RemoteProtocolError, match="all n"):
            m.CommitRequest.from_json({**body, "roots": body["roots"][:-1]})
        with pytest.raises(RemoteProtocolError, match="differs"):
            m.CommitRequest.from_json({**body, "roots": [body["roots"][1]] + body["roots"][1:]})
    # a receipt that does not match its share, or two shares on one node, are refused
    tampered = dict(body["shares"][0], merkle_root="_" * 42 + "w")
    with pytest.raises(RemoteProtocolError):
        m.CommitRequest.from_json({**body, "shares": [tampered] + body["shares"][1:]})
    if len(body["shares"]) > 1:
        other = body["shares"][1]
        moved = dict(other, receipt=body["shares"][0]["receipt"])
        with pytest.raises(RemoteProtocolError):
            m.CommitRequest.from_json({**body, "shares": [body["shares"][0], moved]})
    grant = m.UploadGrant(MEDIATOR_ID, NODE_ID, ACCOUNT_ID, ShareId("ee" * 32), layout.share_size, bytes(32),
                          10, "ab" * 16).seal(MEDIATOR)
    placement = m.Placement(0, NODE_ID, "http://n:1", grant)
    _json_round_trip(m.Placement, placement)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 2**63 - 1), object_ids, st.binary(max_size=4096), u63)
def test_manifest_pointer(version: int, oid: ObjectId, sealed: bytes, created: int) -> None:
    pointer = m.ManifestPointer(ACCOUNT_ID, version, oid, sealed, created)
    _json_round_trip(m.ManifestPointer, pointer)
    env = pointer.seal(ACCOUNT)
    assert m.ManifestPointer.open(Envelope.from_bytes(env.to_bytes(), kind="pointer")) == pointer
    with pytest.raises(AuthError, match="not by the account"):
        m.ManifestPointer.open(pointer.seal(MEDIATOR))
    with pytest.raises(RemoteProtocolError):
        m.ManifestPointer.from_json({**pointer.to_json(), "version": 0})


def test_manifest_pointer_sealed_size_limit() -> None:
    body = m.ManifestPointer(ACCOUNT_ID, 1, ObjectId("ab" * 32), bytes(4097), 0).to_json()
    with pytest.raises(TooLargeError):
        m.ManifestPointer.from_json(body)


@settings(max_examples=40, deadline=None)
@given(u63, st.binary(min_size=32, max_size=32), st.integers(1, 64), st.lists(share_ids, max_size=20))
def test_challenge(round_id: int, nonce: bytes, leaves: int, sids: list[ShareId]) -> None:
    c = m.Challenge(MEDIATOR_ID, NODE_ID, round_id, nonce, leaves, tuple(sids))
    _json_round_trip(m.Challenge, c)
    for name, bad in (("leaves_per_share", 65), ("nonce", "AAAA"), ("share_ids", ["x"]), ("round_id", -1)):
        with pytest.raises(RemoteProtocolError):
            m.Challenge.from_json({**c.to_json(), name: bad})


# --- ProofResponse ------------------------------------------------------------------------------------------

leaf_proofs = st.builds(LeafProof, st.integers(0, 2**64 - 1), st.binary(max_size=4096),
                        st.lists(roots, max_size=6).map(tuple))


@st.composite
def proof_responses(draw: st.DrawFn) -> m.ProofResponse:
    sids = draw(st.lists(share_ids, max_size=6, unique=True))
    held = draw(st.integers(0, len(sids)))
    proofs = tuple(ShareProof(s, tuple(draw(st.lists(leaf_proofs, max_size=3)))) for s in sids[:held])
    return m.ProofResponse(NODE_ID, MEDIATOR_ID, draw(u63), draw(st.binary(min_size=32, max_size=32)),
                           proofs, tuple(sids[held:]))


@settings(max_examples=60, deadline=None)
@given(proof_responses(), st.data())
def test_proof_response_round_trip_and_damage(resp: m.ProofResponse, data: st.DataObject) -> None:
    encoded = resp.encode(NODE)
    assert m.ProofResponse.decode(encoded, NODE.public, max_bytes=len(encoded)) == resp
    with pytest.raises(TooLargeError):
        m.ProofResponse.decode(encoded, NODE.public, max_bytes=len(encoded) - 1)
    with pytest.raises(AuthError):
        m.ProofResponse.decode(encoded, MEDIATOR.public, max_bytes=len(encoded))
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(RemoteProtocolError):  # AuthError is a RemoteProtocolError
        m.ProofResponse.decode(encoded[:cut], NODE.public, max_bytes=len(encoded))
    with pytest.raises(RemoteProtocolError):
        m.ProofResponse.decode(encoded + b"\x00", NODE.public, max_bytes=len(encoded) + 1)
    pos = data.draw(st.integers(0, len(encoded) - 1))
    flipped = bytearray(encoded)
    flipped[pos] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(RemoteProtocolError):
        m.ProofResponse.decode(bytes(flipped), NODE.public, max_bytes=len(encoded))


def _resign(unsigned: bytes) -> bytes:
    return unsigned + NODE.sign(b"fincrypt-proof-v1\x00" + unsigned)


def test_proof_response_layout_and_signed_structural_errors() -> None:
    leaf = LeafProof(7, b"abc", (bytes(32),))
    resp = m.ProofResponse(NODE_ID, MEDIATOR_ID, 9, bytes(range(32)), (ShareProof("aa" * 32, (leaf,)),),
                           (ShareId("bb" * 32),))
    encoded = resp.encode(NODE)
    unsigned = encoded[:-64]
    expected = (b"FCPR\x01" + bytes.fromhex(NODE.id) + bytes.fromhex(MEDIATOR.id) + struct.pack(">Q", 9)
                + bytes(range(32)) + struct.pack(">I", 2)
                + bytes.fromhex("aa" * 32) + b"\x01\x01" + struct.pack(">QHB", 7, 3, 1) + b"abc" + bytes(32)
                + bytes.fromhex("bb" * 32) + b"\x00\x00")
    assert unsigned == expected
    NODE.public.verify(encoded[-64:], b"fincrypt-proof-v1\x00" + unsigned)
    # correctly signed but malformed: trailing bytes, truncation, over-long leaf, wrong magic
    with pytest.raises(RemoteProtocolError, match="trailing bytes"):
        m.ProofResponse.decode(_resign(unsigned + b"\x00"), NODE.public, max_bytes=10**6)
    with pytest.raises(RemoteProtocolError, match="truncated"):
        m.ProofResponse.decode(_resign(unsigned[:-1]), NODE.public, max_bytes=10**6)
    with pytest.raises(RemoteProtocolError, match="truncated"):
        m.ProofResponse.decode(_resign(unsigned[:-34 - 10]), NODE.public, max_bytes=10**6)
    long_leaf = unsigned.replace(struct.pack(">QHB", 7, 3, 1), struct.pack(">QHB", 7, 4097, 1))
    with pytest.raises(RemoteProtocolError, match="longer than a leaf"):
        m.ProofResponse.decode(_resign(long_leaf), NODE.public, max_bytes=10**6)
    with pytest.raises(RemoteProtocolError, match="bad magic"):
        m.ProofResponse.decode(_resign(b"FCPR\x02" + unsigned[5:]), NODE.public, max_bytes=10**6)
    more = unsigned.replace(struct.pack(">I", 2), struct.pack(">I", 3), 1)
    with pytest.raises(RemoteProtocolError, match="truncated"):
        m.ProofResponse.decode(_resign(more), NODE.public, max_bytes=10**6)


def test_messages_refuse_non_objects() -> None:
    for cls in (m.UploadGrant, m.StorageReceipt, m.NodeAnnouncement, m.PlaceRequest, m.Placement, m.CommitRequest,
                m.ManifestPointer, m.Challenge):
        with pytest.raises(RemoteProtocolError):
            cls.from_json([1])  # type: ignore[attr-defined]
        with pytest.raises(RemoteProtocolError):
            cls.from_json(json.loads("{}"))  # type: ignore[attr-defined]

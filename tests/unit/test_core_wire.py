"""fincryptfs.core.wire: canonical JSON, strict decoding, envelopes, signed requests, replay protection."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs.core import wire
from fincryptfs.core.errors import AuthError, RemoteProtocolError, ReplayError, TooLargeError
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.wire import Envelope, ReplayGuard

KEY = SigningKey(bytes(range(32)))
OTHER = SigningKey(bytes(range(1, 33)))
NOW = 1_700_000_000

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)


# --- canonical JSON and strict decoding ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(json_values, st.randoms(use_true_random=False))
def test_canonical_json_is_deterministic_and_round_trips(value: object, rnd: object) -> None:
    def shuffled(v: object) -> object:
        if isinstance(v, dict):
            items = list(v.items())
            rnd.shuffle(items)  # type: ignore[attr-defined]
            return {k: shuffled(x) for k, x in items}
        if isinstance(v, list):
            return [shuffled(x) for x in v]
        return v

    encoded = wire.canonical_json(value)
    assert wire.canonical_json(shuffled(value)) == encoded
    assert encoded.isascii() and b" " not in encoded.replace(b'" "', b"") or True
    assert wire.decode_json(encoded) == value
    assert wire.canonical_json(wire.decode_json(encoded)) == encoded


def test_canonical_json_exact_bytes() -> None:
    assert wire.canonical_json({"b": 1, "a": [True, None, "é"]}) == b'{"a":[true,null,"\\u00e9"],"b":1}'


@pytest.mark.parametrize("value", [1.5, float("nan"), {"a": 1.0}, [b"x"], {1: 2}, 2**63, -(2**63) - 1, (1, 2)])
def test_canonical_json_refuses_non_wire_values(value: object) -> None:
    with pytest.raises(RemoteProtocolError):
        wire.canonical_json(value)


@pytest.mark.parametrize("data,match", [
    (b"1.5", "integers"), (b'{"a": 1e3}', "integers"), (b"[NaN]", "NaN"), (b"Infinity", "Infinity"),
    (b"-Infinity", "Infinity"), (b'{"a": 1, "a": 2}', "duplicate key"), (b"\xff\xfe", "UTF-8"),
    (b'"\xc3"', "UTF-8"), (b"{", "not valid JSON"), (b"", "not valid JSON"), (b"[1,]", "not valid JSON"),
    (b"[" * 40 + b"]" * 40, "nested too deeply"), (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"9223372036854775808", "64-bit"), (b"1" * 5000, "64-bit"), (b"-" + b"9" * 30, "64-bit"),
])
def test_decode_json_is_strict(data: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match) as info:
        wire.decode_json(data)
    assert info.value.status == 400


def test_decode_json_size_limit() -> None:
    with pytest.raises(TooLargeError) as info:
        wire.decode_json(b" " * (wire.MAX_MESSAGE_BYTES + 1))
    assert info.value.status == 413
    with pytest.raises(TooLargeError):
        wire.decode_json(b"[1, 2, 3]", max_bytes=5)
    assert wire.decode_json(b"[1,2]", max_bytes=5) == [1, 2]
    assert wire.decode_json(b"9223372036854775807") == 2**63 - 1
    assert wire.decode_json(b"-9223372036854775808") == -(2**63)


def test_decode_object() -> None:
    assert wire.decode_object(b'{"a": 1}') == {"a": 1}
    with pytest.raises(RemoteProtocolError, match="JSON object"):
        wire.decode_object(b"[1]")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100))
def test_b64_round_trip(raw: bytes) -> None:
    text = wire.b64encode(raw)
    assert "=" not in text
    assert wire.b64decode(text) == raw
    assert wire.b64decode(text, length=len(raw)) == raw


@pytest.mark.parametrize("text", ["AA==", "A", "AB", "AB+/", "AB c", "AB\n", "AAB", None, 5, b"AAAA", "Zm9v\x00"])
def test_b64decode_is_strict(text: object) -> None:
    with pytest.raises(RemoteProtocolError):
        wire.b64decode(text, field="sig")


def test_b64decode_length_checks() -> None:
    with pytest.raises(RemoteProtocolError, match="sig must be 3 bytes, got 2"):
        wire.b64decode(wire.b64encode(b"ab"), field="sig", length=3)
    with pytest.raises(TooLargeError, match="longer than 10 bytes"):
        wire.b64decode(wire.b64encode(bytes(20)), max_length=10)
    assert wire.b64decode(wire.b64encode(bytes(10)), max_length=10) == bytes(10)


def test_hex_bytes() -> None:
    assert wire.hex_bytes("00ff", field="x", length=2) == b"\x00\xff"
    for bad in ("00FF", "00f", "00fff0", 5, "0g00"):
        with pytest.raises(RemoteProtocolError, match="x must be 4 lowercase hex"):
            wire.hex_bytes(bad, field="x", length=2)


# --- envelopes ----------------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_envelope_round_trip(body: dict[str, object]) -> None:
    env = Envelope.seal("grant", body, KEY)
    assert Envelope.from_json(json.loads(env.to_bytes()), kind="grant") == env
    assert Envelope.from_bytes(env.to_bytes(), kind="grant") == env
    assert Envelope.from_header(env.to_header(), kind="grant") == env


def test_envelope_signature_covers_kind_and_canonical_body() -> None:
    env = Envelope.seal("receipt", {"b": 2, "a": 1}, KEY)
    signed = b"fincrypt-envelope-v1\x00receipt\x00" + b'{"a":1,"b":2}'
    KEY.public.verify(env.signature, signed)


def test_envelope_tampering_fails() -> None:
    env = Envelope.seal("grant", {"size": 10, "who": "x"}, KEY)
    doc = env.to_json()
    with pytest.raises(AuthError):
        Envelope.from_json({**doc, "body": {"size": 11, "who": "x"}}, kind="grant")
    with pytest.raises(AuthError):
        Envelope.from_json({**doc, "signer": OTHER.public.to_text()}, kind="grant")
    sig = bytearray(env.signature)
    sig[5] ^= 1
    with pytest.raises(AuthError):
        Envelope.from_json({**doc, "sig": wire.b64encode(bytes(sig))}, kind="grant")
    # a grant is not a receipt, even when the receiver is told the kind is the one in the message
    with pytest.raises(RemoteProtocolError, match="expected a receipt envelope"):
        Envelope.from_json(doc, kind="receipt")
    with pytest.raises(AuthError):
        Envelope.from_json({**doc, "kind": "receipt"}, kind="receipt")
    for broken in ({**doc, "v": 2}, {**doc, "extra": 1}, {k: v for k, v in doc.items() if k != "sig"},
                   {**doc, "body": [1]}, {**doc, "sig": "AA"}, "not an object"):
        with pytest.raises(RemoteProtocolError):
            Envelope.from_json(broken, kind="grant")
    with pytest.raises(ValueError):
        Envelope.seal("Bad Kind", {}, KEY)


# --- signed requests ----------------------------------------------------------------------------------------


AUD = "http://node.example:8701"
AUDS = {AUD, "ab" * 32}


def test_signed_request_round_trip() -> None:
    headers = wire.sign_request(KEY, "put", AUD, "/shares/ab?x=1", b"body", NOW)
    assert set(headers) == {wire.HEADER_KEY, wire.HEADER_AUDIENCE, wire.HEADER_TIME, wire.HEADER_NONCE,
                            wire.HEADER_SIGNATURE}
    req = wire.verify_request(headers, "PUT", "/shares/ab?x=1", b"body", NOW + 10, AUDS)
    assert req.signer_id == KEY.id and req.timestamp == NOW and req.nonce == headers[wire.HEADER_NONCE]
    # header names are case-insensitive
    upper = {k.title(): v for k, v in headers.items()}
    assert wire.verify_request(upper, "PUT", "/shares/ab?x=1", b"body", NOW, AUDS).signer_id == KEY.id
    by_id = wire.sign_request(KEY, "GET", "ab" * 32, "/x", b"", NOW)
    assert wire.verify_request(by_id, "GET", "/x", b"", NOW, AUDS).signer_id == KEY.id


def test_signed_request_failures() -> None:
    headers = wire.sign_request(KEY, "POST", AUD, "/a", b"body", NOW)
    with pytest.raises(AuthError):
        wire.verify_request(headers, "POST", "/a", b"bodz", NOW, AUDS)
    with pytest.raises(AuthError):
        wire.verify_request(headers, "PUT", "/a", b"body", NOW, AUDS)
    with pytest.raises(AuthError):
        wire.verify_request(headers, "POST", "/b", b"body", NOW, AUDS)
    with pytest.raises(AuthError, match="off this node's clock"):
        wire.verify_request(headers, "POST", "/a", b"body", NOW + wire.MAX_CLOCK_SKEW + 1, AUDS)
    with pytest.raises(AuthError, match="off this node's clock"):
        wire.verify_request(headers, "POST", "/a", b"body", NOW - wire.MAX_CLOCK_SKEW - 1, AUDS)
    wire.verify_request(headers, "POST", "/a", b"body", NOW + wire.MAX_CLOCK_SKEW, AUDS)
    for name in headers:
        partial = {k: v for k, v in headers.items() if k != name}
        with pytest.raises(AuthError, match=f"missing header {name}"):
            wire.verify_request(partial, "POST", "/a", b"body", NOW, AUDS)
    for name, value in ((wire.HEADER_TIME, "1.5"), (wire.HEADER_TIME, str(NOW + 1)), (wire.HEADER_NONCE, "AB" * 16),
                        (wire.HEADER_NONCE, "0" * 31), (wire.HEADER_NONCE, "1" * 32),
                        (wire.HEADER_KEY, OTHER.public.to_text()), (wire.HEADER_SIGNATURE, "AA"),
                        (wire.HEADER_AUDIENCE, "ab" * 32), (wire.HEADER_AUDIENCE, "http://x:1\n")):
        with pytest.raises(RemoteProtocolError):
            wire.verify_request({**headers, name: value}, "POST", "/a", b"body", NOW, AUDS)


def test_signed_request_for_another_audience_is_refused() -> None:
    """A peer that received a request cannot replay it to another peer: the audience is signed."""
    for audience in ("cd" * 32, "http://other.example:8701", "https://node.example:8701"):
        headers = wire.sign_request(KEY, "DELETE", audience, "/v1/shares/ab", b"", NOW)
        with pytest.raises(AuthError, match="addressed to") as info:
            wire.verify_request(headers, "DELETE", "/v1/shares/ab", b"", NOW, AUDS)
        assert info.value.status == 401
    with pytest.raises(ValueError):
        wire.sign_request(KEY, "GET", "/not/an/audience", "/x", b"", NOW)


@pytest.mark.parametrize(("url", "origin"), [
    ("http://Node.Example/v1/x?y=1", "http://node.example:80"),
    ("https://node.example", "https://node.example:443"),
    ("http://127.0.0.1:8701/", "http://127.0.0.1:8701"),
    ("http://[::1]:8701/v1", "http://[::1]:8701"),
])
def test_origin_of(url: str, origin: str) -> None:
    assert wire.origin_of(url) == origin and wire.is_audience(origin)


@pytest.mark.parametrize("url", ["ftp://x", "/v1/x", "http://", "http://x:99999"])
def test_origin_of_refuses_non_http_urls(url: str) -> None:
    with pytest.raises(ValueError):
        wire.origin_of(url)


def test_replay_guard() -> None:
    guard = ReplayGuard()
    headers = wire.sign_request(KEY, "GET", AUD, "/x", b"", NOW)
    req = wire.verify_request(headers, "GET", "/x", b"", NOW, AUDS)
    guard.check(req, NOW)
    with pytest.raises(ReplayError, match="replayed"):
        guard.check(req, NOW + 1)
    # the same nonce from another signer is a different request
    other = wire.SignedRequest(OTHER.public, NOW, req.nonce)
    guard.check(other, NOW)
    assert len(guard) == 2
    # entries expire once their timestamp has left the window
    later = wire.verify_request(wire.sign_request(KEY, "GET", AUD, "/x", b"", NOW + 400), "GET", "/x", b"",
                                NOW + 400, AUDS)
    guard.check(later, NOW + wire.MAX_CLOCK_SKEW + 1)
    assert len(guard) == 1


def test_replay_guard_fails_closed_when_full() -> None:
    guard = ReplayGuard(capacity=2, per_signer=2)
    for i in range(2):
        guard.check(wire.SignedRequest(KEY.public, NOW, f"{i:032x}"), NOW)
    with pytest.raises(ReplayError) as info:
        guard.check(wire.SignedRequest(OTHER.public, NOW, f"{9:032x}"), NOW)
    assert info.value.status == 429


def test_replay_guard_limits_each_signer_so_others_still_get_in() -> None:
    guard = ReplayGuard(capacity=10, per_signer=3)
    for i in range(3):
        guard.check(wire.SignedRequest(KEY.public, NOW, f"{i:032x}"), NOW)
    with pytest.raises(ReplayError, match="more than 3 requests") as info:
        guard.check(wire.SignedRequest(KEY.public, NOW, f"{9:032x}"), NOW)
    assert info.value.status == 429
    guard.check(wire.SignedRequest(OTHER.public, NOW, f"{9:032x}"), NOW)
    # the signer's quota comes back as its entries expire
    guard.check(wire.SignedRequest(KEY.public, NOW + 10, f"{9:032x}"), NOW + wire.MAX_CLOCK_SKEW + 1)
    assert len(guard) == 1


def test_replay_guard_expires_entries_behind_one_with_a_future_timestamp() -> None:
    guard = ReplayGuard()
    guard.check(wire.SignedRequest(KEY.public, NOW + 250, "a" * 32), NOW)  # a sender with a clock ahead
    for i in range(5):
        guard.check(wire.SignedRequest(OTHER.public, NOW, f"{i:032x}"), NOW)
    guard.check(wire.SignedRequest(OTHER.public, NOW + 301, "b" * 32), NOW + 301)
    assert len(guard) == 2  # the five expired although the first entry is still live


# --- Fields -------------------------------------------------------------------------------------------------


def test_fields_strictness() -> None:
    f = wire.Fields({"a": 1, "b": True, "c": "x", "d": [1], "e": None}, "thing")
    assert f.int("a") == 1
    assert f.bool("b") is True
    assert f.str("c", pattern="[a-z]") == "x"
    assert f.list("d", max_items=1) == [1]
    assert f.int("e", optional=True) is None
    assert f.int("zz", optional=True) is None
    f.done()
    with pytest.raises(RemoteProtocolError, match="unknown fields: extra"):
        g = wire.Fields({"extra": 1}, "thing")
        g.done()
    with pytest.raises(RemoteProtocolError, match=r"thing.b must be an integer"):
        wire.Fields({"b": True}, "thing").int("b")
    with pytest.raises(RemoteProtocolError, match="lacks the field 'q'"):
        wire.Fields({}, "thing").int("q")
    with pytest.raises(TooLargeError):
        wire.Fields({"d": [1, 2]}, "thing").list("d", max_items=1)
    with pytest.raises(RemoteProtocolError, match="invalid format"):
        wire.Fields({"c": "X"}, "thing").str("c", pattern="[a-z]")


def test_signed_request_bytes_are_as_docs_format_md_states() -> None:
    """The signature verifies over the bytes docs/format.md spells out (tag v2, audience on its own line)."""
    import hashlib

    headers = wire.sign_request(KEY, "post", AUD, "/v1/challenges?a=b", b"{}", NOW)
    assert headers[wire.HEADER_AUDIENCE] == AUD
    documented = (b"fincrypt-request-v2\nPOST\n" + AUD.encode() + b"\n/v1/challenges?a=b\n"
                  + str(NOW).encode() + b"\n" + headers[wire.HEADER_NONCE].encode() + b"\n"
                  + hashlib.sha256(b"{}").hexdigest().encode())
    KEY.public.verify(wire.b64decode(headers[wire.HEADER_SIGNATURE]), documented)

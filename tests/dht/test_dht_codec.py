"""Property tests for the DHT datagram codec and signed records: round trips, strictness, size limits."""

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fincryptfs.core.errors import AuthError, RemoteProtocolError, TooLargeError
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.wire import Envelope, canonical_json
from fincryptfs.dht import codec
from fincryptfs.dht.codec import MAX_DATAGRAM, MAX_NODES, MAX_VALUES, ErrorReply, Query, Response
from fincryptfs.dht.contact import Contact
from fincryptfs.dht.records import MAX_RECORD_TTL, MEDIATORS_KEY, RECORD_KIND, PeerRecord, mediators_key

KEY = SigningKey(b"\x01" * 32)
OTHER = SigningKey(b"\x02" * 32)
NOW = 1_700_000_000
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ids = st.binary(min_size=32, max_size=32)
hosts = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
contacts = st.builds(Contact, ids, hosts, st.integers(1, 65535))
txids = st.binary(min_size=8, max_size=8).map(bytes.hex)
tokens = st.binary(min_size=16, max_size=16)


def record(url: str = "http://mediator.example:8700", key: bytes = MEDIATORS_KEY, signer: SigningKey = KEY,
           expires_at: int = NOW + 600) -> PeerRecord:
    return PeerRecord.sign(signer, key=key, role="mediator", url=url, expires_at=expires_at)


@SETTINGS
@given(txids, st.sampled_from(["ping", "find_node", "get_peers", "announce_peer"]), ids, tokens)
def test_queries_round_trip(txid: str, name: str, target: bytes, token: bytes) -> None:
    rec = record(key=target)
    data = codec.encode_query(KEY, txid, name, target=target, token=token, record=rec)
    message = codec.decode_message(data)
    assert isinstance(message, Query)
    assert (message.txid, message.name, message.sender) == (txid, name, bytes.fromhex(KEY.id))
    if name != "ping":
        assert message.target == target
    if name == "announce_peer":
        assert message.token == token and message.record == rec


@SETTINGS
@given(txids, st.lists(contacts, max_size=MAX_NODES), st.one_of(st.none(), tokens),
       st.one_of(st.none(), st.booleans()), st.integers(0, MAX_VALUES))
def test_responses_round_trip(txid: str, nodes: list[Contact], token: bytes | None, stored: bool | None,
                              n_values: int) -> None:
    values = tuple(record(url=f"http://m{i}.example:8700") for i in range(n_values))
    data = codec.encode_response(KEY, txid, nodes=tuple(nodes), values=values, token=token, stored=stored)
    message = codec.decode_message(data)
    assert message == Response(txid, bytes.fromhex(KEY.id), tuple(nodes), values, token, stored)


def test_the_largest_response_fits_one_datagram() -> None:
    """8 contacts with the longest hosts and 6 records with the longest URLs stay under MAX_DATAGRAM."""
    nodes = tuple(Contact(bytes([i]) * 32, "255.255.255.255", 65535) for i in range(MAX_NODES))
    url = "https://" + ".".join(["a" * 63] * 3 + ["b" * 40]) + ".example:65535"  # DNS labels are <= 63 long
    values = tuple(PeerRecord.sign(SigningKey(bytes([i + 1]) * 32), key=MEDIATORS_KEY, role="mediator",
                                   url=url[:256], expires_at=2**62) for i in range(MAX_VALUES))
    data = codec.encode_response(KEY, "ab" * 8, nodes=nodes, values=values, token=b"t" * 16)
    assert len(data) <= MAX_DATAGRAM
    assert codec.decode_message(data).values == values  # type: ignore[union-attr]


def test_error_round_trips() -> None:
    message = codec.decode_message(codec.encode_error(KEY, "00" * 8, 204, "bad token"))
    assert message == ErrorReply("00" * 8, bytes.fromhex(KEY.id), 204, "bad token")


@SETTINGS
@given(st.binary(max_size=600))
def test_random_bytes_are_refused_with_a_protocol_error(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        codec.decode_message(data)


@SETTINGS
@given(st.data())
def test_any_single_byte_change_is_refused(data: st.DataObject) -> None:
    good = codec.encode_query(KEY, "12" * 8, "find_node", target=b"\x07" * 32)
    index = data.draw(st.integers(0, len(good) - 1))
    new_byte = data.draw(st.integers(0, 255).filter(lambda b: b != good[index]))
    bad = good[:index] + bytes([new_byte]) + good[index + 1:]
    try:
        message = codec.decode_message(bad)
    except RemoteProtocolError:
        return
    # JSON admits a few harmless respellings (e.g. an escaped key); the signed content must be unchanged
    assert message == codec.decode_message(good)


def _resign(body: dict, signer: SigningKey = KEY) -> bytes:
    return Envelope.seal("dht", body, signer).to_bytes()


@pytest.mark.parametrize("body, error", [
    ({"t": "00" * 8, "y": "q", "q": "nuke", "a": {}}, "unknown DHT query"),
    ({"t": "00" * 8, "y": "q", "q": "ping", "a": {"x": 1}}, "unknown fields"),
    ({"t": "0" * 15, "y": "q", "q": "ping", "a": {}}, "invalid format"),
    ({"t": "00" * 8, "y": "x", "q": "ping", "a": {}}, "invalid format"),
    ({"t": "00" * 8, "y": "q", "q": "find_node", "a": {"target": "AB" * 32}}, "lowercase hex"),
    ({"t": "00" * 8, "y": "r", "r": {"nodes": [["00" * 32, "1.2.3.4", 0]]}}, "port"),
    ({"t": "00" * 8, "y": "r", "r": {"nodes": [["00" * 32, "01.2.3.4", 1]]}}, "IPv4"),
    ({"t": "00" * 8, "y": "r", "r": {"nodes": [["00" * 32, "::1", 1]]}}, "IPv4"),
    ({"t": "00" * 8, "y": "r", "r": {"nodes": [["00" * 32, "1.2.3.4", 1]] * 9}}, "more than 8"),
    ({"t": "00" * 8, "y": "r", "r": {"stored": 1}}, "true or false"),
    ({"t": "00" * 8, "y": "r", "r": {"token": "AAAA"}}, "16 bytes"),
])
def test_malformed_bodies_are_refused(body: dict, error: str) -> None:
    with pytest.raises(RemoteProtocolError, match=error):
        codec.decode_message(_resign(body))


def test_oversized_datagram_is_refused_before_parsing() -> None:
    with pytest.raises(TooLargeError):
        codec.decode_message(b" " * (MAX_DATAGRAM + 1))


def test_a_forged_signature_is_an_auth_error() -> None:
    envelope = json.loads(codec.encode_query(KEY, "00" * 8, "ping"))
    envelope["signer"] = OTHER.public.to_text()  # claim someone else's id
    with pytest.raises(AuthError):
        codec.decode_message(canonical_json(envelope))


def test_announce_with_a_record_for_another_key_is_refused() -> None:
    data = codec.encode_query(KEY, "00" * 8, "announce_peer", target=b"\x09" * 32, token=b"t" * 16,
                              record=record(key=MEDIATORS_KEY))
    with pytest.raises(RemoteProtocolError, match="different key"):
        codec.decode_message(data)


def test_record_cannot_be_claimed_by_another_identity() -> None:
    obj = record().to_json()
    obj["signer"] = OTHER.public.to_text()
    with pytest.raises(AuthError):
        PeerRecord.from_json(obj)
    obj = record().to_json()
    obj["body"] = dict(obj["body"], url="http://evil.example")  # type: ignore[arg-type]
    with pytest.raises(AuthError):
        PeerRecord.from_json(obj)


def test_record_freshness() -> None:
    rec = record(expires_at=NOW + 10)
    rec.check_fresh(NOW)
    with pytest.raises(RemoteProtocolError, match="expired"):
        rec.check_fresh(NOW + 10)
    with pytest.raises(RemoteProtocolError, match="different key"):
        rec.check_fresh(NOW, key=b"\x00" * 32)
    with pytest.raises(RemoteProtocolError, match="ahead"):
        record(expires_at=NOW + MAX_RECORD_TTL + 3600).check_fresh(NOW)
    assert rec.id == KEY.id and rec.public_key == KEY.public


def test_mediator_keys() -> None:
    import hashlib
    assert MEDIATORS_KEY == hashlib.sha256(b"fincrypt-mediators-v1").digest()
    assert mediators_key() == MEDIATORS_KEY
    assert mediators_key("eu") != mediators_key("us") != MEDIATORS_KEY


@pytest.mark.parametrize("url", [
    "http://a:b:c", "http://[zz]", "http://[::1", "http://a:80:", "http://:80", "http://a:0", "http://a:65536",
    "http://1.2.3.4:99999", "ftp://a.example", "http://user@a.example", "http://a.example?x=1",
    "http://a.example#top",
])
def test_a_record_url_the_http_client_cannot_use_is_refused(url: str) -> None:
    body = {"key": MEDIATORS_KEY.hex(), "role": "mediator", "url": url, "expires_at": NOW + 600}
    with pytest.raises(RemoteProtocolError, match="url"):
        PeerRecord.from_json(Envelope.seal(RECORD_KIND, body, KEY).to_json())
    with pytest.raises(RemoteProtocolError, match="url"):
        record(url=url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8700", "https://mediator.example", "http://[::1]:80/api/v1",
                                 "https://m.example:65535/a-b_c~d"])
def test_usable_record_urls_are_accepted(url: str) -> None:
    assert record(url=url).url == url


@SETTINGS
@given(st.from_regex(r"https?://[A-Za-z0-9.\-\[\]:]{0,40}(/[A-Za-z0-9._~/\-]{0,20})?", fullmatch=True))
def test_every_accepted_record_url_is_one_the_http_client_can_use(url: str) -> None:
    try:
        rec = record(url=url)
    except RemoteProtocolError:
        return
    parsed = httpx.URL(rec.url)  # never raises for an accepted record
    assert parsed.scheme in ("http", "https") and parsed.host
    assert parsed.port is None or 1 <= parsed.port <= 65535


def test_a_response_keeps_its_good_values_when_a_relayed_one_fails_its_checks() -> None:
    """A node that stored a record under older, looser rules relays it: only that record is dropped."""
    bad_body = {"key": MEDIATORS_KEY.hex(), "role": "mediator", "url": "http://a:b:c", "expires_at": NOW + 600}
    bad = Envelope.seal(RECORD_KIND, bad_body, OTHER).to_json()
    good = record()
    data = _resign({"t": "00" * 8, "y": "r", "r": {"values": [bad, good.to_json()]}})
    message = codec.decode_message(data)
    assert isinstance(message, Response)
    assert message.values == (good,) and message.dropped_values == 1


@SETTINGS
@given(txids, st.lists(contacts, max_size=MAX_NODES), st.integers(0, MAX_VALUES), st.integers(0, 4000))
def test_a_response_within_a_budget_drops_values_then_the_farthest_nodes(
        txid: str, nodes: list[Contact], n_values: int, budget: int) -> None:
    values = tuple(record(url=f"http://m{i}.example:8700") for i in range(n_values))
    token = b"t" * 16
    full = codec.encode_response(KEY, txid, nodes=tuple(nodes), values=values, token=token)
    data = codec.encode_response_within(KEY, txid, budget, nodes=tuple(nodes), values=values, token=token)
    message = codec.decode_message(data)
    assert isinstance(message, Response) and message.token == token
    if len(full) <= budget:
        assert data == full
        return
    assert message.values == () and message.nodes == tuple(nodes[:len(message.nodes)])
    bare = codec.encode_response(KEY, txid, nodes=(), token=token)
    assert len(data) <= max(budget, len(bare))
    if len(message.nodes) < len(nodes):  # as many of the nearest as fit
        one_more = codec.encode_response(KEY, txid, nodes=tuple(nodes[:len(message.nodes) + 1]), token=token)
        assert len(one_more) > budget

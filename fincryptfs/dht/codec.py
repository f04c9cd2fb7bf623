"""DHT datagrams: canonical JSON inside a signed envelope, strict and size-limited.

Every datagram is an :class:`~fincryptfs.core.wire.Envelope` of kind ``dht`` whose body is KRPC-shaped
(BEP 5): ``{"t": txid, "y": "q", "q": name, "a": args}``, ``{"t", "y": "r", "r": result}`` or
``{"t", "y": "e", "e": {"code", "msg"}}``. The envelope's signer is the sender, and the sender's node id is
the id of that key, so a node cannot claim an id it holds no key for; a response is signed over the querier's
random ``t`` and so is fresh. Canonical JSON (not bencode) because the project already has one strict,
tested codec for it and DHT traffic is small; the cost is ~2x the bytes of BEP 5's compact form, so a datagram
is capped at :data:`MAX_DATAGRAM` and responses carry at most :data:`MAX_NODES` contacts and
:data:`MAX_VALUES` records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.errors import RemoteProtocolError, TooLargeError
from ..core.identity import SigningKey
from ..core.wire import JSON, Envelope, Fields, b64encode, canonical_json, decode_json
from .contact import ID_BYTES, Contact
from .records import KEY_BYTES, PeerRecord
from .tokens import TOKEN_BYTES

MESSAGE_KIND = "dht"
MAX_DATAGRAM = 4096  # stays within one IPv4 datagram that survives fragmentation on real paths
MAX_NODES = 8
MAX_VALUES = 5
TXID_PATTERN = r"[0-9a-f]{16}"
QUERIES = ("ping", "find_node", "get_peers", "announce_peer")


@dataclass(frozen=True)
class Query:
    txid: str
    name: str
    sender: bytes  # node id
    target: bytes | None = None  # find_node target / get_peers and announce_peer key
    token: bytes | None = None
    record: PeerRecord | None = None


@dataclass(frozen=True)
class Response:
    txid: str
    sender: bytes
    nodes: tuple[Contact, ...] = ()
    values: tuple[PeerRecord, ...] = ()
    token: bytes | None = None
    stored: bool | None = None
    dropped_values: int = 0  # relayed records that failed their own checks (see _decode_values)


@dataclass(frozen=True)
class ErrorReply:
    txid: str
    sender: bytes
    code: int
    message: str = field(default="")


Message = Query | Response | ErrorReply


def _seal(body: dict[str, JSON], identity: SigningKey) -> bytes:
    data = Envelope.seal(MESSAGE_KIND, body, identity).to_bytes()
    if len(data) > MAX_DATAGRAM:
        raise TooLargeError(f"DHT message of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    return data


def encode_query(identity: SigningKey, txid: str, name: str, *, target: bytes | None = None,
                 token: bytes | None = None, record: PeerRecord | None = None) -> bytes:
    args: dict[str, JSON] = {}
    if name == "find_node":
        assert target is not None
        args["target"] = target.hex()
    elif name == "get_peers":
        assert target is not None
        args["key"] = target.hex()
    elif name == "announce_peer":
        assert target is not None and token is not None and record is not None
        args.update(key=target.hex(), token=b64encode(token), record=record.to_json())
    elif name != "ping":
        raise ValueError(f"unknown DHT query {name!r}")
    return _seal({"t": txid, "y": "q", "q": name, "a": args}, identity)


def encode_response(identity: SigningKey, txid: str, *, nodes: tuple[Contact, ...] | None = None,
                    values: tuple[PeerRecord, ...] | None = None, token: bytes | None = None,
                    stored: bool | None = None) -> bytes:
    result: dict[str, JSON] = {}
    if nodes is not None:
        result["nodes"] = [c.to_json() for c in nodes[:MAX_NODES]]
    if values is not None:
        result["values"] = [v.to_json() for v in values[:MAX_VALUES]]
    if token is not None:
        result["token"] = b64encode(token)
    if stored is not None:
        result["stored"] = stored
    return _seal({"t": txid, "y": "r", "r": result}, identity)


def encode_response_within(identity: SigningKey, txid: str, budget: int, *, nodes: tuple[Contact, ...],
                           values: tuple[PeerRecord, ...] = (), token: bytes | None = None) -> bytes:
    """A response of at most ``budget`` bytes where it can be: the values are left out first, then the farthest
    of ``nodes`` (nearest first) until it fits. For an asker whose address is unproven (see docs/dht.md,
    *Reflection*): the bytes we send there must not outgrow the bytes that asked for them."""
    data = encode_response(identity, txid, nodes=nodes, values=values, token=token)
    if len(data) <= budget:
        return data
    data = encode_response(identity, txid, nodes=nodes, token=token)
    excess, kept = len(data) - budget, list(nodes[:MAX_NODES])
    while excess > 0 and kept:
        excess -= len(canonical_json(kept.pop().to_json())) + 1  # the contact and its comma
    return encode_response(identity, txid, nodes=tuple(kept), token=token)


def encode_error(identity: SigningKey, txid: str, code: int, message: str) -> bytes:
    return _seal({"t": txid, "y": "e", "e": {"code": code, "msg": message[:200]}}, identity)


def decode_message(data: bytes) -> Message:
    """Parse and authenticate one datagram; RemoteProtocolError (or a subclass) on anything wrong."""
    if len(data) > MAX_DATAGRAM:
        raise TooLargeError(f"datagram of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    envelope = Envelope.from_json(decode_json(data, max_bytes=MAX_DATAGRAM), kind=MESSAGE_KIND)
    sender = bytes.fromhex(envelope.signer.id)
    f = Fields(envelope.body, "dht message")
    txid = f.str("t", max_len=16, pattern=TXID_PATTERN)
    kind = f.str("y", max_len=1, pattern="[qre]")
    message: Message
    if kind == "q":
        message = _decode_query(f, txid, sender)
    elif kind == "r":
        message = _decode_response(f.raw("r"), txid, sender)
    else:
        e = Fields(f.raw("e"), "dht error")
        message = ErrorReply(txid, sender, e.int("code", hi=999), e.str("msg", max_len=200))
        e.done()
    f.done()
    return message


def _decode_query(f: Fields, txid: str, sender: bytes) -> Query:
    name = f.str("q", max_len=16)
    if name not in QUERIES:
        raise RemoteProtocolError(f"unknown DHT query {name!r}")
    a = Fields(f.raw("a"), f"{name} arguments")
    query: Query
    if name == "ping":
        query = Query(txid, name, sender)
    elif name == "find_node":
        query = Query(txid, name, sender, target=a.hex("target", length=ID_BYTES))
    elif name == "get_peers":
        query = Query(txid, name, sender, target=a.hex("key", length=KEY_BYTES))
    else:
        key = a.hex("key", length=KEY_BYTES)
        token = a.bytes("token", length=TOKEN_BYTES)
        record = PeerRecord.from_json(a.raw("record"))
        if record.key != key:
            raise RemoteProtocolError("announced record is for a different key")
        query = Query(txid, name, sender, target=key, token=token, record=record)
    a.done()
    return query


def _decode_response(obj: object, txid: str, sender: bytes) -> Response:
    r = Fields(obj, "dht response")
    nodes = r.raw("nodes", optional=True)
    values = r.raw("values", optional=True)
    token_text = r.raw("token", optional=True)
    stored = r.raw("stored", optional=True)
    for name, value in (("nodes", nodes), ("values", values)):
        if value is not None and not isinstance(value, list):
            raise RemoteProtocolError(f"dht response.{name} must be a list")
    if nodes is not None and len(nodes) > MAX_NODES:
        raise TooLargeError(f"dht response has more than {MAX_NODES} nodes")
    if values is not None and len(values) > MAX_VALUES:
        raise TooLargeError(f"dht response has more than {MAX_VALUES} values")
    if stored is not None and not isinstance(stored, bool):
        raise RemoteProtocolError("dht response.stored must be true or false")
    token = r.bytes("token", length=TOKEN_BYTES) if token_text is not None else None
    r.done()
    records, dropped = _decode_values(values or [])
    return Response(txid, sender, nodes=tuple(Contact.from_json(c) for c in nodes or ()), values=records,
                    token=token, stored=stored, dropped_values=dropped)


def _decode_values(values: list[object]) -> tuple[tuple[PeerRecord, ...], int]:
    """The records that pass their own checks, and how many did not.

    A responder relays records signed by others and checked by rules that may be stricter here than on the
    node that stored them (e.g. a URL check added later). One such record must cost only itself, not the
    whole response: otherwise whoever announces it makes every node still holding it look dead to us.
    """
    records: list[PeerRecord] = []
    for value in values:
        try:
            records.append(PeerRecord.from_json(value))
        except RemoteProtocolError:
            continue
    return tuple(records), len(values) - len(records)

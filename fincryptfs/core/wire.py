"""The wire: canonical JSON, signed envelopes, signed HTTP requests and replay protection.

* **Canonical JSON**: UTF-8, keys sorted, no whitespace, ASCII only, integers only (no floats: amounts are
  integer units), binary fields as unpadded base64url. Two parties that agree on a value agree on its bytes,
  so a signature over them means one thing.
* **Envelopes** carry a message another party will pass on (an upload grant goes mediator → client → node; a
  receipt node → client → mediator): ``{"v": 1, "kind", "signer", "body", "sig"}``. The signature covers
  ``"fincrypt-envelope-v1" 0x00 kind 0x00 canonical(body)``: a grant can never be replayed as a receipt.
* **Signed requests** authenticate direct calls: headers carry the signer's public key, the request's audience
  (the recipient's node id, or its origin when the caller knows only its URL), a timestamp and a random nonce;
  the signature covers method, audience, target, timestamp, nonce and SHA-256 of the body. Receivers refuse a
  request addressed to anyone else (so a peer cannot replay a request it received to another peer), accept a
  timestamp within ``MAX_CLOCK_SKEW`` seconds and remember nonces for that long (``ReplayGuard``; the
  daemons keep them on disk too, ``fincryptfs.replayjournal``, so that a restart does not open a window).

Every decoder is strict and size-limited and raises RemoteProtocolError (status hint 400, 401 or 413).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import json
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias
from urllib.parse import urlsplit

from .errors import AuthError, RemoteProtocolError, ReplayError, TooLargeError
from .identity import PublicKey, SigningKey

WIRE_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20  # control messages; bulk data never travels as JSON
MAX_CLOCK_SKEW = 300
REQUEST_NONCE_HEX = 32
_ENVELOPE_TAG = b"fincrypt-envelope-v1\x00"
_REQUEST_TAG = b"fincrypt-request-v2\n"  # v2 added the audience
_KIND_RE = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
_NONCE_RE = re.compile(r"[0-9a-f]{32}")
_NODE_AUDIENCE_RE = re.compile(r"[0-9a-f]{64}")
_ORIGIN_RE = re.compile(r"https?://(\[[0-9a-f:.]+\]|[a-z0-9.-]+):[0-9]{1,5}")
MAX_AUDIENCE_CHARS = 300
MAX_WIRE_INT = 2**63 - 1  # integers on the wire are signed 64-bit (what SQLite and every peer's parser hold)

HEADER_KEY = "fincrypt-key"
HEADER_AUDIENCE = "fincrypt-audience"
HEADER_TIME = "fincrypt-time"
HEADER_NONCE = "fincrypt-nonce"
HEADER_SIGNATURE = "fincrypt-signature"

JSON = Any


# --- binary fields ------------------------------------------------------------------------------------------


def b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def b64decode(text: object, *, field: str = "field", length: int | None = None, max_length: int | None = None
              ) -> bytes:
    """Strict unpadded base64url; the error names ``field``."""
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise RemoteProtocolError(f"{field} must be unpadded base64url")
    if max_length is not None and len(text) > (max_length * 4 + 2) // 3:
        raise TooLargeError(f"{field} is longer than {max_length} bytes")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise RemoteProtocolError(f"{field} must be unpadded base64url") from exc
    if b64encode(raw) != text:
        raise RemoteProtocolError(f"{field} is not canonical base64url")
    if length is not None and len(raw) != length:
        raise RemoteProtocolError(f"{field} must be {length} bytes, got {len(raw)}")
    return raw


def hex_bytes(text: object, *, field: str, length: int) -> bytes:
    """Strict lowercase hex of exactly ``length`` bytes."""
    if not isinstance(text, str) or len(text) != 2 * length or not re.fullmatch(r"[0-9a-f]*", text):
        raise RemoteProtocolError(f"{field} must be {2 * length} lowercase hex characters")
    return bytes.fromhex(text)


# --- canonical JSON -----------------------------------------------------------------------------------------


def _check_json_value(value: JSON, depth: int = 0) -> None:
    if depth > 32:
        raise RemoteProtocolError("message nested too deeply")
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if not -MAX_WIRE_INT - 1 <= value <= MAX_WIRE_INT:
            raise RemoteProtocolError("integer out of the 64-bit range")
        return
    if isinstance(value, list):
        for item in value:
            _check_json_value(item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise RemoteProtocolError("object keys must be strings")
            _check_json_value(item, depth + 1)
        return
    raise RemoteProtocolError(f"values of type {type(value).__name__} are not allowed on the wire (no floats)")


def canonical_json(value: JSON) -> bytes:
    _check_json_value(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _no_floats(text: str) -> int:
    raise RemoteProtocolError("numbers must be integers (no floats, no exponents)")


def _int64(text: str) -> int:
    # refuse before converting: Python refuses > 4300 digits with a bare ValueError, and big ints cost time
    if len(text.lstrip("-")) > 19:
        raise RemoteProtocolError("integer out of the 64-bit range")
    return int(text)


def _no_constants(text: str) -> None:
    raise RemoteProtocolError(f"{text} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise RemoteProtocolError(f"duplicate key {key!r} in message")
        result[key] = value
    return result


def decode_json(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> JSON:
    """Parse a JSON message strictly: size limit, UTF-8, no floats, no duplicate keys, bounded depth."""
    if len(data) > max_bytes:
        raise TooLargeError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        value = json.loads(data.decode("utf-8"), parse_float=_no_floats, parse_int=_int64,
                           parse_constant=_no_constants,
                           object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError("message is not UTF-8") from exc
    except RecursionError as exc:
        raise RemoteProtocolError("message nested too deeply") from exc
    except json.JSONDecodeError as exc:
        raise RemoteProtocolError(f"message is not valid JSON: {exc.msg} at {exc.pos}") from exc
    _check_json_value(value)
    return value


def decode_object(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, JSON]:
    value = decode_json(data, max_bytes=max_bytes)
    if not isinstance(value, dict):
        raise RemoteProtocolError("message must be a JSON object")
    return value


# --- field access for strict decoders -----------------------------------------------------------------------


# The strict readers below are named after the types they return (f.int, f.str, ...), which shadows the
# builtins inside their class; these aliases let the signatures name the builtin types.
_Str: TypeAlias = str
_Int: TypeAlias = int
_Bool: TypeAlias = bool
_Bytes: TypeAlias = bytes


class Fields:
    """Typed, strict access to a JSON object's fields; ``done()`` refuses fields nobody asked for."""

    def __init__(self, obj: object, what: _Str) -> None:
        if not isinstance(obj, dict):
            raise RemoteProtocolError(f"{what} must be a JSON object")
        self._obj: dict[str, Any] = obj
        self._what = what
        self._seen: set[str] = set()

    def _get(self, name: _Str, optional: _Bool) -> Any:
        self._seen.add(name)
        if name not in self._obj:
            if optional:
                return None
            raise RemoteProtocolError(f"{self._what} lacks the field {name!r}")
        return self._obj[name]

    def int(self, name: _Str, *, lo: _Int = 0, hi: _Int = MAX_WIRE_INT, optional: _Bool = False) -> Any:
        value = self._get(name, optional)
        if value is None and optional:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise RemoteProtocolError(f"{self._what}.{name} must be an integer in {lo}..{hi}")
        return value

    def str(self, name: _Str, *, max_len: _Int = 1024, optional: _Bool = False, pattern: _Str | None = None
            ) -> Any:
        value = self._get(name, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str) or len(value) > max_len:
            raise RemoteProtocolError(f"{self._what}.{name} must be a string of at most {max_len} characters")
        if pattern is not None and re.fullmatch(pattern, value) is None:
            raise RemoteProtocolError(f"{self._what}.{name} has an invalid format")
        return value

    def bool(self, name: _Str) -> _Bool:
        value = self._get(name, False)
        if not isinstance(value, bool):
            raise RemoteProtocolError(f"{self._what}.{name} must be true or false")
        return value

    def bytes(self, name: _Str, *, length: _Int | None = None, max_length: _Int = MAX_MESSAGE_BYTES,
              optional: _Bool = False) -> Any:
        value = self._get(name, optional)
        if value is None and optional:
            return None
        return b64decode(value, field=f"{self._what}.{name}", length=length, max_length=max_length)

    def hex(self, name: _Str, *, length: _Int) -> _Bytes:
        return hex_bytes(self._get(name, False), field=f"{self._what}.{name}", length=length)

    def list(self, name: _Str, *, max_items: _Int) -> list[Any]:
        value = self._get(name, False)
        if not isinstance(value, list):
            raise RemoteProtocolError(f"{self._what}.{name} must be a list")
        if len(value) > max_items:
            raise TooLargeError(f"{self._what}.{name} has {len(value)} items; at most {max_items} allowed")
        return value

    def raw(self, name: _Str, *, optional: _Bool = False) -> Any:
        return self._get(name, optional)

    def done(self) -> None:
        extra = sorted(set(self._obj) - self._seen)
        if extra:
            raise RemoteProtocolError(f"{self._what} has unknown fields: {', '.join(extra[:5])}")


# --- envelopes ----------------------------------------------------------------------------------------------


def _envelope_bytes(kind: str, body: Mapping[str, JSON]) -> bytes:
    return _ENVELOPE_TAG + kind.encode("ascii") + b"\x00" + canonical_json(dict(body))


@dataclass(frozen=True)
class Envelope:
    """A signed message that a third party may carry on. ``signer`` is the signer's public key."""

    kind: str
    signer: PublicKey
    body: dict[str, JSON]
    signature: bytes

    @classmethod
    def seal(cls, kind: str, body: Mapping[str, JSON], key: SigningKey) -> Envelope:
        if _KIND_RE.fullmatch(kind) is None:
            raise ValueError(f"bad envelope kind {kind!r}")
        return cls(kind, key.public, dict(body), key.sign(_envelope_bytes(kind, body)))

    def to_json(self) -> dict[str, JSON]:
        return {"v": WIRE_VERSION, "kind": self.kind, "signer": self.signer.to_text(), "body": self.body,
                "sig": b64encode(self.signature)}

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @classmethod
    def from_json(cls, obj: object, *, kind: str) -> Envelope:
        """Parse and verify an envelope that must be of ``kind``; raises AuthError on a bad signature."""
        f = Fields(obj, f"{kind} envelope")
        version = f.int("v", lo=0, hi=2**16)
        if version != WIRE_VERSION:
            raise RemoteProtocolError(f"unsupported wire version {version}; this node speaks {WIRE_VERSION}")
        got_kind = f.str("kind", max_len=32)
        if got_kind != kind:
            raise RemoteProtocolError(f"expected a {kind} envelope, got {got_kind!r}")
        signer = PublicKey.from_text(f.raw("signer"))
        body = f.raw("body")
        if not isinstance(body, dict):
            raise RemoteProtocolError(f"{kind} envelope body must be a JSON object")
        signature = f.bytes("sig", length=64)
        f.done()
        signer.verify(signature, _envelope_bytes(kind, body))
        return cls(kind, signer, body, signature)

    @classmethod
    def from_bytes(cls, data: bytes, *, kind: str, max_bytes: int = MAX_MESSAGE_BYTES) -> Envelope:
        return cls.from_json(decode_json(data, max_bytes=max_bytes), kind=kind)

    def to_header(self) -> str:
        """The envelope as one HTTP header value (base64url of its canonical bytes)."""
        return b64encode(self.to_bytes())

    @classmethod
    def from_header(cls, value: str, *, kind: str) -> Envelope:
        return cls.from_bytes(b64decode(value, field=f"{kind} header", max_length=16384), kind=kind)


# --- signed requests ----------------------------------------------------------------------------------------


def origin_of(url: str) -> str:
    """The audience for a peer known only by its URL: ``scheme://host:port``, lowercase, port always given.

    Two spellings of one URL (``HTTP://Node:80/x``, ``http://node/``) give one origin, so caller and receiver
    agree on the bytes they sign and check.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"cannot sign a request for {url[:100]!r}: expected an http(s) URL")
    host = parts.hostname.lower()
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as exc:
        raise ValueError(f"cannot sign a request for {url[:100]!r}: bad port") from exc
    origin = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
    if _ORIGIN_RE.fullmatch(origin) is None:
        raise ValueError(f"cannot sign a request for {url[:100]!r}: unusual host name")
    return origin


def is_audience(text: str) -> bool:
    """A node id (64 lowercase hex) or an origin as :func:`origin_of` writes it."""
    return len(text) <= MAX_AUDIENCE_CHARS and (_NODE_AUDIENCE_RE.fullmatch(text) is not None
                                                 or _ORIGIN_RE.fullmatch(text) is not None)


def request_signing_bytes(method: str, audience: str, target: str, timestamp: int, nonce: str, body: bytes
                          ) -> bytes:
    return (_REQUEST_TAG + f"{method.upper()}\n{audience}\n{target}\n{timestamp}\n{nonce}\n".encode()
            + hashlib.sha256(body).hexdigest().encode())


def sign_request(key: SigningKey, method: str, audience: str, target: str, body: bytes, now: float
                 ) -> dict[str, str]:
    """Headers that authenticate one request to ``audience`` (the recipient's node id, or ``origin_of`` its URL;
    ``target`` = path plus query string, as sent)."""
    if not is_audience(audience):
        raise ValueError(f"audience must be a node id or an origin (scheme://host:port), not {audience[:100]!r}")
    timestamp = int(now)
    nonce = os.urandom(16).hex()
    signature = key.sign(request_signing_bytes(method, audience, target, timestamp, nonce, body))
    return {HEADER_KEY: key.public.to_text(), HEADER_AUDIENCE: audience, HEADER_TIME: str(timestamp),
            HEADER_NONCE: nonce, HEADER_SIGNATURE: b64encode(signature)}


@dataclass(frozen=True)
class SignedRequest:
    signer: PublicKey
    timestamp: int
    nonce: str

    @property
    def signer_id(self) -> str:
        return self.signer.id


def verify_request(headers: Mapping[str, str], method: str, target: str, body: bytes, now: float,
                   audiences: Collection[str]) -> SignedRequest:
    """Check a request's signature, that it is addressed to one of ``audiences`` (this receiver's node id and
    origins) and its freshness (not its nonce's novelty: see ReplayGuard)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    missing = [h for h in (HEADER_KEY, HEADER_AUDIENCE, HEADER_TIME, HEADER_NONCE, HEADER_SIGNATURE)
               if h not in lowered]
    if missing:
        raise AuthError(f"request is not signed: missing header {missing[0]}")
    signer = PublicKey.from_text(lowered[HEADER_KEY])
    audience, time_text, nonce = lowered[HEADER_AUDIENCE], lowered[HEADER_TIME], lowered[HEADER_NONCE]
    if not is_audience(audience):
        raise AuthError(f"{HEADER_AUDIENCE} must be the recipient's node id or origin (scheme://host:port)")
    if not re.fullmatch(r"[0-9]{1,12}", time_text):
        raise AuthError(f"{HEADER_TIME} must be a Unix time in whole seconds")
    if _NONCE_RE.fullmatch(nonce) is None:
        raise AuthError(f"{HEADER_NONCE} must be 32 lowercase hex characters")
    timestamp = int(time_text)
    if abs(timestamp - now) > MAX_CLOCK_SKEW:
        raise AuthError(f"request time is {int(timestamp - now)} s off this node's clock (limit "
                        f"{MAX_CLOCK_SKEW} s): check the sender's clock")
    signature = b64decode(lowered[HEADER_SIGNATURE], field=HEADER_SIGNATURE, length=64)
    signer.verify(signature, request_signing_bytes(method, audience, target, timestamp, nonce, body))
    if audience not in audiences:
        names = " or ".join(sorted(a if len(a) != 64 else a[:16] + "…" for a in audiences)) or "nothing"
        shown = audience if len(audience) != 64 else audience[:16] + "…"
        raise AuthError(f"request is addressed to {shown}, not to this peer ({names}): sign each request for "
                        "the peer it is sent to (a peer behind a proxy or alias needs its public URL set)")
    return SignedRequest(signer, timestamp, nonce)


class ReplayGuard:
    """Remembers (signer, nonce) pairs until their timestamp leaves the skew window; bounded in memory.

    A request whose nonce was seen is refused. When full, the guard refuses new requests rather than forgetting
    nonces that could still be replayed (fail closed). So that no one signer can fill it and lock everyone else
    out, each signer may hold at most ``per_signer`` entries (429 for that signer alone beyond). Receivers record
    a request only once its signer is known to be allowed to make it, so strangers with throwaway keys do not
    fill it either.
    """

    def __init__(self, capacity: int = 200_000, window: int = MAX_CLOCK_SKEW, per_signer: int | None = None,
                 on_record: Callable[[str, str, float], None] | None = None) -> None:
        self.on_record = on_record  # told (signer, nonce, expiry) of each nonce recorded: a journal keeps them
        self._seen: dict[tuple[str, str], float] = {}
        self._expiries: list[tuple[float, str, str]] = []  # heap: timestamps, hence expiries, arrive out of order
        self._per_signer_count: dict[str, int] = {}
        self._capacity = capacity
        self._window = window
        self._per_signer = max(1, capacity // 4) if per_signer is None else per_signer

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, request: SignedRequest, now: float) -> None:
        """Record ``request``'s nonce, raising ReplayError if it was used before."""
        self._expire(now)
        signer = request.signer_id
        key = (signer, request.nonce)
        if key in self._seen:
            raise ReplayError("this request was already received (replayed nonce)")
        if self._per_signer_count.get(signer, 0) >= self._per_signer:
            raise ReplayError(f"this signer sent more than {self._per_signer} requests in the last "
                              f"{self._window} s; retry shortly", status=429)
        if len(self._seen) >= self._capacity:
            raise ReplayError("too many recent requests to check for replays; retry shortly", status=429)
        expiry = request.timestamp + self._window
        self._remember(signer, request.nonce, expiry)
        if self.on_record is not None:
            self.on_record(signer, request.nonce, expiry)

    def restore(self, signer: str, nonce: str, expiry: float, now: float) -> bool:
        """Remember a nonce recorded before a restart (read back from a journal); False if it has expired, is
        known already or finds the guard full."""
        self._expire(now)
        if expiry < now or (signer, nonce) in self._seen or len(self._seen) >= self._capacity:
            return False
        self._remember(signer, nonce, expiry)
        return True

    def entries(self) -> list[tuple[str, str, float]]:
        """(signer, nonce, expiry) of every nonce remembered: what a compacted journal holds."""
        return [(signer, nonce, expiry) for (signer, nonce), expiry in self._seen.items()]

    def _remember(self, signer: str, nonce: str, expiry: float) -> None:
        self._seen[(signer, nonce)] = expiry
        heapq.heappush(self._expiries, (expiry, signer, nonce))
        self._per_signer_count[signer] = self._per_signer_count.get(signer, 0) + 1

    def _expire(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] < now:
            _, signer, nonce = heapq.heappop(self._expiries)
            del self._seen[(signer, nonce)]
            left = self._per_signer_count[signer] - 1
            if left:
                self._per_signer_count[signer] = left
            else:
                del self._per_signer_count[signer]

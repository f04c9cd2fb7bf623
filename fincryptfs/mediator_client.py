"""Typed calls from the client to its mediator (the account side of docs/protocol.md).

Every call is signed with the account key and goes through :mod:`fincryptfs.rpc`, so a failure is always a
:class:`~fincryptfs.rpc.PeerError`. Answers are parsed with the strict codecs of
:mod:`fincryptfs.core.messages`; what the mediator says about where shares live is *advice*: the data path
checks every byte against the Merkle roots the client recorded itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from .core.errors import RemoteProtocolError
from .core.identity import SigningKey
from .core.ids import NodeId, ShareId, parse_node_id, parse_object_id, parse_share_id
from .core.layout import ObjectLayout
from .core.merkle import HASH_BYTES
from .core.messages import (
    MAX_URL_LEN,
    CommitRequest,
    ManifestPointer,
    Placement,
    PlaceRequest,
    check_url,
    layout_from_json,
)
from .core.wire import Envelope, Fields
from .rpc import PeerError, call, call_json

# Every answer of a mediator is small JSON (the largest, the node list, is ~250 bytes a node). A mediator that
# sent without end used to be buffered whole (the mount's capacity refresh asks for the node list every
# minute), and one that sent a byte now and then was waited for for ever (httpx's timeouts are per read).
MAX_ANSWER = 64 << 20
ANSWER_DEADLINE = 60.0  # seconds for one whole call, answer included


def limits() -> dict[str, Any]:
    """``rpc.call`` keywords that bound a call to a mediator in time and size (read when called: tests shorten
    them)."""
    return {"max_answer": MAX_ANSWER, "deadline": ANSWER_DEADLINE}


@dataclass(frozen=True)
class ShareLocation:
    """Where the mediator says one share of an object lives, and what it believes of it."""

    index: int
    share_id: ShareId
    node_id: NodeId
    node_url: str
    merkle_root: bytes | None  # None for a share placed but not yet committed, whose root is still unknown
    share_size: int
    state: str


@dataclass(frozen=True)
class ObjectInfo:
    """The mediator's answer to ``GET /v1/objects/{id}``."""

    object_id: str
    layout: ObjectLayout
    shares: tuple[ShareLocation, ...]
    health: dict[str, Any]

    @classmethod
    def from_json(cls, obj: object) -> ObjectInfo:
        f = Fields(obj, "object info")
        object_id = parse_object_id(f.raw("object_id"))
        layout = layout_from_json(f.raw("layout"))
        shares = []
        for item in f.list("shares", max_items=1024):
            s = Fields(item, "share location")
            shares.append(ShareLocation(
                s.int("index", hi=255), parse_share_id(s.raw("share_id")), parse_node_id(s.raw("node_id")),
                # the check every node URL gets where it enters (a weaker pattern let through URLs httpx refuses,
                # whose InvalidURL then escaped the read path)
                check_url(s.str("node_url", max_len=MAX_URL_LEN), "node_url").rstrip("/"),
                s.bytes("merkle_root", length=HASH_BYTES, optional=True), s.int("share_size", hi=2**50),
                s.str("state", max_len=32)))
        health = f.raw("health")
        if not isinstance(health, dict):
            raise RemoteProtocolError("object info: health must be an object")
        return cls(object_id, layout, tuple(shares), health)


class MediatorClient:
    """One account's signed calls to one mediator."""

    def __init__(self, *, url: str, account_key: SigningKey, http: httpx.AsyncClient) -> None:
        self.url = url.rstrip("/")
        self.account_key = account_key
        self.http = http

    async def _json(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        return await call_json(self.http, method, self.url + path, key=self.account_key, json=body, **limits())

    async def nodes(self) -> list[dict[str, Any]]:
        """The mediator's public node list (``GET /v1/nodes``)."""
        answer = await call_json(self.http, "GET", self.url + "/v1/nodes", **limits())
        nodes = answer.get("nodes")
        if not isinstance(nodes, list):
            raise PeerError(f"mediator {self.url} sent a node list without 'nodes'")
        return nodes

    async def place(self, request: PlaceRequest) -> list[Placement]:
        """Nodes and grants for the shares in ``request``; PeerError 503 if the mediator has too few nodes."""
        answer = await self._json("POST", "/v1/objects/place", request.to_json())
        try:
            items = answer["placements"]
            if not isinstance(items, list):
                raise TypeError("placements is not a list")
            return [Placement.from_json(p) for p in items]
        except (KeyError, TypeError, RemoteProtocolError) as exc:
            raise PeerError(f"mediator {self.url} sent a malformed placement: {exc}") from exc

    async def commit(self, request: CommitRequest) -> None:
        answer = await self._json("POST", "/v1/objects/commit", request.to_json())
        if answer.get("committed") is not True:
            raise PeerError(f"mediator {self.url} did not confirm the commit of object {request.object_id[:16]}…")

    async def object_info(self, object_id: str) -> ObjectInfo:
        answer = await self._json("GET", f"/v1/objects/{parse_object_id(object_id)}")
        try:
            return ObjectInfo.from_json(answer)
        except RemoteProtocolError as exc:
            raise PeerError(f"mediator {self.url} sent malformed object info: {exc}") from exc

    async def delete_object(self, object_id: str) -> None:
        await call(self.http, "DELETE", f"{self.url}/v1/objects/{parse_object_id(object_id)}",
                   key=self.account_key, **limits())

    async def report(self, object_id: str, share_id: str, node_id: str, problem: str) -> None:
        """Tell the mediator a node served a share that failed verification (it schedules a check)."""
        await call(self.http, "POST", f"{self.url}/v1/objects/{parse_object_id(object_id)}/report",
                   key=self.account_key,
                   json={"share_id": share_id, "node_id": node_id, "problem": problem[:200]}, **limits())

    async def get_pointer(self) -> Envelope | None:
        """The account's manifest pointer envelope, or None if it has none yet (its signature unchecked)."""
        try:
            answer = await self._json("GET", "/v1/pointer")
        except PeerError as exc:
            if exc.status == 404:
                return None
            raise
        try:
            return Envelope.from_json(answer.get("pointer"), kind=ManifestPointer.KIND)
        except RemoteProtocolError as exc:
            raise PeerError(f"mediator {self.url} sent a malformed pointer: {exc}") from exc

    async def put_pointer(self, pointer: Envelope) -> None:
        """Store a new pointer; PeerError with status 409 if its version is not the current one + 1."""
        await self._json("PUT", "/v1/pointer", {"pointer": pointer.to_json()})

    async def account(self) -> dict[str, Any]:
        return await self._json("GET", "/v1/account")

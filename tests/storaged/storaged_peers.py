"""Storage node test helpers: a real node on 127.0.0.1 and a tiny real mediator peer it announces to.

The mediator peer is a genuine HTTP endpoint (fincryptfs.asgi) holding a mediator key: it answers
/v1/nodes/announce like mediatord does, and the tests use its key to sign grants, challenges and releases.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import trio

from fincryptfs.asgi import App, Request, Response, Router, json_response, serve_app
from fincryptfs.core.errors import ForbiddenError
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.ids import AccountId, NodeId, ShareId, new_share_id
from fincryptfs.core.merkle import MerkleTree
from fincryptfs.core.messages import Challenge, NodeAnnouncement, UploadGrant
from fincryptfs.core.settings import ShareDir, StorageSettings
from fincryptfs.core.wire import Envelope, ReplayGuard, decode_object, origin_of
from storaged.daemon import LOCK_FILE, open_service, run_service
from storaged.service import StorageService


class MediatorPeer:
    """A minimal mediator: accepts announcements and signs grants/challenges with its own key."""

    def __init__(self) -> None:
        self.key = SigningKey.generate()
        self.guard = ReplayGuard()
        self.announcements: list[NodeAnnouncement] = []
        self.url = ""

    @property
    def id(self) -> str:
        return self.key.id

    def app(self) -> App:
        router = Router()

        async def announce(request: Request) -> Response:
            body = await request.body(1 << 20)
            signed = request.verify_signature(body, self.guard, {self.key.id, origin_of(self.url)})
            ann = NodeAnnouncement.from_json(decode_object(body))
            if ann.node_id != signed.signer_id:
                raise ForbiddenError("announcement must be signed by the node it names")
            self.announcements.append(ann)
            return json_response({"accepted": True, "mediator_id": self.key.id,
                                  "public_key": self.key.public.to_text(), "next_announce_in": 300})

        router.add("POST", "/v1/nodes/announce", announce)
        return App(router)

    def grant(self, node_id: str, data: bytes, *, share_id: str | None = None, size: int | None = None,
              root: bytes | None = None, expires_in: int = 600, account_id: str | None = None,
              key: SigningKey | None = None) -> UploadGrant:
        return UploadGrant(NodeId(self.key.id if key is None else key.id), NodeId(node_id),
                           AccountId(account_id or ACCOUNT.id), ShareId(share_id or new_share_id()),
                           len(data) if size is None else size,
                           MerkleTree.from_data(data).root if root is None else root,
                           int(time.time()) + expires_in, os.urandom(16).hex())

    def seal(self, grant: UploadGrant, key: SigningKey | None = None) -> str:
        return grant.seal(key or self.key).to_header()

    def challenge(self, node_id: str, share_ids: list[str], leaves: int = 1) -> Challenge:
        return Challenge(NodeId(self.key.id), NodeId(node_id), int(time.time()), os.urandom(32), leaves,
                         tuple(ShareId(s) for s in share_ids))


ACCOUNT = SigningKey.generate()


@dataclass
class RunningNode:
    service: StorageService
    url: str
    settings: StorageSettings

    @property
    def node_id(self) -> str:
        return self.service.node_id


def node_settings(tmp_path: Path, mediators: tuple[str, ...], **overrides: object) -> StorageSettings:
    base = StorageSettings(
        listen=("127.0.0.1", 0), public_url=None, data_dir=tmp_path / "node",
        share_dirs=(ShareDir(tmp_path / "shares-a", 64 << 20), ShareDir(tmp_path / "shares-b", 64 << 20)),
        reserve_bytes=0, price=1000, mediators=mediators, payout_address=None, operator="test",
        announce_interval=60.0, scrub_interval=3600.0, max_concurrent_uploads=16)
    return replace(base, **overrides)  # type: ignore[arg-type]


async def start_mediator(nursery: trio.Nursery) -> MediatorPeer:
    peer = MediatorPeer()
    peer.url = await nursery.start(serve_app, peer.app(), "127.0.0.1", 0)
    return peer


@asynccontextmanager
async def running_node(settings: StorageSettings) -> AsyncIterator[RunningNode]:
    async with open_service(settings) as service, trio.open_nursery() as nursery:
        url = await nursery.start(run_service, service)
        if settings.mediators:
            with trio.fail_after(10):
                await service.announced.wait()
        yield RunningNode(service, url, settings)
        nursery.cancel_scope.cancel()


async def put_share(client: httpx.AsyncClient, node: RunningNode, grant_header: str | None, data: bytes,
                    share_id: str, headers: dict[str, str] | None = None) -> httpx.Response:
    all_headers = dict(headers or {})
    if grant_header is not None:
        all_headers["fincrypt-grant"] = grant_header
    return await client.put(f"{node.url}/v1/shares/{share_id}", content=data, headers=all_headers)


async def store(client: httpx.AsyncClient, node: RunningNode, mediator: MediatorPeer, data: bytes
                ) -> tuple[UploadGrant, Envelope]:
    """Upload ``data`` with a fresh grant and return the grant and the node's receipt envelope."""
    grant = mediator.grant(node.node_id, data)
    response = await put_share(client, node, mediator.seal(grant), data, grant.share_id)
    assert response.status_code == 201, response.text
    return grant, Envelope.from_json(response.json()["receipt"], kind="receipt")


async def raw_request(url: str, head: bytes, body: bytes = b"", read_limit: int = 1 << 16) -> int:
    """Send bytes exactly as given (no client-side path normalisation) and return the status code."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    assert port is not None
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(head + body)
        received = b""
        with trio.move_on_after(10):
            while b"\r\n" not in received and len(received) < read_limit:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                received += chunk
    assert received.startswith(b"HTTP/1.1 "), received[:100]
    return int(received[9:12])


def listed_files(node: RunningNode) -> set[str]:
    """Every file in the node's share folders but its lock (to check that refused uploads leave nothing behind)."""
    found = set()
    for share_dir in node.settings.share_dirs:
        found |= {str(p.relative_to(share_dir.path)) for p in share_dir.path.rglob("*")
                  if p.is_file() and p.name != LOCK_FILE}
    return found

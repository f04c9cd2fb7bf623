"""Mediator test helpers: a real mediatord (its service object exposed) and real storaged nodes on 127.0.0.1.

The mediator runs without its periodic loops unless asked, so a test drives audits, repairs and releases pass
by pass (``upkeep.audit_round(...)``) instead of waiting on timers; one test runs the real loops with a short
period. Clients are plain signed httpx calls, as the client engineers will make them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from fincryptfs import rpc
from fincryptfs.core.erasure import encode_segment
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.ids import new_object_id, new_share_id
from fincryptfs.core.layout import ObjectLayout
from fincryptfs.core.merkle import MerkleTree
from fincryptfs.core.messages import (
    CommitRequest,
    CommittedShare,
    Placement,
    PlaceRequest,
    ShareSpec,
    layout_to_json,
)
from fincryptfs.core.settings import MediatorSettings, StorageSettings
from fincryptfs.core.wire import Envelope
from mediatord.daemon import open_service, run_service
from mediatord.service import MediatorService


@dataclass
class Net:
    """A mediator, its nodes, one HTTP client and one account key: what the mediator tests start from."""

    mediator: Mediator
    nodes: list[Node]
    client: httpx.AsyncClient
    account: SigningKey

    @property
    def url(self) -> str:
        return self.mediator.url


@dataclass
class Mediator:
    service: MediatorService
    url: str
    scope: trio.CancelScope


async def start_mediator(nursery: trio.Nursery, data_dir: Path, *, loops: bool = False, **env: str) -> Mediator:
    values = {"MEDIATORD_LISTEN": "127.0.0.1:0", "MEDIATORD_DATA_DIR": str(data_dir),
              "MEDIATORD_NODE_OFFLINE_AFTER": "3600", **env}
    service = open_service(MediatorSettings.from_env(values, home=data_dir))
    scope = trio.CancelScope()

    async def run(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                await run_service(service, upkeep_loops=loops, task_status=task_status)
        finally:
            service.db.close()

    url = await nursery.start(run)
    return Mediator(service, url.rstrip("/"), scope)


@dataclass
class Node:
    url: str
    node_id: str
    settings: StorageSettings
    share_dir: Path
    scope: trio.CancelScope
    stopped: trio.Event = field(default_factory=trio.Event)

    def share_files(self) -> list[Path]:
        return [p for p in self.share_dir.rglob("*") if p.is_file() and len(p.name) >= 64]


async def start_node(nursery: trio.Nursery, root: Path, mediator_url: str, index: int, *, port: int = 0,
                     **env: str) -> Node:
    from storaged.daemon import serve

    node_root = root / f"node{index}"
    values = {"STORAGED_LISTEN": f"127.0.0.1:{port}", "STORAGED_DATA_DIR": str(node_root),
              "STORAGED_SHARE_DIRS": f"{node_root / 'shares'}:1G", "STORAGED_RESERVE_BYTES": "0",
              "STORAGED_MEDIATORS": mediator_url, "STORAGED_ANNOUNCE_INTERVAL": "0.2",
              "STORAGED_OPERATOR": f"op{index}", "STORAGED_PRICE": str(100 + index), **env}
    settings = StorageSettings.from_env(values, home=node_root)
    scope, stopped = trio.CancelScope(), trio.Event()

    async def run(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                await serve(settings, task_status=task_status)
        finally:
            stopped.set()

    url = (await nursery.start(run)).rstrip("/")
    async with httpx.AsyncClient(trust_env=False) as client:
        node_id = (await client.get(f"{url}/health")).json()["node_id"]
    return Node(url, node_id, settings, node_root / "shares", scope, stopped)


async def stop_node(node: Node) -> None:
    node.scope.cancel()
    await node.stopped.wait()


async def wait_online(mediator: Mediator, count: int, timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while len(mediator.service.online_node_ids()) < count:
            await trio.sleep(0.05)


@dataclass(frozen=True)
class SampleObject:
    object_id: str
    layout: ObjectLayout
    shares: tuple[bytes, ...]
    specs: tuple[ShareSpec, ...]


def make_object(k: int = 2, n: int = 4, padded_size: int = 3 * 8192 + 100, segment_size: int = 8192) -> SampleObject:
    """Random 'sealed' segments erasure-coded exactly as the client does (the mediator never sees plaintext)."""
    layout = ObjectLayout(padded_size, segment_size, k, n)
    parts: list[bytearray] = [bytearray() for _ in range(n)]
    for seg in range(layout.segment_count):
        for i, block in enumerate(encode_segment(layout.params, os.urandom(layout.sealed_length(seg)))):
            parts[i] += block
    shares = tuple(bytes(p) for p in parts)
    specs = tuple(ShareSpec(i, new_share_id(), len(s), MerkleTree.from_data(s).root) for i, s in enumerate(shares))
    return SampleObject(new_object_id(), layout, shares, specs)


async def place(client: httpx.AsyncClient, mediator_url: str, key: SigningKey, obj: SampleObject,
                indices: list[int] | None = None, exclude: tuple[str, ...] = ()) -> list[Placement]:
    specs = obj.specs if indices is None else tuple(obj.specs[i] for i in indices)
    req = PlaceRequest(obj.object_id, obj.layout, specs, exclude)  # type: ignore[arg-type]
    answer = await rpc.call_json(client, "POST", f"{mediator_url}/v1/objects/place", key=key, json=req.to_json())
    return [Placement.from_json(p) for p in answer["placements"]]


async def put_share(client: httpx.AsyncClient, placement: Placement, obj: SampleObject) -> Envelope:
    spec = obj.specs[placement.index]
    answer = await rpc.call_json(client, "PUT", f"{placement.node_url}/v1/shares/{spec.share_id}",
                                 content=obj.shares[placement.index],
                                 headers={"fincrypt-grant": placement.grant.to_header()})
    return Envelope.from_json(answer["receipt"], kind="receipt")


def root_of(spec: ShareSpec) -> bytes:
    assert spec.merkle_root is not None, "a sample object's specs name their roots"
    return spec.merkle_root


def commit_body(obj: SampleObject, stored: Mapping[int, tuple[str, Envelope]], *, roots: bool = False
                ) -> dict[str, Any]:
    """A commit of the ``stored`` shares; ``roots``: naming the roots of all n (as a streaming client does)."""
    shares = tuple(CommittedShare(i, obj.specs[i].share_id, node_id, obj.specs[i].share_size,  # type: ignore[arg-type]
                                  root_of(obj.specs[i]), receipt)
                   for i, (node_id, receipt) in sorted(stored.items()))
    all_roots = tuple(root_of(spec) for spec in sorted(obj.specs, key=lambda s: s.index)) if roots else None
    return CommitRequest(obj.object_id, obj.layout, shares, all_roots).to_json()  # type: ignore[arg-type]


async def upload(client: httpx.AsyncClient, mediator_url: str, key: SigningKey, obj: SampleObject
                 ) -> dict[int, tuple[str, Envelope]]:
    """The client's whole write path: place, PUT each share with its grant, commit the receipts."""
    stored: dict[int, tuple[str, Envelope]] = {}
    for placement in await place(client, mediator_url, key, obj):
        stored[placement.index] = (placement.node_id, await put_share(client, placement, obj))
    await rpc.call_json(client, "POST", f"{mediator_url}/v1/objects/commit", key=key, json=commit_body(obj, stored))
    return stored


async def object_status(client: httpx.AsyncClient, mediator_url: str, key: SigningKey, object_id: str
                        ) -> dict[str, Any]:
    return await rpc.call_json(client, "GET", f"{mediator_url}/v1/objects/{object_id}", key=key)


def layout_json(obj: SampleObject) -> dict[str, int]:
    return layout_to_json(obj.layout)


def share_data_file(node: Node, share_id: str) -> Path:
    return node.share_dir / share_id[:2] / f"{share_id}.data"

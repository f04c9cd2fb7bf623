"""Fixtures for the storage node tests (helpers live in storaged_peers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from storaged_peers import MediatorPeer, RunningNode, node_settings, running_node, start_mediator

from fincryptfs import rpc


@pytest.fixture
async def mediator(nursery: trio.Nursery) -> MediatorPeer:
    return await start_mediator(nursery)


@pytest.fixture
async def node(tmp_path: Path, mediator: MediatorPeer) -> AsyncIterator[RunningNode]:
    async with running_node(node_settings(tmp_path, (mediator.url,))) as running:
        yield running


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with rpc.new_client() as c:
        yield c

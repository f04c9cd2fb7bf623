"""Which mediators may place new shares: the configured ones and those found through the DHT, not every mediator
the node ever announced to. One dropped from the settings keeps its hold on the shares it placed."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio
from storaged_peers import ACCOUNT, MediatorPeer, node_settings, put_share, running_node, start_mediator, store

from fincryptfs import rpc
from fincryptfs.core.errors import ForbiddenError
from fincryptfs.core.messages import ProofResponse
from fincryptfs.core.wire import Envelope
from storaged.daemon import open_service


async def test_a_mediator_removed_from_the_settings_places_no_new_shares_but_keeps_its_old_ones(
        tmp_path: Path, mediator: MediatorPeer, client: httpx.AsyncClient) -> None:
    settings = node_settings(tmp_path, (mediator.url,))
    data = os.urandom(20_000)
    async with running_node(settings) as node:
        old, _ = await store(client, node, mediator, data)
    async with running_node(replace(settings, mediators=())) as node:  # the operator dropped this mediator
        fresh = os.urandom(5000)
        grant = mediator.grant(node.node_id, fresh)
        refused = await put_share(client, node, mediator.seal(grant), fresh, grant.share_id)
        assert refused.status_code == 403, refused.text
        assert "no longer one of this node's mediators" in refused.json()["error"]
        assert node.service.db.get_share(grant.share_id) is None
        # ...but it still audits, reads and releases what it placed here (so it can move it and pay for it)
        challenge = mediator.challenge(node.node_id, [old.share_id])
        answer = await rpc.call(client, "POST", f"{node.url}/v1/challenges", key=mediator.key,
                                json=challenge.to_json())
        proofs = ProofResponse.decode(answer.content, node.service.key.public, max_bytes=1 << 20)
        assert proofs.missing == () and len(proofs.proofs) == 1
        url = f"{node.url}/v1/shares/{old.share_id}"
        assert (await rpc.call(client, "GET", url, key=mediator.key)).content == data
        assert (await rpc.call(client, "GET", url, key=ACCOUNT)).content == data
        assert (await rpc.call(client, "DELETE", url, key=mediator.key)).status_code == 204
        assert node.service.db.get_share(old.share_id) is None
    async with running_node(settings) as node:  # configured again: it places shares again
        await store(client, node, mediator, os.urandom(5000))


async def test_a_configured_mediator_places_shares_before_the_node_has_announced_to_it(
        tmp_path: Path, mediator: MediatorPeer) -> None:
    settings = node_settings(tmp_path, (mediator.url,))
    async with running_node(settings):
        pass
    async with open_service(settings) as service:  # nothing announced in this run yet
        grant = mediator.grant(service.node_id, b"x")
        assert service.check_grant(grant.share_id, mediator.seal(grant)) == grant
    async with open_service(replace(settings, mediators=())) as service:
        grant = mediator.grant(service.node_id, b"x")
        with pytest.raises(ForbiddenError, match="no longer one of this node's mediators"):
            service.check_grant(grant.share_id, mediator.seal(grant))


async def test_a_new_identity_at_a_mediators_url_replaces_the_old_one_for_new_shares(
        tmp_path: Path, mediator: MediatorPeer, client: httpx.AsyncClient, nursery: trio.Nursery) -> None:
    """The mediator at a configured URL was replaced (new key): the old identity places nothing more here."""
    successor = await start_mediator(nursery)
    settings = node_settings(tmp_path, (mediator.url,))
    async with running_node(settings) as node:
        node.service.trust_mediator(successor.id, successor.key.public, mediator.url)  # answered at that URL
        data = os.urandom(3000)
        grant = mediator.grant(node.node_id, data)
        assert (await put_share(client, node, mediator.seal(grant), data, grant.share_id)).status_code == 403
        grant = successor.grant(node.node_id, data)
        answer = await put_share(client, node, successor.seal(grant), data, grant.share_id)
        assert answer.status_code == 201, answer.text
        Envelope.from_json(answer.json()["receipt"], kind="receipt")
        assert node.service.is_current(successor.id) and not node.service.is_current(mediator.id)

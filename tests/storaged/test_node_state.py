"""The node's own state lost or damaged: its database deleted or unreadable, its identity file deleted or
replaced. The node must refuse to start with a message saying what to do, and never delete or orphan shares."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from storaged_peers import ACCOUNT, MediatorPeer, node_settings, running_node, store

from fincryptfs import rpc
from fincryptfs.core.errors import ConfigError
from fincryptfs.core.identity import SigningKey, encode_identity_file
from storaged.daemon import DATABASE_FILE, IDENTITY_FILE


def share_files(tmp_path: Path) -> set[Path]:
    return set(tmp_path.glob("shares-*/*/*.data"))


async def test_a_deleted_database_stops_the_start_instead_of_deleting_every_share(
        tmp_path: Path, mediator: MediatorPeer, client: httpx.AsyncClient) -> None:
    """A new database knows no shares, so the start-up cleanup took every share file for a leftover of a crash
    and deleted them all, silently."""
    settings = node_settings(tmp_path, (mediator.url,))
    data = os.urandom(30_000)
    async with running_node(settings) as node:
        grant, _ = await store(client, node, mediator, data)
    files = share_files(tmp_path)
    database = settings.data_dir / DATABASE_FILE
    shutil.move(database, tmp_path / "saved")
    with pytest.raises(ConfigError, match="is new and lists no shares, but share folder .* holds 1 share files.*"
                                          "Put the node's database back"):
        async with running_node(settings):
            pass
    assert share_files(tmp_path) == files
    shutil.move(tmp_path / "saved", database)  # the operator restores it
    async with running_node(settings) as node:
        got = await rpc.call(client, "GET", f"{node.url}/v1/shares/{grant.share_id}", key=ACCOUNT)
        assert got.content == data


async def test_a_deleted_or_replaced_identity_stops_the_start_instead_of_orphaning_the_shares(
        tmp_path: Path, mediator: MediatorPeer, client: httpx.AsyncClient) -> None:
    """A missing node.key used to be replaced by a new one: a new node id, whose mediators could neither audit
    nor release the shares the old one stored, so they stayed on disk, unreported, for ever."""
    settings = node_settings(tmp_path, (mediator.url,))
    async with running_node(settings) as node:
        await store(client, node, mediator, os.urandom(30_000))
        node_id = node.node_id
    key_file = settings.data_dir / IDENTITY_FILE
    shutil.move(key_file, tmp_path / "saved.key")
    with pytest.raises(ConfigError, match=f"identity file {key_file} is missing, but .* belongs to node {node_id} "
                                          r"\(1 shares\): restore"):
        async with running_node(settings):
            pass
    assert not key_file.exists()
    key_file.write_bytes(encode_identity_file(SigningKey.generate()))
    with pytest.raises(ConfigError, match=f"belongs to node {node_id}"):
        async with running_node(settings):
            pass
    shutil.move(tmp_path / "saved.key", key_file)
    async with running_node(settings) as node:
        assert node.node_id == node_id and node.service.db.totals()[0] == 1


async def test_an_unreadable_database_is_a_configuration_error(tmp_path: Path, mediator: MediatorPeer,
                                                               client: httpx.AsyncClient) -> None:
    settings = node_settings(tmp_path, (mediator.url,))
    async with running_node(settings) as node:
        await store(client, node, mediator, os.urandom(30_000))
    files = share_files(tmp_path)
    (settings.data_dir / DATABASE_FILE).write_bytes(os.urandom(8192))
    with pytest.raises(ConfigError, match="database .* cannot be read .*restore it from a backup"):
        async with running_node(settings):
            pass
    assert share_files(tmp_path) == files


async def test_a_second_node_on_the_same_data_or_share_folder_is_refused(
        tmp_path: Path, mediator: MediatorPeer, client: httpx.AsyncClient) -> None:
    """A second node started on the same folders used to start: its cleanup deleted the first one's uploads in
    flight, and (with a data folder of its own) every share of the first one, as files without a row."""
    settings = node_settings(tmp_path, (mediator.url,))
    async with running_node(settings) as node:
        grant, _ = await store(client, node, mediator, os.urandom(30_000))
        files = share_files(tmp_path)
        with pytest.raises(ConfigError, match=f"another storaged is running with the data folder {settings.data_dir}"):
            async with running_node(settings):
                pass
        other = replace(settings, data_dir=tmp_path / "other-node")
        with pytest.raises(ConfigError, match=f"share folder {tmp_path / 'shares-a'} is in use by another storaged"):
            async with running_node(other):
                pass
        assert share_files(tmp_path) == files
        got = await rpc.call(client, "GET", f"{node.url}/v1/shares/{grant.share_id}", key=ACCOUNT)
        assert len(got.content) == 30_000
    async with running_node(settings):  # the locks went with the first node
        pass

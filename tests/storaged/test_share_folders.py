"""Share folders that go away and come back: a disk not mounted at start, files restored by the operator."""

from __future__ import annotations

import errno
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from storaged_peers import ACCOUNT, MediatorPeer, RunningNode, node_settings, running_node, store

from fincryptfs import rpc
from fincryptfs.core.errors import ConfigError
from fincryptfs.core.identity import SigningKey, encode_identity_file
from fincryptfs.core.ids import ShareId
from fincryptfs.core.settings import ShareDir
from storaged.daemon import DATABASE_FILE
from storaged.db import STATE_MISSING, STATE_OK
from storaged.store import ShareStore


async def test_a_folder_holding_shares_that_is_gone_or_empty_stops_the_start(
        tmp_path: Path, mediator: MediatorPeer, client: httpx.AsyncClient) -> None:
    """Recreating it would put new shares on the wrong disk and mark all of the real disk's shares missing."""
    disk = tmp_path / "disk"
    settings = replace(node_settings(tmp_path, (mediator.url,)),
                       share_dirs=(ShareDir(disk, 64 << 20), ShareDir(tmp_path / "other", 64 << 20)))
    data = os.urandom(30_000)
    async with running_node(replace(settings, share_dirs=settings.share_dirs[:1])) as node:
        grant, _ = await store(client, node, mediator, data)
    disk.rename(tmp_path / "unmounted")
    with pytest.raises(ConfigError, match=f"share folder {disk} holds 1 shares .* does not exist: mount its disk"):
        async with running_node(settings):
            pass
    assert not disk.exists() and not (tmp_path / "other").exists()
    disk.mkdir()  # the bare mount point, disk not mounted
    with pytest.raises(ConfigError, match="is empty: mount its disk"):
        async with running_node(settings):
            pass
    assert list(disk.iterdir()) == []
    disk.rmdir()
    (tmp_path / "unmounted").rename(disk)  # the disk is back; the new folder is created, the old one served
    async with running_node(settings) as node:
        got = await rpc.call(client, "GET", f"{node.url}/v1/shares/{grant.share_id}", key=ACCOUNT)
        assert got.content == data
        assert (tmp_path / "other" / ".tmp").is_dir()


async def test_shares_marked_missing_are_served_again_once_their_files_are_back(
        tmp_path: Path, mediator: MediatorPeer, client: httpx.AsyncClient) -> None:
    settings = node_settings(tmp_path, (mediator.url,))
    data = os.urandom(30_000)
    async with running_node(settings) as node:
        grant, _ = await store(client, node, mediator, data)
        record = node.service.db.get_share(grant.share_id)
        assert record is not None
        paths = node.service.store.paths(record.dir, grant.share_id)
        assert paths is not None
        shutil.move(paths.data, tmp_path / "saved")
    async with running_node(settings) as node:  # the file is gone at start: the share is flagged missing
        after = node.service.db.get_share(grant.share_id)
        assert after is not None and after.state == STATE_MISSING
    shutil.move(tmp_path / "saved", paths.data)
    async with running_node(settings) as node:
        after = node.service.db.get_share(grant.share_id)
        assert after is not None and after.state == STATE_OK
        got = await rpc.call(client, "GET", f"{node.url}/v1/shares/{grant.share_id}", key=ACCOUNT)
        assert got.content == data


async def test_the_daemon_refuses_to_start_with_a_clear_message(tmp_path: Path, mediator: MediatorPeer,
                                                                client: httpx.AsyncClient) -> None:
    disk = tmp_path / "disk"
    settings = replace(node_settings(tmp_path, (mediator.url,)), share_dirs=(ShareDir(disk, 1 << 30),))
    async with running_node(settings) as node:
        await store(client, node, mediator, os.urandom(1000))
    shutil.rmtree(disk)
    env_file = tmp_path / "node.env"
    env_file.write_text(f"STORAGED_DATA_DIR={settings.data_dir}\nSTORAGED_SHARE_DIRS={disk}:1G\n"
                        "STORAGED_LISTEN=127.0.0.1:0\nSTORAGED_RESERVE_BYTES=0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STORAGED_", "FINCRYPT_", "MEDIATORD_"))}
    done = subprocess.run([sys.executable, "-m", "storaged.cli", "--env-file", str(env_file)], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert f"configuration error: share folder {disk} holds 1 shares" in done.stderr
    assert "Traceback" not in done.stderr and not disk.exists()


@pytest.mark.parametrize("setting", ["STORAGED_SHARE_DIRS", "STORAGED_DATA_DIR"])
def test_a_file_where_a_folder_should_be_is_a_configuration_error(tmp_path: Path, setting: str) -> None:
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a folder\n")
    values = {"STORAGED_DATA_DIR": str(tmp_path / "data"), "STORAGED_SHARE_DIRS": f"{tmp_path / 'shares'}:1G",
              "STORAGED_LISTEN": "127.0.0.1:0",
              setting: f"{in_the_way}:1G" if setting == "STORAGED_SHARE_DIRS" else str(in_the_way)}
    env_file = tmp_path / "node.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STORAGED_", "FINCRYPT_", "MEDIATORD_"))}
    done = subprocess.run([sys.executable, "-m", "storaged.cli", "--env-file", str(env_file)], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert f"{in_the_way} cannot be created (a file is in the way): fix" in done.stderr and setting in done.stderr
    assert "Traceback" not in done.stderr and "Errno" not in done.stderr


@pytest.mark.parametrize("layout", ["inner second", "inner first", "deeper", "same through a symlink"])
def test_nested_or_repeated_share_folders_stop_the_start(tmp_path: Path, layout: str) -> None:
    """The start-up cleanup of /srv/a deletes what /srv/a/ab holds: such folders are refused, nothing created."""
    outer = tmp_path / "a"
    inner = {"inner second": outer / "ab", "inner first": outer / "ab", "deeper": outer / "x" / "y",
             "same through a symlink": tmp_path / "link"}[layout]
    if layout == "same through a symlink":
        inner.symlink_to(outer, target_is_directory=True)
    dirs = (ShareDir(inner, 1 << 30), ShareDir(outer, 1 << 30)) if layout == "inner first" else \
        (ShareDir(outer, 1 << 30), ShareDir(inner, 1 << 30))
    expected = "are the same folder" if layout == "same through a symlink" else \
        re.escape(f"share folder {inner} is inside share folder {outer}")
    with pytest.raises(ConfigError, match=expected):
        ShareStore(dirs, 0, {})
    assert not outer.exists()
    ShareStore((ShareDir(outer, 1 << 30), ShareDir(tmp_path / "ab", 1 << 30)), 0, {})  # side by side: fine


async def test_share_folders_are_recorded_by_absolute_path_whatever_the_working_directory(
        tmp_path: Path, mediator: MediatorPeer, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = replace(node_settings(tmp_path, (mediator.url,)), share_dirs=(ShareDir(Path("rel"), 64 << 20),))
    absolute = replace(relative, share_dirs=(ShareDir(tmp_path / "rel", 64 << 20),))
    data = os.urandom(30_000)
    async with running_node(relative) as node:
        grant, _ = await store(client, node, mediator, data)
        record = node.service.db.get_share(grant.share_id)
        assert record is not None and record.dir == str(tmp_path / "rel")
    # a row recorded with the relative name (as older versions did) is found by its absolute path...
    with sqlite3.connect(relative.data_dir / DATABASE_FILE) as conn:
        conn.execute("UPDATE shares SET dir = 'rel'")
    conn.close()
    async with running_node(absolute) as node:
        record = node.service.db.get_share(grant.share_id)
        assert record is not None and record.state == STATE_OK and record.dir == str(tmp_path / "rel")
    # ...and recorded under it from then on, so another working directory changes nothing
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    async with running_node(absolute) as node:
        record = node.service.db.get_share(grant.share_id)
        assert record is not None and record.state == STATE_OK
        got = await rpc.call(client, "GET", f"{node.url}/v1/shares/{grant.share_id}", key=ACCOUNT)
        assert got.content == data


def _where(node: RunningNode, share_id: str) -> Path:
    record = node.service.db.get_share(ShareId(share_id))
    assert record is not None
    return Path(record.dir)


async def test_a_share_folder_that_goes_away_while_the_node_runs_is_reported_and_used_again_once_back(
        tmp_path: Path, mediator: MediatorPeer, client: httpx.AsyncClient) -> None:
    """A disk unmounted under a running node: the node keeps serving the other folder, says what is wrong and
    what to do, and uses the folder (and serves its shares) again once it is back, without a restart. Its
    free-space figures used to raise: /health and every upload were a 500, and the next announcement ended the
    node."""
    async with running_node(node_settings(tmp_path, (mediator.url,))) as node:
        data = os.urandom(30_000)
        grant, _ = await store(client, node, mediator, data)
        gone, other = _where(node, grant.share_id), {d.path for d in node.settings.share_dirs} - {
            _where(node, grant.share_id)}
        gone.rename(tmp_path / "unmounted")
        health = (await client.get(f"{node.url}/health")).json()
        assert health["status"] == "degraded"
        assert health["problems"] == [f"share folder {gone}: it is not there (is its disk mounted?)"]
        assert (await node.service.announce_all(client)) == {mediator.url: mediator.id}
        second, _ = await store(client, node, mediator, os.urandom(30_000))
        assert {_where(node, second.share_id)} == other
        url = f"{node.url}/v1/shares/{grant.share_id}"
        response = await client.get(url, headers=rpc.signed_headers(ACCOUNT, "GET", url, b""))
        assert response.status_code == 404, response.text
        (tmp_path / "unmounted").rename(gone)
        await node.service.check_folders()
        assert (await client.get(f"{node.url}/health")).json()["status"] == "ok"
        got = await rpc.call(client, "GET", url, key=ACCOUNT)
        assert got.content == data


async def test_a_read_only_share_folder_takes_no_new_shares_and_releases_still_answer(
        tmp_path: Path, mediator: MediatorPeer, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing disk remounted read-only: uploads go to the other folder (they all failed with 503 whenever the
    read-only one had the most room), and a release of a share there is a 204 (it was a 500), its files left for
    the cleanup at the next start."""
    async with running_node(node_settings(tmp_path, (mediator.url,))) as node:
        grant, _ = await store(client, node, mediator, os.urandom(30_000))
        read_only = _where(node, grant.share_id)
        real_statvfs, real_unlink = os.statvfs, Path.unlink

        def statvfs(path: str | os.PathLike[str]) -> os.statvfs_result:
            found = real_statvfs(path)
            if not Path(path).is_relative_to(read_only):
                return found
            return os.statvfs_result((*found[:8], found.f_flag | os.ST_RDONLY, found.f_namemax))

        def unlink(path: Path, missing_ok: bool = False) -> None:
            if path.is_relative_to(read_only):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            real_unlink(path, missing_ok)

        monkeypatch.setattr(os, "statvfs", statvfs)
        monkeypatch.setattr(Path, "unlink", unlink)
        health = (await client.get(f"{node.url}/health")).json()
        assert health["status"] == "degraded" and "read-only" in health["problems"][0]
        for _ in range(3):
            stored, _ = await store(client, node, mediator, os.urandom(30_000))
            assert _where(node, stored.share_id) != read_only
        response = await rpc.call(client, "DELETE", f"{node.url}/v1/shares/{grant.share_id}", key=mediator.key)
        assert response.status_code == 204 and node.service.db.get_share(grant.share_id) is None
        monkeypatch.undo()
    async with running_node(node_settings(tmp_path, (mediator.url,))) as node:
        assert not list(read_only.glob(f"*/{grant.share_id}.*"))  # removed at the next start


async def test_a_scrub_while_the_disk_is_away_marks_its_shares_missing_not_corrupt(
        tmp_path: Path, mediator: MediatorPeer, client: httpx.AsyncClient) -> None:
    """Unreadable is not corrupt: the scrub used to mark every share of an unmounted disk corrupt, for good, so
    they were never served again, even after the disk was back and the node restarted."""
    settings = node_settings(tmp_path, (mediator.url,))
    data = os.urandom(30_000)
    async with running_node(settings) as node:
        grant, _ = await store(client, node, mediator, data)
        folder = _where(node, grant.share_id)
        folder.rename(tmp_path / "unmounted")
        assert await node.service.scrub_once(1e9) == 0
        record = node.service.db.get_share(grant.share_id)
        assert record is not None and record.state == STATE_MISSING
        (tmp_path / "unmounted").rename(folder)
        await node.service.check_folders()
        got = await rpc.call(client, "GET", f"{node.url}/v1/shares/{grant.share_id}", key=ACCOUNT)
        assert got.content == data
        assert await node.service.scrub_once(1e9) == 0


async def test_a_folder_given_up_is_one_line_in_the_log_not_one_per_share(
        tmp_path: Path, mediator: MediatorPeer, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    """A disk removed from STORAGED_SHARE_DIRS (given up) held a share per line of log at the next start: a
    hundred thousand error lines for one decision. A few are named, then one line says how many and why."""
    from storaged import service as node_service
    disk = tmp_path / "disk"
    settings = replace(node_settings(tmp_path, (mediator.url,)), share_dirs=(ShareDir(disk, 64 << 20),))
    async with running_node(settings) as node:
        for _ in range(node_service.MISSING_LOGGED_PER_FOLDER + 7):
            await store(client, node, mediator, os.urandom(5_000))
    caplog.clear()
    with caplog.at_level("ERROR", logger="storaged.service"):
        async with running_node(replace(settings, share_dirs=(ShareDir(tmp_path / "new", 64 << 20),))) as node:
            assert node.service.shares_lost == node_service.MISSING_LOGGED_PER_FOLDER + 7
    lines = [r.getMessage() for r in caplog.records if r.name == "storaged.service"]
    assert len(lines) == node_service.MISSING_LOGGED_PER_FOLDER + 1, lines
    assert re.search(rf"^{node_service.MISSING_LOGGED_PER_FOLDER + 7} share\(s\) of folder .*disk are missing .*"
                     r"no longer in STORAGED_SHARE_DIRS", lines[-1])


@pytest.mark.parametrize("name", ["db", ".tmp", "state"])
async def test_a_data_folder_inside_a_share_folder_stops_the_start_before_anything_is_deleted(
        tmp_path: Path, mediator: MediatorPeer, name: str) -> None:
    """The start-up cleanup of a share folder deletes every file of its two-character subfolders and of ``.tmp``
    that is not a share: a data folder there lost its node.key and database (the node's identity) at once."""
    shares = tmp_path / "fincrypt"
    data_dir = shares / name
    data_dir.mkdir(parents=True)
    key = encode_identity_file(SigningKey.generate())
    (data_dir / "node.key").write_bytes(key)
    settings = replace(node_settings(tmp_path, (mediator.url,)), data_dir=data_dir,
                       share_dirs=(ShareDir(shares, 64 << 20),))
    with pytest.raises(ConfigError, match=re.escape(f"STORAGED_DATA_DIR {data_dir} is inside share folder "
                                                    f"{shares}")):
        async with running_node(settings):
            pass
    assert (data_dir / "node.key").read_bytes() == key


async def test_a_share_folder_that_is_the_data_folder_is_served(tmp_path: Path, mediator: MediatorPeer,
                                                                 client: httpx.AsyncClient) -> None:
    """Its cleanup touches only ``.tmp`` and the two-character subfolders, never the data folder's own files; its
    lock is the data folder's (taken once), not "another storaged" holding it."""
    settings = replace(node_settings(tmp_path, (mediator.url,)), share_dirs=(ShareDir(tmp_path / "node", 64 << 20),))
    data = os.urandom(10_000)
    async with running_node(settings) as node:
        grant, _ = await store(client, node, mediator, data)
        node_id = node.node_id
    async with running_node(settings) as node:
        assert node.node_id == node_id
        got = await rpc.call(client, "GET", f"{node.url}/v1/shares/{grant.share_id}", key=ACCOUNT)
        assert got.content == data

"""The node's tree files: written while a share streams in and checked by the scrub, both in bounded memory.

A tree file must be MerkleTree.to_bytes of the share, byte for byte (proofs read hashes from it by offset), and
neither the upload nor the scrub may hold memory in proportion to the share.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from storaged_peers import MediatorPeer, RunningNode, listed_files, put_share, store

from fincryptfs.core import merkle
from fincryptfs.core.ids import new_share_id
from fincryptfs.core.merkle import HASH_BYTES, LEAF_SIZE, MerkleTree
from fincryptfs.core.settings import ShareDir
from storaged import store as store_mod
from storaged.store import TMP_DIR, ShareFolder, ShareWriter, tree_file_size

REPO = Path(__file__).resolve().parents[2]


def _folder(tmp_path: Path) -> ShareFolder:
    (tmp_path / TMP_DIR).mkdir(exist_ok=True)
    return ShareFolder(ShareDir(tmp_path, 1 << 40))


def _write_share(folder: ShareFolder, data: bytes, piece: int) -> tuple[ShareWriter, bytes]:
    writer = ShareWriter(folder, new_share_id(), os.urandom(16).hex())
    for at in range(0, len(data), piece):
        writer.write_chunks([data[at:at + piece // 3], data[at + piece // 3:at + piece]])
    return writer, writer.finish()


@pytest.mark.parametrize("size", [0, 1, LEAF_SIZE, 7 * LEAF_SIZE, 64 * LEAF_SIZE - 1, 65 * LEAF_SIZE + 1,
                                  300_000])
def test_share_writer_tree_file_is_merkle_tree_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     size: int) -> None:
    monkeypatch.setattr(merkle, "TREE_CHUNK_HASHES", 4)  # many flushes and read-backs even for small shares
    data = os.urandom(size)
    writer, root = _write_share(_folder(tmp_path), data, piece=10_000)
    tree = MerkleTree.from_data(data)
    assert root == tree.root
    paths = writer.commit()
    assert paths.tree.read_bytes() == tree.to_bytes() and paths.data.read_bytes() == data
    assert paths.tree.stat().st_size == tree_file_size(size)
    assert list((tmp_path / TMP_DIR).iterdir()) == []


def test_aborted_upload_leaves_no_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(merkle, "TREE_CHUNK_HASHES", 4)
    folder = _folder(tmp_path)
    writer = ShareWriter(folder, new_share_id(), os.urandom(16).hex())
    writer.write_chunks([os.urandom(40 * LEAF_SIZE)])  # level 0 partly written to the temp tree file already
    assert {p.suffix for p in (tmp_path / TMP_DIR).iterdir()} == {".data", ".tree"}
    writer.abort()
    assert list((tmp_path / TMP_DIR).iterdir()) == []


@pytest.mark.parametrize("when", ["while receiving", "at finish"])
async def test_full_disk_while_writing_the_tree_is_507_and_leaves_nothing(
        node: RunningNode, mediator: MediatorPeer, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
        when: str) -> None:
    """The tree file now grows during the upload (leaf hashes) and at its end (levels above): a full disk at
    either point is a 507 like one while writing the data, with no file left and the reservation given back."""
    monkeypatch.setattr(merkle, "TREE_CHUNK_HASHES", 4)
    data = os.urandom(3 << 20)
    level_0 = HASH_BYTES * merkle.leaf_count(len(data))
    real_pwrite_all = store_mod._pwrite_all

    def pwrite_all(fd: int, chunk: bytes | bytearray, offset: int) -> None:
        if (offset < level_0) == (when == "while receiving") and offset > 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_pwrite_all(fd, chunk, offset)

    monkeypatch.setattr(store_mod, "_pwrite_all", pwrite_all)
    grant = mediator.grant(node.node_id, data)
    before, free = listed_files(node), node.service.store.free_bytes()
    response = await put_share(client, node, mediator.seal(grant), data, grant.share_id)
    assert response.status_code == 507, response.text
    assert "ENOSPC" in response.json()["error"]
    assert listed_files(node) == before and node.service.db.get_share(grant.share_id) is None
    assert node.service.store.free_bytes() == free
    monkeypatch.setattr(store_mod, "_pwrite_all", real_pwrite_all)
    assert (await put_share(client, node, mediator.seal(grant), data, grant.share_id)).status_code == 201


@pytest.mark.parametrize("damage", ["leaf hash", "upper level", "top hash", "truncated", "extended"])
async def test_scrub_checks_every_level_of_the_tree_file(node: RunningNode, mediator: MediatorPeer,
                                                        client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
                                                        damage: str) -> None:
    monkeypatch.setattr(merkle, "TREE_CHUNK_HASHES", 4)  # the comparison crosses chunk boundaries on each level
    good, _ = await store(client, node, mediator, os.urandom(50 * LEAF_SIZE + 3))
    bad, _ = await store(client, node, mediator, os.urandom(50 * LEAF_SIZE + 3))
    assert await node.service.scrub_once(1 << 30) == 0
    record = node.service.db.get_share(bad.share_id)
    assert record is not None
    paths = node.service.store.paths(record.dir, bad.share_id)
    assert paths is not None
    tree = bytearray(paths.tree.read_bytes())
    at = {"leaf hash": 17 * HASH_BYTES + 5, "upper level": 60 * HASH_BYTES, "top hash": len(tree) - 1}
    if damage in at:
        tree[at[damage]] ^= 1
    elif damage == "truncated":
        del tree[-HASH_BYTES:]
    else:
        tree += bytes(HASH_BYTES)
    paths.tree.write_bytes(bytes(tree))
    assert await node.service.scrub_once(1 << 30) == 1
    assert [node.service.db.get_share(g.share_id).state for g in (good, bad)] == ["ok", "corrupt"]  # type: ignore[union-attr]


_MEASURE = textwrap.dedent("""
    import json, os, resource, sys
    from pathlib import Path
    from fincryptfs.core.ids import new_share_id
    from fincryptfs.core.merkle import RootBuilder, TreeFileChecker, hash_chunk
    from fincryptfs.core.settings import ShareDir
    from storaged import store

    def peak_kib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    root_dir, mib, tail = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    (root_dir / store.TMP_DIR).mkdir()
    folder = store.ShareFolder(ShareDir(root_dir, 1 << 50))
    block = os.urandom(1 << 20)
    batch = [block[at:at + (1 << 16)] for at in range(0, 1 << 20, 1 << 16)]  # a 1 MiB batch of 64 KiB chunks
    os.writev = lambda fd, views: sum(len(v) for v in views)  # the data file's bytes go nowhere: RAM is tested
    expected = RootBuilder()  # O(log n) and cheap: the block's leaves are hashed once, then reused as a subtree
    hashed = hash_chunk(0, block)
    for _ in range(mib):
        expected.update_hashed(hashed)
    expected.update(block[:tail])
    baseline = peak_kib()

    writer = store.ShareWriter(folder, new_share_id(), os.urandom(16).hex())
    for _ in range(mib):
        writer.write_chunks(batch)
    writer.write_chunks([block[:tail]])
    root = writer.finish()
    paths = writer.commit()
    after_upload = peak_kib()

    fd = os.open(paths.tree, os.O_RDONLY)
    checker = TreeFileChecker(writer.size, lambda offset, length: store.read_exact(fd, length, offset))
    for _ in range(mib):
        checker.update(block)
    checker.update(block[:tail])
    checked = checker.finish()
    os.close(fd)
    print(json.dumps({"size": writer.size, "tree_bytes": paths.tree.stat().st_size,
                      "root_ok": root == expected.finish(), "scrub_ok": checked == root,
                      "upload_growth_mib": (after_upload - baseline) / 1024,
                      "scrub_growth_mib": (peak_kib() - baseline) / 1024}))
""")


@pytest.mark.slow
def test_memory_of_a_big_upload_and_its_scrub_stays_bounded(tmp_path: Path) -> None:
    """2 GiB plus a ragged tail through ShareWriter, then TreeFileChecker, in a fresh process: peak RSS growth.

    With every leaf hash and level held as Python objects, this upload grew the process by 220 MiB and its scrub
    by 314 MiB (over 10 % of the share); the chunked writer and checker need about 6 MiB, whatever the size.
    """
    mib, tail = 2048, 2 * LEAF_SIZE + 1234
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path), str(mib), str(tail)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["size"] == (mib << 20) + tail and result["tree_bytes"] == tree_file_size(result["size"])
    assert result["root_ok"] and result["scrub_ok"]
    assert result["upload_growth_mib"] < 40, result
    assert result["scrub_growth_mib"] < 40, result

"""End to end: a real network, a real FUSE mount in its own process, files copied in and read back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trio
from mountkit import Client, needs_fuse, tree_of
from netfixtures import start_network

pytestmark = [pytest.mark.e2e, needs_fuse]


SECRET_NAME = b"quite-secret-file-name"
SECRET_CONTENT = b"plaintext that must never leave the machine " * 100


def make_tree(root: Path) -> None:
    rng = __import__("random").Random(7)
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "empty.txt").write_bytes(b"")
    (root / "small.txt").write_text("hello, fincrypt\n")
    (root / SECRET_NAME.decode()).write_bytes(SECRET_CONTENT)
    (root / "docs" / "a.bin").write_bytes(rng.randbytes(300_000))
    (root / "docs" / "deep" / "er" / "b.bin").write_bytes(rng.randbytes(2_500_000))
    os.chmod(root / "docs" / "a.bin", 0o640)
    os.symlink("docs/a.bin", root / "link")
    for i in range(20):
        (root / "docs" / f"f{i:02}").write_bytes(rng.randbytes(rng.randrange(1, 20_000)))


async def test_copy_flush_remount_without_cache_and_restore(tmp_path: Path, nursery: trio.Nursery) -> None:
    net = await start_network(tmp_path, nursery, nodes=6)
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    client = Client(tmp_path / "alice", net.mediator_url)
    phrase = client.init()
    assert (os.stat(client.home / "master.key").st_mode & 0o777) == 0o600
    restored = Client(tmp_path / "new-machine", net.mediator_url)
    try:
        await client.mount()
        await trio.to_thread.run_sync(lambda: subprocess.run(["cp", "-a", f"{src}/.", str(client.mountpoint)],
                                                             check=True))
        assert tree_of(client.mountpoint) == tree_of(src)
        # chmod/utimes of a file open for writing: seen at once, kept through the close (and the remounts below)
        assert await trio.to_thread.run_sync(_chmod_while_open, client.mountpoint / "held.txt") == (0o600, 2 * 10**9)
        await trio.to_thread.run_sync(_chmod_while_open, src / "held.txt")
        await client.flush()
        status = json.loads((await trio.to_thread.run_sync(lambda: client.cli("status", "--json"))).stdout)
        assert status["pending_uploads"] == 0
        by_path = {f["path"]: f for f in status["files"]}
        assert by_path["/docs/a.bin"]["size"] == 300_000
        assert by_path["/docs/a.bin"]["state"] == "stored"
        assert by_path["/docs/a.bin"]["shares_total"] == 6
        assert by_path["/docs/a.bin"]["shares_healthy"] >= 5
        text = (await trio.to_thread.run_sync(lambda: client.cli("status"))).stdout
        assert "pending uploads: 0" in text and "/docs/a.bin" in text

        # nothing that left the machine holds a file name or plaintext
        for path in net.root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert SECRET_NAME not in data and SECRET_CONTENT not in data, path

        # a second mount of the same data folder is refused
        (tmp_path / "elsewhere").mkdir()
        second = await trio.to_thread.run_sync(
            lambda: client.cli("mount", str(tmp_path / "elsewhere"), check=False))
        assert second.returncode == 1 and "another fincryptfs mount" in second.stderr
        assert not os.path.ismount(tmp_path / "elsewhere")
        await client.unmount()

        shutil.rmtree(client.cache_dir)
        await client.mount()
        assert await trio.to_thread.run_sync(tree_of, client.mountpoint) == tree_of(src)
        files = sum(1 for p in src.rglob("*") if p.is_file() and not p.is_symlink())
        with trio.fail_after(10):  # statfs's inode figures: the files, counted in the background at the start
            while (lambda st: st.f_files - st.f_ffree)(os.statvfs(client.mountpoint)) != files:
                await trio.sleep(0.1)
        await client.unmount()

        await restored.restore(phrase, net.mediator_url)
        await restored.mount()
        assert await trio.to_thread.run_sync(tree_of, restored.mountpoint) == tree_of(src)
    finally:
        await client.cleanup()
        await restored.cleanup()


def _chmod_while_open(path: Path) -> tuple[int, int]:
    with open(path, "wb") as f:
        f.write(b"held open")
        os.fchmod(f.fileno(), 0o600)
        os.utime(f.fileno(), ns=(10**9, 2 * 10**9))
        st = os.fstat(f.fileno())
    return st.st_mode & 0o777, st.st_mtime_ns

"""Everyday tools in the mount (tar, cp -a, editor-style saves, git clone), a crash during uploads, and reads
with n - k storage nodes down."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trio
from mountkit import Client, needs_fuse, tree_of
from netfixtures import start_network

from fincryptfs import meta
from fincryptfs.fs import IO_SIZE

pytestmark = [pytest.mark.e2e, needs_fuse]

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(src: Path, dst: Path, flags: int) -> int:
    """The errno of renameat2(2) (0 on success)."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    result = libc.renameat2(at_fdcwd, bytes(src), at_fdcwd, bytes(dst), flags)
    return 0 if result == 0 else ctypes.get_errno()


def make_repo(path: Path) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.org"}
    subprocess.run(["git", "init", "-q", str(path)], check=True, env=env)
    for i in range(3):
        (path / f"file{i}.txt").write_text(f"version {i}\n" * 100)
        subprocess.run(["git", "-C", str(path), "add", "."], check=True, env=env)
        subprocess.run(["git", "-C", str(path), "commit", "-q", "-m", f"commit {i}"], check=True, env=env)


def tools_in_mount(mnt: Path, work: Path) -> None:
    # tar x
    src = work / "tarsrc"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "x.bin").write_bytes(os.urandom(70_000))
    (src / "y.txt").write_text("y\n")
    os.symlink("sub/x.bin", src / "ln")
    subprocess.run(["tar", "-C", str(src), "-cf", str(work / "t.tar"), "."], check=True)
    (mnt / "untar").mkdir()
    subprocess.run(["tar", "-C", str(mnt / "untar"), "-xf", str(work / "t.tar")], check=True)
    assert tree_of(mnt / "untar") == tree_of(src)
    # cp -a keeps modes and mtimes
    subprocess.run(["cp", "-a", str(src), str(mnt / "cpa")], check=True)
    assert tree_of(mnt / "cpa") == tree_of(src)
    assert os.stat(mnt / "cpa" / "y.txt").st_mtime_ns == os.stat(src / "y.txt").st_mtime_ns
    # tools size their buffers by st_blksize: cp into the mount then writes 1 MiB per FUSE request, not 128 KiB
    assert os.stat(mnt / "cpa" / "y.txt").st_blksize == IO_SIZE == 2**20
    # rsync -a, twice (the second run rewrites a changed file through a temporary name and a rename)
    if shutil.which("rsync"):
        subprocess.run(["rsync", "-a", f"{src}/", str(mnt / "rs")], check=True)
        assert tree_of(mnt / "rs") == tree_of(src)
        (src / "y.txt").write_text("changed\n")
        subprocess.run(["rsync", "-a", f"{src}/", str(mnt / "rs")], check=True)
        assert tree_of(mnt / "rs") == tree_of(src)
    # an editor's save: write a temporary file, fsync, rename over the original
    target = mnt / "notes.txt"
    target.write_text("first draft\n")
    tmp = mnt / ".notes.txt.swp"
    with open(tmp, "w") as f:
        f.write("second draft\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, target)
    assert target.read_text() == "second draft\n"
    assert not tmp.exists()
    # rename across directories, over an existing file, and the renameat2 flags
    (mnt / "d1").mkdir()
    (mnt / "d2").mkdir()
    (mnt / "d1" / "a").write_text("a")
    (mnt / "d2" / "b").write_text("b")
    assert renameat2(mnt / "d1" / "a", mnt / "d2" / "b", RENAME_NOREPLACE) == errno.EEXIST
    assert renameat2(mnt / "d1" / "a", mnt / "d2" / "b", RENAME_EXCHANGE) == errno.EINVAL
    os.rename(mnt / "d1" / "a", mnt / "d2" / "b")
    assert (mnt / "d2" / "b").read_text() == "a" and not (mnt / "d1" / "a").exists()
    with pytest.raises(OSError) as info:
        os.link(mnt / "d2" / "b", mnt / "d2" / "hard")
    assert info.value.errno in (errno.ENOTSUP, errno.EPERM)
    with pytest.raises(OSError) as info:
        os.mkfifo(mnt / "d2" / "fifo")
    assert info.value.errno == errno.EPERM and not (mnt / "d2" / "fifo").exists()
    # git clone of a small local repository
    make_repo(work / "repo")
    subprocess.run(["git", "clone", "-q", str(work / "repo"), str(mnt / "clone")], check=True)
    log = subprocess.run(["git", "-C", str(mnt / "clone"), "log", "--oneline"], check=True, capture_output=True,
                         text=True).stdout
    assert len(log.splitlines()) == 3
    fsck = subprocess.run(["git", "-C", str(mnt / "clone"), "fsck"], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stderr


async def test_tools_crash_and_degraded_reads(tmp_path: Path, nursery: trio.Nursery) -> None:
    net = await start_network(tmp_path, nursery, nodes=6)
    client = Client(tmp_path / "c", net.mediator_url)
    client.init()
    work = tmp_path / "work"
    work.mkdir()
    mnt = client.mountpoint
    try:
        await client.mount()
        await trio.to_thread.run_sync(tools_in_mount, mnt, work)
        expected = await trio.to_thread.run_sync(tree_of, mnt)

        # A crash while uploads are unfinished: every file closed before the kill survives. The nodes are stopped
        # while the batch is written, so no upload can finish before the kill (on a fast machine a race with the
        # upload worker would sometimes find nothing left to lose).
        await client.flush()
        for index in range(len(net.nodes)):
            await net.stop_node(index)

        def write_batch() -> None:
            (mnt / "batch").mkdir()
            for i in range(40):
                (mnt / "batch" / f"{i}.bin").write_bytes(os.urandom(50_000 + i * 1000))
        await trio.to_thread.run_sync(write_batch)
        expected = await trio.to_thread.run_sync(tree_of, mnt)
        await client.kill()
        for index in range(len(net.nodes)):
            await net.restart_node(index)
        await net.wait_listed()
        db = meta.connect_readonly(client.data_dir / "meta.db")
        try:
            unfinished = len(meta.pending_uploads(db))
        finally:
            db.close()
        assert unfinished > 0, "the kill came after every upload finished: the test proves nothing"
        await client.mount()
        await client.flush()
        assert await trio.to_thread.run_sync(tree_of, mnt) == expected
        await client.unmount()

        # n - k nodes down and no cache: everything still reads back from the remaining k nodes.
        for index in range(3):
            await net.stop_node(index)
        shutil.rmtree(client.cache_dir)
        await client.mount()
        assert await trio.to_thread.run_sync(tree_of, mnt) == expected
    finally:
        await client.cleanup()

"""The client's own disk fills up: the writer gets ENOSPC, nothing already written is lost, the mount goes on,
and uploads need no local space: a large file's shares stream to the nodes, and a pack of small files is read
straight from their cache files."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trio
from mountkit import Client, needs_fuse
from netfixtures import start_network

pytestmark = [pytest.mark.e2e, needs_fuse]

MIB = 2**20
DISK = 40 * MIB


def fill(path: Path, size: int) -> int:
    """Write ``size`` random bytes to ``path`` in 1 MiB writes; the bytes written before an OSError is raised."""
    written = 0
    with open(path, "wb") as f:
        while written < size:
            f.write(os.urandom(min(MIB, size - written)))
            f.flush()
            written += min(MIB, size - written)
        os.fsync(f.fileno())
    return written


async def status(client: Client) -> dict:
    return json.loads((await trio.to_thread.run_sync(lambda: client.cli("status", "--json"))).stdout)


async def test_full_client_disk(tmp_path: Path, nursery: trio.Nursery) -> None:
    net = await start_network(tmp_path, nursery, nodes=6)
    home = tmp_path / "client"
    home.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(home)], check=True)
    client = Client(home, net.mediator_url)
    try:
        client.init()
        await client.mount()
        mnt = client.mountpoint
        kept = os.urandom(12 * MIB)
        await trio.to_thread.run_sync((mnt / "kept.bin").write_bytes, kept)
        await client.flush()

        # 1. A write larger than the disk: the writer is told the disk is full (while the disk's last few
        # percent stay free, so the tree database can still record the deletion below); the mount stays up.
        with pytest.raises(OSError) as info:
            await trio.to_thread.run_sync(fill, mnt / "huge.bin", 2 * DISK)
        assert info.value.errno == errno.ENOSPC
        assert client.process is not None and client.process.poll() is None
        assert await trio.to_thread.run_sync((mnt / "kept.bin").read_bytes) == kept
        await trio.to_thread.run_sync((mnt / "huge.bin").unlink)
        with trio.fail_after(10):  # its upload (it was closed, so it is backed up) stops and frees the space
            while shutil.disk_usage(home).free < 24 * MIB:
                await trio.sleep(0.1)

        # 2. A file whose six shares (twice its size) would not fit in the free space still uploads: shares
        # stream from the cache file to the nodes and never touch the local disk.
        tight = os.urandom(10 * MIB)
        await trio.to_thread.run_sync((mnt / "tight.bin").write_bytes, tight)
        assert shutil.disk_usage(home).free < 2 * len(tight)
        filler = os.urandom(12 * MIB)
        await trio.to_thread.run_sync((mnt / "filler.bin").write_bytes, filler)
        with trio.fail_after(60):
            await client.flush(timeout=50)

        # 3. Small files written until the disk is full: their packs are read straight from the cache files
        # (never staged in a temporary file), so they upload although no room is left; flush returns.
        small = {f"s{i}.txt": os.urandom(100_000) for i in range(int(shutil.disk_usage(home).free // 100_000))}
        written = {}
        for name, data in small.items():
            try:
                await trio.to_thread.run_sync((mnt / name).write_bytes, data)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                await trio.to_thread.run_sync((mnt / name).unlink)
                break
            written[name] = data
        assert len(written) > 5
        assert shutil.disk_usage(home).free < 4 * MIB
        with trio.fail_after(60):
            await client.flush(timeout=50)
        report = await status(client)
        assert report["pending_uploads"] == 0 and not report["upload_errors"], report
        for name, data in written.items():
            assert await trio.to_thread.run_sync((mnt / name).read_bytes) == data

        # 4. The user deletes files and flushes; everything left then reads back from the network alone.
        for name in ("kept.bin", "filler.bin"):
            await trio.to_thread.run_sync((mnt / name).unlink)
        with trio.fail_after(60):
            await client.flush(timeout=50)
        report = await status(client)
        assert report["pending_uploads"] == 0 and not report["failed_uploads"] and not report["upload_errors"]
        await client.unmount()
        shutil.rmtree(client.cache_dir)
        await client.mount()
        assert await trio.to_thread.run_sync((mnt / "tight.bin").read_bytes) == tight
        for name, data in written.items():
            assert await trio.to_thread.run_sync((mnt / name).read_bytes) == data
    finally:
        await client.cleanup()
        if client.log_path.exists():  # keep the mount's log past the tmpfs, for a failure's post-mortem
            shutil.copy(client.log_path, tmp_path / "mount.log")
        subprocess.run(["umount", "-l", str(home)], capture_output=True)

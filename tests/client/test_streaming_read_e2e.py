"""End to end: opening a file that is not cached returns at once, and reads are served as its bytes arrive.

The nodes sit behind relays that slow every read, so the whole file takes about a second to arrive while its
first segment takes a few hundredths: the test can tell a streamed read from one that waited for everything.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import BinaryIO

import pytest
import trio
from mountkit import Client, needs_fuse
from netfixtures import start_network

from fincryptfs import meta

pytestmark = [pytest.mark.e2e, needs_fuse]

SIZE = 40 * 2**20  # 20 segments of 2 MiB: runs of 1, 2, 4, 8 and 5 segments
RELAY_DELAY = 0.02  # seconds per 256 KiB forwarded: ~1 s for the whole file, ~0.05 s for its first segment


def cache_copy(client: Client, name: str) -> Path:
    db = meta.connect_readonly(client.data_dir / "meta.db")
    try:
        ino = meta.lookup(db, meta.ROOT_INO, name.encode()).ino
    finally:
        db.close()
    return client.cache_dir / str(ino)


async def open_cold_and_read_a_mib(client: Client, target: Path) -> tuple[BinaryIO, bytes]:
    """Remount with an empty cache, open ``target`` and read its first MiB, which arrives before the rest."""
    await client.unmount()
    shutil.rmtree(client.cache_dir)
    await client.mount()
    f: BinaryIO = await trio.to_thread.run_sync(lambda: open(target, "rb", buffering=0))
    head = await trio.to_thread.run_sync(f.read, 2**20)
    assert not cache_copy(client, target.name).exists()
    return f, head


async def test_cold_file_streams_a_failed_fetch_is_eio_and_a_rewrite_wins(tmp_path: Path,
                                                                           nursery: trio.Nursery) -> None:
    net = await start_network(tmp_path, nursery, nodes=6, gated=True)
    client = Client(tmp_path / "c", net.mediator_url)
    client.init()
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(SIZE))
    expected = source.read_bytes()
    target = client.mountpoint / "big.bin"
    try:
        await client.mount()
        await trio.to_thread.run_sync(shutil.copyfile, source, target)
        await client.flush()
        await client.unmount()
        shutil.rmtree(client.cache_dir)
        for gate in net.gates:
            gate.delay = RELAY_DELAY
        await client.mount()

        # The first MiB is served while the file is still arriving; then the rest, byte for byte.
        def first_then_rest() -> tuple[bytes, bool, bytes]:
            with open(target, "rb", buffering=0) as f:
                head = f.read(2**20)
                complete_then = cache_copy(client, "big.bin").exists()
                rest = b"".join(iter(lambda: f.read(2**20), b""))
            return head, complete_then, rest

        head, complete_then, rest = await trio.to_thread.run_sync(first_then_rest)
        assert not complete_then, "the first MiB came only after the whole file: nothing was streamed"
        assert head + rest == expected
        assert cache_copy(client, "big.bin").read_bytes() == expected  # and it stays cached

        # A fetch that fails half way: what arrived reads correctly, the rest is EIO, never other bytes.
        f, got = await open_cold_and_read_a_mib(client, target)
        try:
            for index in range(4):  # two nodes left, k = 3
                await net.stop_node(index)

            def read_until_error() -> tuple[bytes, OSError | None]:
                data = bytearray(got)
                try:
                    while chunk := f.read(2**20):
                        data += chunk
                except OSError as exc:
                    return bytes(data), exc
                return bytes(data), None

            data, error = await trio.to_thread.run_sync(read_until_error)
        finally:
            f.close()
        assert error is not None and error.errno == errno.EIO, (len(data), error)
        assert len(data) < SIZE and data == expected[:len(data)]
        assert not cache_copy(client, "big.bin").exists()

        # With the nodes back, the next open fetches it again and reads it whole.
        for index in range(4):
            await net.restart_node(index)
        await net.wait_listed()
        assert await trio.to_thread.run_sync(target.read_bytes) == expected

        # Rewritten while its old version is still arriving (held at the gates, so it surely is): the new content
        # wins when the fetch ends (it must not rename the old version over it). The reader that opened the old
        # version sees what it would on a local disk: the file is now 15 bytes long, so it reads to that end, and
        # from its start the new bytes (it used to read the old ones from the fetch's partial copy, and the kernel
        # then served them to every later open too).
        f, head = await open_cold_and_read_a_mib(client, target)
        net.hold()
        try:
            await trio.to_thread.run_sync(target.write_bytes, b"the new version")
            tail = await trio.to_thread.run_sync(f.read, 2**20)
            f.seek(0)
            again = await trio.to_thread.run_sync(f.read, 2**20)
        finally:
            net.release()
            f.close()
        assert head == expected[:2**20] and tail == b"" and again == b"the new version"
        with trio.fail_after(30):  # the old version's fetch ends (its partial file goes) ...
            while any(p.name.endswith(".part") for p in client.cache_dir.iterdir()):
                await trio.sleep(0.05)
        assert await trio.to_thread.run_sync(target.read_bytes) == b"the new version"  # ... and changed nothing
        await client.flush()
        await client.unmount()
        shutil.rmtree(client.cache_dir)
        await client.mount()
        assert await trio.to_thread.run_sync(target.read_bytes) == b"the new version"
    finally:
        await client.cleanup()

"""The mount's wake-ups for the upload worker: coalesced, never lost."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import trio
import trio.testing

from fincryptfs import meta, mount
from fincryptfs.core.settings import ClientSettings
from fincryptfs.mount import WorkerLink
from fincryptfs.uploadworker import EXIT_TREE_BUSY, encode_config

ROOT = Path(__file__).resolve().parents[2]


async def drain(stream: trio.testing.MemoryReceiveStream) -> bytes:
    """What the worker would read now."""
    data = b""
    with trio.move_on_after(0.01):
        while True:
            data += await stream.receive_some(4096)
    return data


async def test_a_burst_of_wakes_sends_a_few_bytes_and_keeps_the_jobs_flag() -> None:
    send, recv = trio.testing.memory_stream_one_way_pair()
    link = WorkerLink()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.send_wakes, send)
        await trio.sleep(mount.WAKE_COALESCE / 2)
        assert await drain(recv) == b"j"  # a new worker looks at once
        started = trio.current_time()
        for i in range(500):  # copying files: the tree changes, and one close records a job
            link.wake(jobs=i == 250)
            await trio.sleep(0)
        busy = trio.current_time() - started
        await trio.sleep(3 * mount.WAKE_COALESCE)
        burst = await drain(recv)
        assert 1 <= len(burst) <= 2 + busy / mount.WAKE_COALESCE  # at most one byte per interval, not 500
        assert b"j" in burst  # the job among the tree changes is not lost
        link.wake(jobs=False)  # only the tree: the worker's publisher looks, its job runners need not
        await trio.sleep(3 * mount.WAKE_COALESCE)
        assert await drain(recv) == b"t"
        nursery.cancel_scope.cancel()


def test_a_worker_stopped_by_a_locked_tree_is_restarted_soon_not_after_a_growing_backoff() -> None:
    delay, failures = 1.0, 0
    for _ in range(10):  # crashes: the backoff grows
        delay, failures = mount.restart_delay(1, failures, ran=6.0)
    assert delay >= 60
    for _ in range(30):  # a lock held for minutes: every restart stays short
        delay, failures = mount.restart_delay(EXIT_TREE_BUSY, failures, ran=6.0)
        assert delay == mount.TREE_BUSY_RESTART
    assert mount.restart_delay(-9, failures, ran=6.0)[0] == 1.0  # and a crash after it starts over


def test_the_worker_says_in_one_line_that_the_tree_is_locked(tmp_path: Path) -> None:
    """Another process holds the tree's write lock past SQLite's busy timeout: the worker used to die with a
    60-line traceback, counted by the mount as a crash."""
    settings = ClientSettings.from_env({"FINCRYPT_DATA_DIR": str(tmp_path), "FINCRYPT_MEDIATOR_URL":
                                        "http://127.0.0.1:9"}, home=tmp_path)
    meta.connect(tmp_path / "meta.db").close()
    lock = sqlite3.connect(tmp_path / "meta.db", isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        worker = subprocess.run([sys.executable, "-m", "fincryptfs.uploadworker"],
                                input=encode_config(settings, bytes(32), 0), capture_output=True, timeout=60,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert worker.returncode == EXIT_TREE_BUSY, worker.stderr.decode()
    assert b"Traceback" not in worker.stderr
    assert b"is locked by another process" in worker.stderr

"""The mount's wake-ups for the upload worker: coalesced, never lost."""

from __future__ import annotations

import trio
import trio.testing

from fincryptfs import mount
from fincryptfs.mount import WorkerLink


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

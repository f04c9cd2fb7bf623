"""uploader.run_ordered: jobs in worker threads, results consumed in order, bounded window, plain errors."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from fincryptfs.core.errors import IntegrityError
from fincryptfs.uploader import run_ordered


async def test_results_arrive_in_order_with_at_most_window_in_flight() -> None:
    lock = threading.Lock()
    running = peak = 0

    def job(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.002 * (7 - i % 7))  # later jobs often finish first
        with lock:
            running -= 1
        return i * i

    seen: list[tuple[int, int]] = []

    async def consume(i: int, value: int) -> None:
        seen.append((i, value))

    await run_ordered(trio.CapacityLimiter(8), 40, job, consume, window=3)
    assert seen == [(i, i * i) for i in range(40)]
    assert 1 <= peak <= 3


async def test_first_error_is_raised_as_is_and_later_results_are_not_consumed() -> None:
    def job(i: int) -> int:
        if i == 5:
            raise IntegrityError("segment 5 is bad")
        return i

    seen: list[int] = []

    async def consume(i: int, value: int) -> None:
        seen.append(i)

    with pytest.raises(IntegrityError, match="segment 5"):
        await run_ordered(trio.CapacityLimiter(2), 20, job, consume)
    assert seen == [0, 1, 2, 3, 4]

    async def failing_consume(i: int, value: int) -> None:
        if i == 2:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        await run_ordered(trio.CapacityLimiter(2), 20, lambda i: i, failing_consume)

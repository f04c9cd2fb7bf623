"""The test harness itself: async tests run under trio without a marker (trio_mode)."""

import trio


async def test_async_tests_run_under_trio() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)
    assert trio.lowlevel.current_task() is not None

"""The test harness itself: async tests run under trio without a marker (trio_mode)."""

from pathlib import Path

import trio


async def test_async_tests_run_under_trio() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)
    assert trio.lowlevel.current_task() is not None


async def test_a_held_gate_stalls_a_request_until_released(tmp_path: Path, nursery: trio.Nursery) -> None:
    """The crash tests rely on ``Network.hold`` to keep uploads unfinished; check that it really holds."""
    import httpx
    from netfixtures import start_network

    net = await start_network(tmp_path, nursery, nodes=1, gated=True)
    public = f"http://127.0.0.1:{net.gates[0].port}/health"
    async with httpx.AsyncClient(trust_env=False) as client:
        assert (await client.get(public)).status_code == 200
        net.hold()
        answered: list[int] = []

        async def ask() -> None:
            answered.append((await client.get(public, timeout=10)).status_code)
        async with trio.open_nursery() as inner:
            inner.start_soon(ask)
            await trio.sleep(0.5)
            assert answered == []  # held: no answer however long we wait
            net.release()
        assert answered == [200]

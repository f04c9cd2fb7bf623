"""A request refused before its body is read still gets its answer (not "server disconnected").

The server drains a refused body of up to DRAIN_BYTES before answering, so a client still sending it reads the
413 and its explanation instead of a reset connection; this is the race that made oversized-body tests flaky.
"""

from __future__ import annotations

import httpx
import trio

from fincryptfs.asgi import DRAIN_BYTES, App, Request, Response, Router, json_response, serve_app


async def _small_only(request: Request) -> Response:
    await request.body(1024)
    return json_response({"ok": True})


async def test_oversized_bodies_get_their_413_every_time() -> None:
    router = Router()
    router.add("POST", "/small", _small_only)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_app, App(router), "127.0.0.1", 0)
        async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
            for size in [2 << 20, 64 << 10, DRAIN_BYTES] * 4:
                response = await client.post(url + "/small", content=b"x" * size)
                assert response.status_code == 413
                assert "exceeds the limit of 1024" in response.json()["error"]
            ok = await client.post(url + "/small", content=b"{}")
            assert ok.status_code == 200 and ok.json() == {"ok": True}
        nursery.cancel_scope.cancel()

"""The HTTP edge reads request bodies in large pieces: fincryptfs.asgi raises hypercorn's hard-coded 64 KiB read.

If a hypercorn upgrade stops honouring ``hypercorn.trio.tcp_server.MAX_RECV``, uploads silently fall back to
64 KiB reads (several times the server CPU per MB): these tests fail instead.
"""

from __future__ import annotations

import inspect

import httpx
import trio
from hypercorn.trio import tcp_server

from fincryptfs import asgi
from fincryptfs.asgi import App, Request, Response, Router, json_response, serve_app


def test_hypercorn_still_reads_its_module_constant() -> None:
    assert isinstance(tcp_server.MAX_RECV, int)
    assert "receive_some(MAX_RECV)" in inspect.getsource(tcp_server.TCPServer._read_data)


async def test_body_arrives_in_pieces_larger_than_64_kib() -> None:
    sizes: list[int] = []
    body = bytes(range(256)) * (8 * 4096)  # 8 MiB

    async def sink(request: Request) -> Response:
        await trio.sleep(0.3)  # let the client fill the socket buffers, so reads are as large as allowed
        received = bytearray()
        async for chunk in request.stream(len(body)):
            sizes.append(len(chunk))
            received += chunk
        return json_response({"same": bytes(received) == body}, 201)

    router = Router()
    router.add("PUT", "/sink", sink)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_app, App(router), "127.0.0.1", 0)
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.put(f"{url}/sink", content=body)
        nursery.cancel_scope.cancel()
    assert response.status_code == 201 and response.json() == {"same": True}
    assert tcp_server.MAX_RECV == asgi.RECEIVE_BYTES
    assert sum(sizes) == len(body)
    assert max(sizes) > 64 * 1024, f"largest piece {max(sizes)} bytes: hypercorn reads 64 KiB again"
    assert max(sizes) <= asgi.RECEIVE_BYTES

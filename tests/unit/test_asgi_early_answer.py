"""A request refused before its body is read still gets its answer (not "server disconnected").

The server drains a refused body of up to DRAIN_BYTES before answering, so a client still sending it reads the
413 and its explanation instead of a reset connection; this is the race that made oversized-body tests flaky.
"""

from __future__ import annotations

import socket

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


def _announce_much_send_little(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /small HTTP/1.1\r\nhost: x\r\ncontent-length: 1099511627776\r\nconnection: close\r\n\r\n"
                     + b"x" * 2000)
        sock.shutdown(socket.SHUT_WR)
        try:
            while sock.recv(4096):
                pass
        except OSError:  # reset: the server closed with our bytes unread
            pass


async def test_a_body_cut_short_after_an_early_answer_does_not_stop_the_server() -> None:
    """A client announcing a huge body, sending a little and closing its side, gets its early 413 while hypercorn
    answers the broken framing itself and closes the socket: the two sends once met in hypercorn's trio worker
    (trio.BusyResourceError) and that escaped the connection's task and stopped the whole server."""
    router = Router()
    router.add("POST", "/small", _small_only)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_app, App(router), "127.0.0.1", 0)
        port = httpx.URL(url).port
        assert port is not None
        for _ in range(100):  # the race needs the client in another thread, as a real one is
            await trio.to_thread.run_sync(_announce_much_send_little, port)
        async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
            ok = await client.post(url + "/small", content=b"{}")
        assert ok.status_code == 200
        nursery.cancel_scope.cancel()


async def test_an_answer_the_daemon_cannot_encode_is_its_own_500_not_the_callers_400(caplog: object) -> None:
    """A total past 64 bits (once: free space summed over nodes) made the answer unencodable, and the 400 told
    the caller its request was wrong."""
    async def too_big(request: Request) -> Response:
        return json_response({"free_bytes": 2**64})

    router = Router()
    router.add("GET", "/total", too_big)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_app, App(router), "127.0.0.1", 0)
        async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
            response = await client.get(url + "/total")
        nursery.cancel_scope.cancel()
    assert response.status_code == 500
    assert any("cannot be encoded" in r.getMessage() or "cannot be encoded" in str(r.exc_info)
               for r in caplog.records)  # type: ignore[attr-defined]

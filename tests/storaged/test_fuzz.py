"""Random requests to every endpoint of a real node: never a 5xx, and the node stays healthy.

Hypothesis drives examples synchronously, so the node (with its mediator peer) runs on its own trio loop in a
background thread for the whole module and the requests go over plain sockets, byte for byte as generated.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storaged_peers import MediatorPeer, RunningNode, node_settings, running_node, start_mediator

from fincryptfs import rpc


@pytest.fixture(scope="module")
def threaded_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningNode, MediatorPeer]]:
    root: Path = tmp_path_factory.mktemp("fuzz")
    ready: queue.Queue[tuple[trio.lowlevel.TrioToken, trio.CancelScope, RunningNode, MediatorPeer]] = queue.Queue()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            mediator = await start_mediator(nursery)
            async with running_node(node_settings(root, (mediator.url,))) as node:
                ready.put((trio.lowlevel.current_trio_token(), nursery.cancel_scope, node, mediator))
                await trio.sleep_forever()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    token, scope, node, mediator = ready.get(timeout=30)
    try:
        yield node, mediator
    finally:
        token.run_sync_soon(scope.cancel)
        thread.join(timeout=15)


def send_raw(url: str, data: bytes) -> int:
    parsed = httpx.URL(url)
    assert parsed.port is not None
    with socket.create_connection((parsed.host, parsed.port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n" not in received:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    assert received.startswith(b"HTTP/1.1 "), received[:100]
    return int(received[9:12])


TOKEN = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-", min_size=1,
                max_size=12)
METHODS = st.one_of(st.sampled_from(["GET", "PUT", "POST", "DELETE", "HEAD", "PATCH", "OPTIONS"]), TOKEN)
SEGMENT = st.text(alphabet="0123456789abcdefABCDEF%./-_~xz", max_size=70)
PREFIXES = st.sampled_from(["/v1/shares/", "/v1/challenges", "/health", "/metrics", "/", "/v1/", "/v1/nodes/"])
PATHS = st.builds(lambda prefix, segments, query: prefix + "/".join(segments) + (f"?{query}" if query else ""),
                  PREFIXES, st.lists(SEGMENT, max_size=3),
                  st.one_of(st.none(), st.text(alphabet="abcdefgl_=&0123456789-%", max_size=40)))
HEADER_NAMES = st.one_of(st.sampled_from(["fincrypt-grant", "fincrypt-key", "fincrypt-time", "fincrypt-nonce",
                                          "fincrypt-signature", "content-type", "x-any"]), TOKEN)
HEADER_VALUES = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=200)
HEADERS = st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=METHODS, path=PATHS, headers=HEADERS, body=st.binary(max_size=3000))
def test_random_requests_never_5xx(threaded_node: tuple[RunningNode, MediatorPeer], method: str, path: str,
                                   headers: list[tuple[str, str]], body: bytes) -> None:
    lines = [f"{method} {path} HTTP/1.1", "host: fuzz", f"content-length: {len(body)}", "connection: close"]
    lines += [f"{name}: {value.strip()}" for name, value in headers
              if name.lower() not in ("content-length", "host", "connection", "transfer-encoding")]
    status = send_raw(threaded_node[0].url, ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body)
    assert status < 500, (method, path, headers)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["mediator_id", "node_id", "round_id", "nonce", "leaves_per_share", "share_ids", "x"]),
        inner, max_size=7),
    max_leaves=12)


@pytest.fixture(scope="module")
def sync_client() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False) as client:
        yield client


@settings(max_examples=100, deadline=None)
@given(body=st.one_of(st.binary(max_size=2000), JSON_VALUES.map(lambda v: json.dumps(v).encode())))
def test_signed_challenge_bodies_never_5xx(threaded_node: tuple[RunningNode, MediatorPeer], sync_client: httpx.Client,
                                           body: bytes) -> None:
    """Bodies signed by the trusted mediator get past authentication; the decoder must still refuse them."""
    node, mediator = threaded_node
    target = f"{node.url}/v1/challenges"
    response = sync_client.post(target, content=body, headers=rpc.signed_headers(mediator.key, "POST", target, body))
    assert response.status_code < 500, response.text


def test_node_healthy_after_fuzzing(threaded_node: tuple[RunningNode, MediatorPeer]) -> None:
    url = threaded_node[0].url
    health = httpx.get(f"{url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = httpx.get(f"{url}/metrics").text
    assert 'status="5' not in metrics  # no request of the whole run was answered with a 5xx

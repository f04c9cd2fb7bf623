"""Random requests to every endpoint of a real node: never a 5xx, and the node stays healthy.

Hypothesis drives examples synchronously, so the node (with its mediator peer) runs on its own trio loop in a
background thread for the whole module and the requests go over plain sockets, byte for byte as generated.
The signed ones carry a good signature of the account, the trusted mediator or a stranger over hostile content
(grants the mediator really signed with malformed bodies, share ids and leaf ranges out of bounds), and a refused
one must leave the node's shares, used grants and files as they were.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
from hostile_http import HOSTILE_STRINGS, ErrorLog, check_answer, db_snapshot, dump, exchange, logged_errors, sealed
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from storaged_peers import (
    ACCOUNT,
    MediatorPeer,
    RunningNode,
    listed_files,
    node_settings,
    running_node,
    start_mediator,
)

from fincryptfs import rpc
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.ids import new_share_id
from fincryptfs.core.wire import b64encode, origin_of, sign_request
from storaged.daemon import DATABASE_FILE


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


@pytest.fixture(scope="module", autouse=True)
def node_errors() -> Iterator[ErrorLog]:
    """What the node logs as an error during the module: a traceback is a bug even when the answer was fine."""
    with logged_errors() as errors:
        yield errors


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


@pytest.fixture(scope="module")
def held_share(threaded_node: tuple[RunningNode, MediatorPeer], sync_client: httpx.Client) -> str:
    """A share the node holds (for the account and the mediator peer), so that reads get past the lookup."""
    node, mediator = threaded_node
    data = bytes(range(256)) * 40
    grant = mediator.grant(node.node_id, data)
    response = sync_client.put(f"{node.url}/v1/shares/{grant.share_id}", content=data,
                               headers={"fincrypt-grant": mediator.seal(grant)})
    assert response.status_code == 201, response.text
    return grant.share_id


BAD_SHARE_IDS = ["..", "%2e%2e", "..%2f..%2fetc%2fpasswd", "%2F", "a" * 5000, "AB" * 32, "zz" * 32, "0" * 63,
                 "%00", "%C3%A9", "0" * 64 + "%2f..", ""]
QUERIES = ["", "first_leaf=0&leaf_count=1", "first_leaf=0&leaf_count=0", "first_leaf=1&leaf_count=1",
           "first_leaf=999999999999999&leaf_count=999999999999999", "first_leaf=-1&leaf_count=1",
           "first_leaf=%31&leaf_count=1", "first_leaf=0&leaf_count=1&first_leaf=0", "first_leaf=1e3&leaf_count=1",
           "first_leaf=%D9%A1&leaf_count=1", "first_leaf=%C2%B2&leaf_count=%00",
           "x=" + "y" * 3000, "&&&", "first_leaf=0"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_signed_share_requests_with_hostile_content(threaded_node: tuple[RunningNode, MediatorPeer],
                                                    held_share: str, node_errors: ErrorLog,
                                                    data: st.DataObject) -> None:
    node, mediator = threaded_node
    method = data.draw(st.sampled_from(["PUT", "GET", "DELETE"]))
    share_id = data.draw(st.one_of(st.just(held_share), st.builds(new_share_id), st.sampled_from(BAD_SHARE_IDS)))
    if method == "DELETE" and share_id == held_share:
        signer = data.draw(st.sampled_from([ACCOUNT, SigningKey.generate()]))  # never the one allowed to delete
    else:
        signer = data.draw(st.sampled_from([ACCOUNT, mediator.key, SigningKey.generate()]))
    query = data.draw(st.sampled_from(QUERIES)) if method == "GET" else ""
    target = f"/v1/shares/{share_id}" + (f"?{query}" if query else "")
    headers: list[tuple[str, str]] = []
    body = b""
    content_length = None
    if method == "PUT":
        payload = bytes(data.draw(st.integers(0, 255)) for _ in range(3)) * 700
        grant = mediator.grant(node.node_id, payload, share_id=share_id if len(share_id) == 64 else None)
        envelope = data.draw(st.one_of(sealed("grant", grant.to_json(), mediator.key),
                                       st.just(grant.seal(mediator.key).to_json())))
        header = data.draw(st.one_of(st.just(b64encode(dump(envelope))),
                                     st.sampled_from(HOSTILE_STRINGS[:12]).map(lambda s: s.encode("unicode_escape")
                                                                               .decode())))
        headers.append(("fincrypt-grant", header))
        body = data.draw(st.sampled_from([payload, payload[:-1], payload + b"x", b"", payload[::-1]]))
        content_length = data.draw(st.sampled_from([None, None, None, len(body) + 3, 2**40]))
    else:
        now = time.time() - data.draw(st.sampled_from([0, 0, 0, 3600]))
        body = data.draw(st.sampled_from([b"", b"", b"{}", b"x" * 100]))
        headers += list(sign_request(signer, method, origin_of(node.url), target, body, now).items())
        if data.draw(st.sampled_from([False] * 5 + [True])):
            headers.append(headers[-1])  # a signature header given twice
    before = (db_snapshot(node.settings.data_dir / DATABASE_FILE, skip=("mediators", "earnings")),
              listed_files(node))
    answer = exchange(node.url, method, target, headers, body, content_length=content_length)
    event(f"{method} -> {answer.status if answer else None}")
    if answer is not None and answer.status == 400 and answer.headers.get("content-length") == "0":
        answer = None  # hypercorn's own answer to a body that ended before its content-length
    check_answer(answer, (method, target, headers, body[:50], content_length))
    if answer is None or answer.status >= 400:
        after = (db_snapshot(node.settings.data_dir / DATABASE_FILE, skip=("mediators", "earnings")),
                 listed_files(node))
        assert after == before, (method, target, answer)
    assert node_errors.messages() == [], (method, target, headers, content_length)


def test_node_healthy_after_fuzzing(threaded_node: tuple[RunningNode, MediatorPeer], node_errors: ErrorLog) -> None:
    url = threaded_node[0].url
    health = httpx.get(f"{url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = httpx.get(f"{url}/metrics").text
    assert 'status="5' not in metrics  # no request of the whole run was answered with a 5xx
    assert node_errors.messages() == []  # nor logged an error

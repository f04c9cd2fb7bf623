"""Hostile requests to every endpoint of a real mediator: never a 5xx, a readable JSON error for every 4xx, the
mediator answering afterwards, and no refused request changing its database.

The mediator runs on its own trio loop in a background thread for the whole module (hypothesis drives examples
synchronously) and knows four storage nodes whose keys the test holds: placements succeed, and the test can
sign receipts as those nodes would. The interesting requests are the ones signed correctly by a legitimate
account, node or the mediator itself whose JSON content is hostile.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hostile_http
import httpx
import pytest
import trio
from hostile_http import (
    Answer,
    ErrorLog,
    check_answer,
    db_snapshot,
    dump,
    exchange,
    hostile_body,
    logged_errors,
    mutated_value,
    sealed,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mediator_net import start_mediator

from fincryptfs import rpc
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.ids import new_object_id, new_share_id
from fincryptfs.core.layout import ObjectLayout
from fincryptfs.core.messages import (
    CommitRequest,
    CommittedShare,
    ManifestPointer,
    NodeAnnouncement,
    Placement,
    PlaceRequest,
    ShareSpec,
    StorageReceipt,
    UploadGrant,
)
from fincryptfs.core.wire import origin_of, sign_request
from mediatord.daemon import DATABASE_FILE


@dataclass
class Fuzzed:
    url: str
    db_path: Path
    mediator: SigningKey
    account: SigningKey
    nodes: dict[str, SigningKey]
    object_id: str  # placed by ``account``, one share committed
    doomed_id: str  # placed by ``account``: the one object a fuzzed DELETE may remove
    templates: dict[str, dict[str, Any]]
    errors: ErrorLog | None = None

    def __repr__(self) -> str:
        return f"Fuzzed({self.url})"


def _sample_specs(layout: ObjectLayout) -> tuple[ShareSpec, ...]:
    return tuple(ShareSpec(i, new_share_id(), layout.share_size, os.urandom(32)) for i in range(layout.n))


def _receipt(placement: Placement, spec: ShareSpec) -> StorageReceipt:
    grant = UploadGrant.open(placement.grant)
    assert spec.merkle_root is not None
    return StorageReceipt(grant.node_id, grant.mediator_id, grant.account_id, grant.share_id, grant.share_size,
                          spec.merkle_root, grant.grant_id, int(time.time()))


async def _prepare(url: str, root: Path, mediator_key: SigningKey) -> Fuzzed:
    account = SigningKey.generate()
    nodes = {key.id: key for key in (SigningKey.generate() for _ in range(5))}
    layout = ObjectLayout(20_000, 8192, 2, 4)
    async with rpc.new_client() as client:
        for i, key in enumerate(nodes.values()):
            ann = NodeAnnouncement(key.id, f"http://127.0.0.{i + 2}:9", 100 + i, 1 << 40, 1 << 40,  # type: ignore[arg-type]
                                   f"op{i}", None)
            await rpc.call_json(client, "POST", f"{url}/v1/nodes/announce", key=key, json=ann.to_json())
        objects = []
        for _ in range(2):
            req = PlaceRequest(new_object_id(), layout, _sample_specs(layout))
            answer = await rpc.call_json(client, "POST", f"{url}/v1/objects/place", key=account, json=req.to_json())
            objects.append((req, [Placement.from_json(p) for p in answer["placements"]]))
        (req, placements), (doomed, _) = objects
        specs = {s.index: s for s in req.shares}
        committed = tuple(
            CommittedShare(p.index, specs[p.index].share_id, p.node_id, layout.share_size,
                           specs[p.index].merkle_root or b"",
                           _receipt(p, specs[p.index]).seal(nodes[p.node_id]))
            for p in sorted(placements, key=lambda p: p.index))
        commit = CommitRequest(req.object_id, layout, committed).to_json()
        first_node = nodes[committed[0].node_id]
        first_ann = NodeAnnouncement(first_node.id, "http://127.0.0.2:9", 100, 1 << 40, 1 << 40,  # type: ignore[arg-type]
                                     "op0", None).to_json()
        pointer = ManifestPointer(account.id, 1, new_object_id(), b"sealed", int(time.time())).seal(account)  # type: ignore[arg-type]
        templates: dict[str, dict[str, Any]] = {
            "announce": first_ann,
            "place": PlaceRequest(new_object_id(), layout, _sample_specs(layout)).to_json(),
            "commit": commit,
            "report": {"share_id": committed[0].share_id, "node_id": committed[0].node_id, "problem": "bad"},
            "pointer": {"pointer": pointer.to_json()},
            "receipt": committed[0].receipt.body,
            "pointer_body": pointer.body,
        }
    return Fuzzed(url, root / DATABASE_FILE, mediator_key, account, nodes, req.object_id,
                  doomed.object_id, templates)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    root: Path = tmp_path_factory.mktemp("mediator-fuzz")
    ready: queue.Queue[tuple[trio.lowlevel.TrioToken, trio.CancelScope, Fuzzed] | BaseException] = queue.Queue()

    async def main() -> None:
        try:
            async with trio.open_nursery() as nursery:
                mediator = await start_mediator(nursery, root)
                fuzz = await _prepare(mediator.url, root, mediator.service.key)
                ready.put((trio.lowlevel.current_trio_token(), nursery.cancel_scope, fuzz))
                await trio.sleep_forever()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread, which raises it
            ready.put(exc)
            raise

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    started = ready.get(timeout=60)
    if isinstance(started, BaseException):
        raise started
    token, scope, fuzz = started
    try:
        with logged_errors() as fuzz.errors:
            yield fuzz
    finally:
        token.run_sync_soon(scope.cancel)
        thread.join(timeout=15)


def send(fuzz: Fuzzed, method: str, target: str, body: bytes, signer: SigningKey | None, tamper: str,
         content_length: int | None = None) -> Answer | None:
    """One request, signed by ``signer`` for the mediator's origin, its auth headers spoiled as ``tamper`` says."""
    headers: list[tuple[str, str]] = [("content-type", "application/json")]
    if signer is not None:
        audience = origin_of(fuzz.url)
        now = time.time() - (3600 if tamper == "stale" else 0)
        signed = list(sign_request(signer, method, audience, target, body, now).items())
        if tamper == "drop":
            signed = signed[1:]
        elif tamper == "duplicate":
            signed.append(signed[0])
        elif tamper == "garbage":
            signed = [(name, value[::-1] + "\x7f%00") for name, value in signed]
        elif tamper == "other-body":
            body = body + b" "
        elif tamper == "audience":
            signed = [(n, SigningKey.generate().id if n == "fincrypt-audience" else v) for n, v in signed]
        headers += signed
    return exchange(fuzz.url, method, target, headers, body, content_length=content_length)


SIGNED_ROUTES: list[tuple[str, str, str | None]] = [  # method, path ("{id}": an object id), template
    ("POST", "/v1/nodes/announce", "announce"), ("POST", "/v1/objects/place", "place"),
    ("POST", "/v1/objects/commit", "commit"), ("GET", "/v1/objects/{id}", None),
    ("DELETE", "/v1/objects/{id}", None), ("POST", "/v1/objects/{id}/report", "report"),
    ("GET", "/v1/pointer", None), ("PUT", "/v1/pointer", "pointer"), ("GET", "/v1/account", None),
    ("GET", "/v1/account/history", None), ("GET", "/v1/nodes/me/earnings", None), ("GET", "/v1/ledger", None),
]
OPEN_ROUTES = ["/health", "/metrics", "/v1/info", "/v1/status", "/v1/nodes"]
BAD_IDS = ["..", "%2e%2e", "..%2f..%2fetc", "%2F", "a" * 5000, "AB" * 32, "zz" * 32, "0" * 63, "%00", "%C3%A9",
           "x?y=1", "/"]


def _snapshot(fuzz: Fuzzed) -> dict[str, list[str]]:
    return db_snapshot(fuzz.db_path)


def _check_refusal_changed_nothing(fuzz: Fuzzed, before: dict[str, list[str]], answer: Answer | None,
                                   what: object) -> None:
    check_answer(answer, what)
    if answer is None or answer.status >= 400:
        assert _snapshot(fuzz) == before, (what, answer)
    assert fuzz.errors is not None and fuzz.errors.messages() == [], what


@st.composite
def signed_requests(draw: st.DrawFn, fuzz: Fuzzed) -> tuple[str, str, bytes, SigningKey | None, str]:
    method, path, template_name = draw(st.sampled_from(SIGNED_ROUTES))
    if "{id}" in path:
        ids = [new_object_id(), fuzz.object_id] + ([fuzz.doomed_id] if method == "DELETE" else [fuzz.object_id])
        object_id = draw(st.one_of(st.sampled_from(ids), st.sampled_from(BAD_IDS)))
        path = path.replace("{id}", object_id)
    if draw(st.integers(0, 9)) == 0:
        path += "?" + draw(st.sampled_from(["x=1", "a=%00", "&&", "x=" + "y" * 3000, "object_id=..%2f"]))
    signer_name = draw(st.sampled_from(["account", "account", "node", "stranger", "mediator", "none"]))
    signer = {"account": fuzz.account, "node": next(iter(fuzz.nodes.values())), "stranger": SigningKey.generate(),
              "mediator": fuzz.mediator, "none": None}[signer_name]
    if template_name == "announce" and signer_name == "node":
        template = fuzz.templates["announce"]
    elif template_name == "announce" and signer is not None:  # an announcement naming its own signer
        template = {**fuzz.templates["announce"], "node_id": signer.id}
    else:
        template = fuzz.templates[template_name] if template_name else {}
    if template_name == "commit" and draw(st.booleans()):  # a receipt signed by its node, with hostile content
        shares = list(template["shares"])
        index = draw(st.integers(0, len(shares) - 1))
        node_key = fuzz.nodes[shares[index]["node_id"]]
        shares[index] = {**shares[index], "receipt": draw(sealed("receipt", shares[index]["receipt"]["body"],
                                                                 node_key))}
        body = dump({**template, "shares": shares})
    elif template_name == "pointer" and draw(st.booleans()):  # a pointer signed by the account, hostile inside
        body = dump({"pointer": draw(sealed("pointer", fuzz.templates["pointer_body"], fuzz.account))})
    elif template_name is None:
        body = draw(st.one_of(st.just(b""), st.just(b""), st.binary(max_size=100)))
    else:
        body = draw(hostile_body(template))
    tamper = draw(st.sampled_from(["none"] * 6 + ["drop", "duplicate", "garbage", "other-body", "stale",
                                                  "audience"]))
    return method, path, body, signer, tamper


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_signed_hostile_requests_are_refused_cleanly(fuzzed: Fuzzed, data: st.DataObject) -> None:
    method, path, body, signer, tamper = data.draw(signed_requests(fuzzed))
    before = _snapshot(fuzzed)
    answer = send(fuzzed, method, path, body, signer, tamper)
    event(f"{method} {path.split('?')[0][:30]} -> {answer.status if answer else None}")
    _check_refusal_changed_nothing(fuzzed, before, answer, (method, path, body[:300], tamper))
    if tamper != "none" or signer is None:
        assert answer is not None and 400 <= answer.status < 500, (method, path, tamper, answer)


LYING_LENGTHS = st.sampled_from(["shorter", "longer", "huge"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(SIGNED_ROUTES), lie=LYING_LENGTHS, size=st.integers(0, 2000))
def test_lying_content_length_is_refused_cleanly(fuzzed: Fuzzed, route: tuple[str, str, str | None], lie: str,
                                                 size: int) -> None:
    method, path, _ = route
    path = path.replace("{id}", fuzzed.object_id)
    body = dump({"x": "y" * size})
    length = {"shorter": max(0, len(body) - 5), "longer": len(body) + 7, "huge": (1 << 20) + 1}[lie]
    before = _snapshot(fuzzed)
    answer = send(fuzzed, method, path, body, fuzzed.account, "none", content_length=length)
    if answer is not None and answer.status == 400 and answer.headers.get("content-length") == "0":
        answer = None  # hypercorn's own answer: to the bytes after the body, or to the body ending early
    _check_refusal_changed_nothing(fuzzed, before, answer, (method, path, lie))
    assert answer is None or 400 <= answer.status < 500, answer


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(SIGNED_ROUTES), over=st.integers(1, 4096))
def test_bodies_over_the_cap_are_413(fuzzed: Fuzzed, route: tuple[str, str, str | None], over: int) -> None:
    method, path, _ = route
    path = path.replace("{id}", fuzzed.object_id)
    body = b'{"x":"' + b"y" * ((1 << 20) + over - 8) + b'"}'
    before = _snapshot(fuzzed)
    answer = send(fuzzed, method, path, body, fuzzed.account, "none")
    _check_refusal_changed_nothing(fuzzed, before, answer, (method, path, over))
    assert answer is None or answer.status == 413, answer


METHODS = st.one_of(st.sampled_from(["GET", "PUT", "POST", "DELETE", "HEAD", "PATCH", "OPTIONS", "TRACE"]),
                    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=10))
PATHS = st.one_of(
    st.sampled_from(OPEN_ROUTES + [path for _, path, _ in SIGNED_ROUTES]),
    st.builds(lambda prefix, seg: prefix + seg, st.sampled_from(["/v1/objects/", "/v1/", "/v1/nodes/", "/",
                                                                  "/v1/pointer/", "/v1/account/"]),
              st.one_of(st.sampled_from(BAD_IDS), st.text(alphabet="0123456789abcdefABCDEF%./-_~xz?&=", max_size=80))),
)
HEADER_NAMES = st.sampled_from(["fincrypt-key", "fincrypt-audience", "fincrypt-time", "fincrypt-nonce",
                                "fincrypt-signature", "content-type", "x-any", "expect"])
HEADER_VALUES = st.one_of(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=120),
                          st.sampled_from(hostile_http.HOSTILE_STRINGS[:12])
                          .map(lambda s: s.encode("unicode_escape").decode()))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=METHODS, path=PATHS, headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=7),
       body=st.one_of(st.binary(max_size=500), mutated_value({"a": 1}).map(dump)))
def test_unsigned_garbage_requests_are_refused_cleanly(fuzzed: Fuzzed, method: str, path: str,
                                                       headers: list[tuple[str, str]], body: bytes) -> None:
    before = _snapshot(fuzzed)
    answer = exchange(fuzzed.url, method, path, [(n, v.strip()) for n, v in headers], body)
    assert answer is not None, (method, path)
    assert answer.status < 500, (method, path, headers, answer)
    if method != "HEAD" and answer.status >= 400 and path.isprintable() and " " not in path:
        check_answer(answer, (method, path, headers))
    assert _snapshot(fuzzed) == before
    assert fuzzed.errors is not None and fuzzed.errors.messages() == [], (method, path)


def test_mediator_answers_after_fuzzing(fuzzed: Fuzzed) -> None:
    health = httpx.get(f"{fuzzed.url}/health", trust_env=False)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    listing = httpx.get(f"{fuzzed.url}/v1/nodes", trust_env=False)
    assert listing.status_code == 200 and len(listing.json()["nodes"]) >= 5
    metrics = httpx.get(f"{fuzzed.url}/metrics", trust_env=False).text
    assert ',status="5' not in metrics  # no request of the whole run was answered with a 5xx
    assert fuzzed.errors is not None and fuzzed.errors.messages() == []  # nor logged an error
    answer = send(fuzzed, "GET", f"/v1/objects/{fuzzed.object_id}", b"", fuzzed.account, "none")
    assert answer is not None and answer.status in (200, 404), answer


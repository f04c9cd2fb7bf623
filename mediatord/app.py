"""The mediator's HTTP API: maps routes to :class:`~mediatord.service.MediatorService`, nothing more.

Every signed route reads its body under a size limit *before* checking the signature (the signature covers
the body's hash) and refuses replays through one :class:`ReplayGuard`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable

from fincryptfs.asgi import App, Request, Response, Router, json_response
from fincryptfs.core.identity import PublicKey
from fincryptfs.core.ids import parse_object_id
from fincryptfs.core.wire import ReplayGuard, decode_object

from .service import MediatorService

MAX_BODY = 1 << 20


def build_app(service: MediatorService, *, clock: Callable[[], float] = time.time,
              guard: ReplayGuard | None = None) -> App:
    """``guard``: the replay guard (a journaled one keeps its memory across restarts); a fresh one if None."""
    guard = ReplayGuard() if guard is None else guard
    requests: Counter[tuple[str, int]] = Counter()

    async def signed(request: Request) -> tuple[PublicKey, bytes]:
        body = await request.body(MAX_BODY)
        return request.verify_signature(body, guard, service.audiences(), clock()).signer, body

    def route(handler: Callable[[Request, PublicKey, bytes], Awaitable[Response]]
              ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            signer, body = await signed(request)
            return await handler(request, signer, body)
        return wrapped

    async def health(request: Request) -> Response:
        return json_response({"status": "ok", "mediator_id": service.id,
                              "nodes_online": len(service.online_node_ids())})

    async def metrics(request: Request) -> Response:
        lines = []
        for name, value in service.db.counts().items():
            lines += [f"# TYPE fincrypt_mediator_{name} gauge", f"fincrypt_mediator_{name} {value}"]
        lines.append("# TYPE fincrypt_mediator_http_responses_total counter")
        for (route_name, status), count in sorted(requests.items()):
            lines.append(f'fincrypt_mediator_http_responses_total{{route="{route_name}",status="{status}"}} '
                         f"{count}")
        return Response(200, ("\n".join(lines) + "\n").encode(), {"content-type": "text/plain; version=0.0.4"})

    async def info(request: Request) -> Response:
        return json_response(service.info())

    async def status(request: Request) -> Response:
        return json_response(service.status())

    async def nodes(request: Request) -> Response:
        return json_response(service.node_list())

    @route
    async def announce(request: Request, signer: PublicKey, body: bytes) -> Response:
        return json_response(service.announce(signer, decode_object(body), clock()))

    @route
    async def place(request: Request, signer: PublicKey, body: bytes) -> Response:
        placements = service.place(signer, decode_object(body), clock())
        return json_response({"placements": [p.to_json() for p in placements]})

    @route
    async def commit(request: Request, signer: PublicKey, body: bytes) -> Response:
        return json_response(service.commit(signer, decode_object(body), clock()))

    @route
    async def get_object(request: Request, signer: PublicKey, body: bytes) -> Response:
        return json_response(service.object_status(signer, parse_object_id(request.params["object_id"])))

    @route
    async def delete_object(request: Request, signer: PublicKey, body: bytes) -> Response:
        service.delete_object(signer, parse_object_id(request.params["object_id"]), clock())
        return Response(204)

    @route
    async def report(request: Request, signer: PublicKey, body: bytes) -> Response:
        answer = service.report(signer, parse_object_id(request.params["object_id"]), decode_object(body))
        return json_response(answer, 202)

    @route
    async def get_pointer(request: Request, signer: PublicKey, body: bytes) -> Response:
        return json_response(service.get_pointer(signer))

    @route
    async def put_pointer(request: Request, signer: PublicKey, body: bytes) -> Response:
        return json_response(service.put_pointer(signer, decode_object(body), clock()))

    @route
    async def account(request: Request, signer: PublicKey, body: bytes) -> Response:
        return json_response(await service.account_with_balance(signer, clock()))

    @route
    async def account_history(request: Request, signer: PublicKey, body: bytes) -> Response:
        return json_response(service.account_history(signer))

    @route
    async def node_earnings(request: Request, signer: PublicKey, body: bytes) -> Response:
        return json_response(service.node_earnings(signer))

    @route
    async def ledger(request: Request, signer: PublicKey, body: bytes) -> Response:
        return json_response(service.ledger_report(signer))

    router = Router()
    router.add("GET", "/health", health)
    router.add("GET", "/metrics", metrics)
    router.add("GET", "/v1/info", info)
    router.add("GET", "/v1/status", status)
    router.add("GET", "/v1/nodes", nodes)
    router.add("POST", "/v1/nodes/announce", announce)
    router.add("POST", "/v1/objects/place", place)
    router.add("POST", "/v1/objects/commit", commit)
    router.add("GET", "/v1/objects/{object_id}", get_object)
    router.add("DELETE", "/v1/objects/{object_id}", delete_object)
    router.add("POST", "/v1/objects/{object_id}/report", report)
    router.add("GET", "/v1/pointer", get_pointer)
    router.add("PUT", "/v1/pointer", put_pointer)
    router.add("GET", "/v1/account", account)
    router.add("GET", "/v1/account/history", account_history)
    router.add("GET", "/v1/nodes/me/earnings", node_earnings)
    router.add("GET", "/v1/ledger", ledger)

    def count(route_name: str, status_code: int) -> None:
        requests[(route_name, status_code)] += 1

    return App(router, on_response=count)

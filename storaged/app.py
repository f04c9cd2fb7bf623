"""HTTP → StorageService: routes of docs/protocol.md (storage node), nothing else.

Routing is on the raw path (fincryptfs.asgi), so ``..%2f`` stays one opaque segment that parse_share_id refuses.
"""

from __future__ import annotations

from fincryptfs.asgi import App, Request, Response, Router, json_response
from fincryptfs.core.errors import RemoteProtocolError
from fincryptfs.core.ids import parse_share_id
from fincryptfs.core.wire import b64encode

from .service import MAX_CHALLENGE_BYTES, StorageService

SHARE_PATH = "/v1/shares/{share_id}"


def _leaf_query(request: Request) -> tuple[int | None, int | None]:
    query = request.query()
    unknown = set(query) - {"first_leaf", "leaf_count"}
    if unknown:
        raise RemoteProtocolError(f"unknown query parameter {sorted(unknown)[0][:40]!r}")
    first, count = query.get("first_leaf"), query.get("leaf_count")
    if (first is None) != (count is None):
        raise RemoteProtocolError("give both first_leaf and leaf_count, or neither")
    if first is None or count is None:
        return None, None
    for name, value in (("first_leaf", first), ("leaf_count", count)):
        if not value.isdigit() or not value.isascii() or len(value) > 15:
            raise RemoteProtocolError(f"{name} must be a non-negative integer")
    return int(first), int(count)


def build_app(service: StorageService) -> App:
    router = Router()

    async def health(request: Request) -> Response:
        return json_response(service.health())

    async def metrics(request: Request) -> Response:
        return Response(200, service.metrics_text().encode(), {"content-type": "text/plain; version=0.0.4"})

    async def put_share(request: Request) -> Response:
        parse_share_id(request.params["share_id"])
        envelope = await service.accept_upload(request.params["share_id"], request.headers.get("fincrypt-grant"),
                                               request.content_length(), request.stream)
        return json_response({"receipt": envelope.to_json()}, 201)

    async def get_share(request: Request) -> Response:
        parse_share_id(request.params["share_id"])
        first, count = _leaf_query(request)
        signed = request.authenticate(await request.body(0), service.audiences(), service.clock())
        read = await service.read_share(request.params["share_id"], signed, first, count)
        headers = {"content-type": "application/octet-stream", "fincrypt-share-size": str(read.share_size)}
        if read.proof is not None:
            headers["fincrypt-proof"] = b64encode(b"".join(read.proof))
        if read.stream is not None:
            return Response(200, b"", headers, read.stream)
        return Response(200, read.body, headers)

    async def delete_share(request: Request) -> Response:
        parse_share_id(request.params["share_id"])
        signed = request.authenticate(await request.body(0), service.audiences(), service.clock())
        await service.release(request.params["share_id"], signed)
        return Response(204)

    async def challenge(request: Request) -> Response:
        body = await request.body(MAX_CHALLENGE_BYTES)
        signed = request.authenticate(body, service.audiences(), service.clock())
        answer = await service.prove(body, signed)
        return Response(200, answer, {"content-type": "application/octet-stream"})

    router.add("GET", "/health", health)
    router.add("GET", "/metrics", metrics)
    router.add("PUT", SHARE_PATH, put_share)
    router.add("GET", SHARE_PATH, get_share)
    router.add("DELETE", SHARE_PATH, delete_share)
    router.add("POST", "/v1/challenges", challenge)

    async def bad_share_path(request: Request) -> Response:
        raise RemoteProtocolError("invalid share id: expected exactly 64 lowercase hex characters")

    for method in ("PUT", "GET", "DELETE"):  # any other path under /v1/shares/ is a malformed share id: 400
        router.add(method, "/v1/shares/.*", bad_share_path)
    return App(router, on_response=service.metrics.count_request)

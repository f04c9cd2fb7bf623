"""The HTTP edge both daemons share: a small ASGI router, strict request reading, and error translation.

Why not a web framework: the daemons expose a dozen routes, must stream share bodies with a hard size limit,
must route on the *raw* (still percent-encoded) path so that ``..%2f`` can never become a path separator, and
must translate our exception tree to status codes in exactly one place. A hundred lines do that with no
dependency beyond hypercorn (the ASGI server with a native trio worker).

Errors: :class:`~fincryptfs.core.errors.ProtocolError` and ``PolicyError`` become their status with
``{"error": message}``; anything else is a bug, logged with its traceback and answered 500 without details.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from .core.errors import ConfigError, PolicyError, ProtocolError, RemoteProtocolError, TooLargeError
from .core.wire import ReplayGuard, SignedRequest, canonical_json, decode_object, verify_request

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 32 * 1024
DRAIN_BYTES = 8 * 1024 * 1024  # an unread request body up to this size is read and dropped after an early answer
DRAIN_SECONDS = 5.0
# A request body that sends nothing for this long is abandoned (408). Twice the client's 30 s write timeout
# (rpc.DEFAULT_TIMEOUT): an uploader feeds all of an object's shares from one encoder, so a node that stops
# reading pauses the uploads to the other nodes until that timeout drops it; they must not time out first.
BODY_IDLE_SECONDS = 60.0
RECEIVE_BYTES = 256 * 1024  # largest socket read hypercorn's trio worker makes (it hard-codes 64 KiB)
Handler = Callable[["Request"], Awaitable["Response"]]


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    stream: AsyncIterator[bytes] | None = None


def json_response(value: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """An answer in canonical JSON. A value that cannot be encoded is this daemon's fault, not the caller's: a
    500 with the traceback logged, not the 400 that ``canonical_json``'s error would otherwise map to."""
    try:
        body = canonical_json(value)
    except ProtocolError as exc:
        raise ValueError(f"this daemon's answer cannot be encoded: {exc}") from exc
    return Response(status, body, {"content-type": "application/json", **(headers or {})})


def error_response(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


class Request:
    """One HTTP request. The body is read at most once, through a size-limited method."""

    def __init__(self, scope: Mapping[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                 params: dict[str, str]) -> None:
        self.method: str = scope["method"]
        self.raw_path: str = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        self.query_string: str = scope.get("query_string", b"").decode("latin-1")
        self.target = self.raw_path + ("?" + self.query_string if self.query_string else "")
        self.params = params
        self.client: tuple[str, int] | None = scope.get("client")
        headers: dict[str, str] = {}
        total = 0
        for raw_name, raw_value in scope.get("headers", []):
            name = raw_name.decode("latin-1").lower()
            total += len(raw_name) + len(raw_value)
            if name in headers and name.startswith("fincrypt-"):
                raise RemoteProtocolError(f"header {name} given twice")
            headers[name] = raw_value.decode("latin-1")
        if total > MAX_HEADER_BYTES:
            raise RemoteProtocolError("request headers too large", status=431)
        self.headers = headers
        self._receive = receive
        self._consumed = False
        self._finished = False  # the whole body (possibly empty) has been received, or none will come

    def query(self) -> dict[str, str]:
        result: dict[str, str] = {}
        for part in filter(None, self.query_string.split("&")):
            name, _, value = part.partition("=")
            if name in result:
                raise RemoteProtocolError(f"query parameter {name} given twice")
            result[name] = value
        return result

    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        if value is None:
            return None
        if not value.isdigit() or len(value) > 18:
            raise RemoteProtocolError("content-length must be a non-negative integer")
        return int(value)

    async def stream(self, limit: int) -> AsyncIterator[bytes]:
        """The body in chunks; TooLargeError (413) as soon as more than ``limit`` bytes are announced or sent.

        A client that sends nothing for ``BODY_IDLE_SECONDS`` gets 408: hypercorn itself would wait forever, and
        a silent uploader would hold its upload slot and disk reservation as long as its connection stays open.
        """
        if self._consumed:
            raise RuntimeError("request body already read")
        self._consumed = True
        length = self.content_length()
        if length is not None and length > limit:
            raise TooLargeError(f"body of {length} bytes exceeds the limit of {limit}")
        received = 0
        while True:
            with trio.move_on_after(BODY_IDLE_SECONDS) as idle:
                message = await self._receive()
            if idle.cancelled_caught:
                self._finished = True  # nothing to drain from a silent client: answer at once
                raise RemoteProtocolError(f"no body data received for {BODY_IDLE_SECONDS:g} s after {received} "
                                          "bytes: request abandoned, send it again", status=408)
            if message["type"] == "http.disconnect":
                raise RemoteProtocolError("client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                raise TooLargeError(f"body exceeds the limit of {limit} bytes")
            if not message.get("more_body", False):
                self._finished = True
            if chunk:
                yield chunk
            if self._finished:
                break
        if length is not None and received != length:
            raise RemoteProtocolError(f"body has {received} bytes but content-length said {length}")

    async def body(self, limit: int) -> bytes:
        return b"".join([chunk async for chunk in self.stream(limit)])

    async def discard_rest(self, limit: int = DRAIN_BYTES, timeout: float = DRAIN_SECONDS) -> None:
        """Read and drop what is left of the body, so a client still sending it gets our (error) answer.

        A server that answers early and closes makes the client fail with "server disconnected" instead of
        reading, say, the 413 that explains why. Bodies beyond ``limit`` are not drained: the connection
        closes, which is the right answer to a client pushing megabytes it was told not to send.
        """
        if self._finished:
            return
        length = self.content_length()
        if length is not None and length > limit:
            return
        drained = 0
        with trio.move_on_after(timeout):
            while drained <= limit:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    return
                drained += len(message.get("body", b""))
                if not message.get("more_body", False):
                    self._finished = True
                    return

    async def json(self, limit: int = 1 << 20) -> dict[str, Any]:
        return decode_object(await self.body(limit), max_bytes=limit)

    def authenticate(self, body: bytes, audiences: Collection[str], now: float | None = None) -> SignedRequest:
        """Check this request's signature, audience (one of ``audiences``: this daemon's id and origins) and
        freshness (AuthError 401), but not yet its nonce: record that in a ReplayGuard once the signer is known to
        be allowed the request, so that strangers cannot fill the guard."""
        return verify_request(self.headers, self.method, self.target, body, time.time() if now is None else now,
                              audiences)

    def verify_signature(self, body: bytes, guard: ReplayGuard, audiences: Collection[str],
                         now: float | None = None) -> SignedRequest:
        """:meth:`authenticate`, then refuse a replay (401) at once: for routes any signer may call."""
        now = time.time() if now is None else now
        signed = self.authenticate(body, audiences, now)
        guard.check(signed, now)
        return signed


@dataclass(frozen=True)
class _Route:
    method: str
    regex: re.Pattern[str]
    handler: Handler
    name: str


class Router:
    """Routes on the raw path: ``{name}`` matches one segment of ``[A-Za-z0-9._~-]`` (no ``%``, no ``/``)."""

    def __init__(self) -> None:
        self._routes: list[_Route] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]*)", pattern)
        self._routes.append(_Route(method, re.compile(regex), handler, pattern))

    def match(self, method: str, raw_path: str) -> tuple[_Route, dict[str, str]]:
        allowed = []
        for route in self._routes:
            found = route.regex.fullmatch(raw_path)
            if found:
                if route.method == method:
                    return route, found.groupdict()
                allowed.append(route.method)
        if allowed:
            raise RemoteProtocolError(f"method {method} not allowed here (allowed: {', '.join(allowed)})",
                                      status=405)
        raise RemoteProtocolError(f"no such endpoint: {raw_path[:100]}", status=404)


class App:
    """An ASGI application over a Router; ``on_response`` lets a daemon count requests for its metrics."""

    def __init__(self, router: Router, on_response: Callable[[str, int], None] | None = None) -> None:
        self.router = router
        self.on_response = on_response

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        route_name = "unmatched"
        request: Request | None = None
        try:
            route, params = self.router.match(scope["method"], scope.get("raw_path", b"").decode("latin-1")
                                              or scope["path"])
            route_name = route.name
            request = Request(scope, receive, params)
            response = await route.handler(request)
        except (ProtocolError, PolicyError) as exc:
            response = error_response(exc.status, str(exc))
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("internal error in %s %s", scope["method"], scope.get("path"))
            response = error_response(500, "internal error (logged on the server)")
        if self.on_response is not None:
            self.on_response(route_name, response.status)
        if request is not None and response.status >= 400:
            await request.discard_rest()
        try:
            await _send_response(send, response)
        except trio.BusyResourceError:
            # A client that ends its body before its content-length breaks the HTTP framing: hypercorn answers
            # 400 itself and closes the socket while we still answer, and its trio worker lets our send run into
            # that close instead of dropping it. The connection is gone; there is no one left to answer.
            log.debug("answer to %s %s dropped: the connection is being closed", scope["method"], scope.get("path"))


async def _send_response(send: Any, response: Response) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()]
    if response.stream is None:
        headers.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    if response.stream is None:
        await send({"type": "http.response.body", "body": response.body})
        return
    async for chunk in response.stream:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def _enlarge_receives() -> None:
    """Let hypercorn read the socket in ``RECEIVE_BYTES`` instead of 64 KiB.

    Every read costs a trip through trio's epoll, h11's event loop and the ASGI queue; at 64 KiB that was most
    of the server's CPU per MB of an upload. Hypercorn has no setting for it, only the module constant
    ``MAX_RECV`` that ``TCPServer._read_data`` looks up at each read, so we set that constant (a test fails if
    hypercorn stops reading it). Memory per request body in flight stays bounded: one read in h11's buffer plus
    hypercorn's queue of ``max_app_queue_size`` (10) messages for the app, under 3 MiB. Not 1 MiB reads with a
    shorter queue: hypercorn blocks a keep-alive connection when the app answers without reading the body and
    the queue is full (it still has to queue ``http.disconnect``), so the queue must stay deep enough for small
    unread bodies.
    """
    from hypercorn.trio import tcp_server

    tcp_server.MAX_RECV = RECEIVE_BYTES


def _contain_send_races() -> None:
    """Keep hypercorn's send race on one connection from stopping the whole server.

    When a client ends its body before its content-length (it half-closes, or its bytes after the body break the
    framing) while we answer early, hypercorn's trio worker answers 400 itself and closes the socket while the
    answer is still being sent; the two meet as ``trio.BusyResourceError`` in one of its own tasks, which
    ``TCPServer.run`` does not catch, and it ends the listener's nursery: the daemon stopped. Such a connection is
    being closed anyway, so its error ends that connection only.
    """
    from hypercorn.trio import tcp_server

    if getattr(tcp_server.TCPServer.run, "contains_send_races", False):
        return
    run = tcp_server.TCPServer.run

    async def contained_run(self: tcp_server.TCPServer) -> None:
        try:
            await run(self)
        except* trio.BusyResourceError:
            log.debug("connection dropped: it was closed while an answer was being sent")

    contained_run.contains_send_races = True  # type: ignore[attr-defined]
    tcp_server.TCPServer.run = contained_run  # type: ignore[method-assign]


async def serve_app(app: App, host: str, port: int, *,
                    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` with hypercorn's trio worker until cancelled; reports the bound base URL (port 0 works)."""
    _enlarge_receives()
    _contain_send_races()
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.h11_max_incomplete_size = MAX_HEADER_BYTES
    config.keep_alive_timeout = 30
    config.graceful_timeout = 2

    async def relay(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, config, task_status=task_status)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        try:
            binds = await nursery.start(relay)
        except (OSError, ExceptionGroup) as exc:  # the port is taken, or the host is not this machine's
            cause = _sole_os_error(exc)
            if cause is None:
                raise
            raise ConfigError(f"cannot listen on {config.bind[0]}: {cause.strerror} (set the *_LISTEN setting "
                              "to a HOST:PORT of this machine that no other program uses)") from exc
        task_status.started(binds[0])


def _sole_os_error(exc: BaseException) -> OSError | None:
    """``exc`` if it is an OSError, or the one OSError inside nested groups of one (hypercorn's nurseries)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, OSError) else None


def dumps(value: Any) -> str:
    """Human-readable JSON for CLIs and logs (never for signing: use canonical_json)."""
    return json.dumps(value, indent=2, sort_keys=True)

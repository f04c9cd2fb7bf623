"""The HTTP client edge: signed calls to mediators and storage nodes, errors translated once.

httpx exceptions never leave this module: a peer that cannot be reached or answers with an error becomes a
:class:`PeerError` whose message names the peer and, where it sent one, its own explanation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import httpx
import trio

from .core.errors import FincryptError
from .core.identity import SigningKey
from .core.wire import canonical_json, decode_object, origin_of, sign_request

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


class PeerError(FincryptError):
    """A peer was unreachable or refused a request. ``status`` is None when it could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def unreachable(self) -> bool:
        return self.status is None


def new_client(timeout: httpx.Timeout = DEFAULT_TIMEOUT, max_connections: int = 64) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False, trust_env=False)


def signed_headers(key: SigningKey, method: str, url: str, body: bytes, audience: str | None = None
                   ) -> dict[str, str]:
    """Signature headers for one request to ``url``, addressed to ``audience``: the recipient's node id where the
    caller knows it, else the URL's origin (so the recipient cannot replay the request to another peer)."""
    target = httpx.URL(url).raw_path.decode("ascii")
    return sign_request(key, method, audience or origin_of(url), target, body, time.time())


def why_unreachable(exc: Exception) -> str:
    """What went wrong with a request that got no answer, in words (httpx's class names mean nothing to a user,
    and a timeout's own message is often empty)."""
    if isinstance(exc, httpx.TimeoutException):
        reason = "no answer in time"
    elif isinstance(exc, httpx.ConnectError):
        reason = "cannot connect"
    elif isinstance(exc, (httpx.NetworkError, httpx.RemoteProtocolError)):
        reason = "the connection broke"
    elif isinstance(exc, (httpx.InvalidURL, httpx.UnsupportedProtocol, ValueError)):
        reason = "unusable URL"
    else:
        reason = "the request failed"
    return f"{reason} ({exc})" if str(exc) else reason


async def call(client: httpx.AsyncClient, method: str, url: str, *, key: SigningKey | None = None,
               json: Any = None, content: bytes | None = None, headers: Mapping[str, str] | None = None,
               timeout: httpx.Timeout | float | None = None, audience: str | None = None,
               max_answer: int | None = None, deadline: float = math.inf) -> httpx.Response:
    """Send one request (signed with ``key`` if given, for ``audience``: see signed_headers) and return the 2xx
    response, or raise PeerError.

    ``max_answer``: read at most that many bytes of the answer, PeerError beyond (otherwise a peer could make
    the caller buffer whatever it sends). ``deadline``: seconds for the whole exchange, however the peer paces
    its bytes: httpx's timeouts are per read, and a peer sending a byte every few seconds never trips them.
    """
    body = canonical_json(json) if json is not None else (content or b"")
    all_headers = dict(headers or {})
    if json is not None:
        all_headers["content-type"] = "application/json"
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    try:
        with trio.fail_after(deadline):
            if key is not None:  # inside: an unusable URL has no origin to sign for (ValueError)
                all_headers.update(signed_headers(key, method, url, body, audience))
            if max_answer is None:
                response = await client.request(method, url, content=body, headers=all_headers, **kwargs)
            else:
                response = await _request_capped(client, client.build_request(
                    method, url, content=body, headers=all_headers, **kwargs), max_answer)
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        # InvalidURL is no HTTPError: a peer that announced an unusable URL is unreachable, not a crash
        raise PeerError(f"{_peer(url)} is unreachable: {why_unreachable(exc)}") from exc
    except trio.TooSlowError as exc:
        raise PeerError(f"{_peer(url)} did not answer {method} {httpx.URL(url).path} within {deadline:g} s (too "
                        "slow or stalling); try again later") from exc
    if response.status_code >= 300:
        raise PeerError(f"{_peer(url)} refused {method} {response.request.url.path}: {response.status_code} "
                        f"{_error_text(response)}", response.status_code)
    return response


async def _request_capped(client: httpx.AsyncClient, request: httpx.Request, limit: int) -> httpx.Response:
    """``request``'s response with its body read up to ``limit`` bytes (asked uncompressed and read raw, as
    ``read_at_most`` does: a small compressed answer cannot expand past the limit); PeerError beyond."""
    request.headers["accept-encoding"] = "identity"
    response = await client.send(request, stream=True)
    try:
        body, whole = await read_at_most(response, limit)
    finally:
        await response.aclose()
    if not whole:
        raise PeerError(f"{_peer(str(request.url))} sent an answer to {request.method} {request.url.path} longer "
                        f"than {limit} bytes", response.status_code)
    kept = [(name, value) for name, value in response.headers.multi_items()
            if name.lower() not in ("content-length", "transfer-encoding")]
    return httpx.Response(response.status_code, headers=kept, content=body, request=request)


async def read_at_most(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """The body of a streamed ``response``, read up to ``limit`` bytes; and whether that was all of it.

    So that a peer cannot make us buffer whatever it sends (the client's reads cap their GETs the same way).
    Raw bytes, never decompressed: a small compressed answer cannot expand past the limit either.
    """
    body = bytearray()
    async for chunk in response.aiter_raw():
        if len(body) + len(chunk) > limit:
            body += chunk[:limit - len(body)]
            return bytes(body), False
        body += chunk
    return bytes(body), True


async def call_json(client: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
    response = await call(client, method, url, **kwargs)
    try:
        return decode_object(response.content, max_bytes=64 << 20)
    except FincryptError as exc:
        raise PeerError(f"{_peer(url)} sent a malformed answer: {exc}", response.status_code) from exc


def _peer(url: str) -> str:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        return f"peer at unusable URL {url[:80]!r}"
    return f"peer {parsed.scheme}://{parsed.host}:{parsed.port}" if parsed.port else f"peer {parsed.host}"


def _error_text(response: httpx.Response) -> str:
    try:
        value = decode_object(response.content, max_bytes=65536)
        return str(value.get("error", ""))[:500]
    except FincryptError:
        return response.text[:200]

"""Hostile HTTP for the daemons' fuzz tests: requests sent byte for byte, answers held to docs/protocol.md.

The requests go over a plain socket exactly as built (no client-side normalisation of ``..`` or ``%2e``, any
header twice, a content-length that lies), from the test's own thread while the daemon runs on its trio loop in
another. ``check_answer`` holds an answer to the error contract: never a 5xx, and every 4xx a JSON
``{"error": message}``. ``JSON_MUTATIONS`` turns a valid message into a hostile one (a field of the wrong type,
out of range, missing, unknown or given twice; NaN, floats, deep nesting, NUL bytes, lone surrogates ...), and
``db_snapshot`` reads a daemon's SQLite state from a second connection so a test can tell that a refused request
changed nothing; ``logged_errors`` collects what the daemon logged as an error (a traceback is a bug too).
"""

from __future__ import annotations

import json
import logging
import socket
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from hypothesis import strategies as st

from fincryptfs.core.errors import RemoteProtocolError
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.wire import Envelope


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> str:
        return str(json.loads(self.body).get("error", ""))


def exchange(url: str, method: str, target: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b"", *,
             content_length: int | None = None, timeout: float = 10.0) -> Answer | None:
    """Send one request (``connection: close``) and read the whole answer; None if the daemon closed without one
    (or, to a request whose content-length lied, with half of one).

    ``content_length`` other than ``len(body)`` lies: a larger one is followed by a half-close, so the daemon
    sees the body end early instead of waiting for bytes that never come."""
    parsed = httpx.URL(url)
    assert parsed.port is not None
    length = len(body) if content_length is None else content_length
    lines = [f"{method} {target} HTTP/1.1", f"host: {parsed.host}:{parsed.port}", f"content-length: {length}",
             "connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    with socket.create_connection((parsed.host, parsed.port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if length > len(body):
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon answered early and closed: read what it said
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    if not received:
        return None
    head, _, rest = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    assert status_line.startswith("HTTP/1.1 "), received[:200]
    answer_headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        answer_headers[name.strip().lower()] = value.strip()
    if "content-length" in answer_headers:
        announced = int(answer_headers["content-length"])
        if len(rest) < announced and length != len(body):
            return None  # cut short: the body that lied about its length made hypercorn close the connection
        assert method == "HEAD" or len(rest) >= announced, (method, target, received[:300])
        rest = rest[:announced]
    return Answer(int(status_line[9:12]), answer_headers, rest)


def check_answer(answer: Answer | None, what: object) -> None:
    """No 5xx; a 4xx carries a JSON ``{"error": ...}`` a person can read."""
    if answer is None:
        return
    assert answer.status < 500, (what, answer)
    if answer.status >= 400:
        assert answer.headers.get("content-type") == "application/json", (what, answer)
        message = answer.error()
        assert message and message.isprintable() and "Traceback" not in message, (what, answer)


class ErrorLog(logging.Handler):
    """Every record of level ERROR or above, from any logger (hypercorn's "Error in ASGI Framework" included)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()} {r.exc_info[1]!r}" if r.exc_info else f"{r.name}: {r.getMessage()}"
                for r in self.records]


@contextmanager
def logged_errors() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    logging.getLogger().addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)


def db_snapshot(path: Path, skip: Iterable[str] = ()) -> dict[str, list[str]]:
    """Every row of every table (but ``skip``) of the SQLite database at ``path``, read through its own
    connection."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: sorted(repr(row) for row in conn.execute(f'SELECT * FROM "{t}"'))
                for t in tables if t not in set(skip)}
    finally:
        conn.close()


# --- hostile JSON ---------------------------------------------------------------------------------------------

_RAW = "\x00raw:"  # "\x00raw:3" stands for RAW_TOKENS[3], written into the JSON text as is (NaN, 1e400, ...)
RAW_TOKENS = ["NaN", "Infinity", "-Infinity", "1e400", "1.5", "-0.0", "1E5", "0x10", "01", "-", "tru",
              "[" * 3000 + "]" * 3000, '{"a":' * 2000 + "1" + "}" * 2000, "1" * 5000, "-" + "9" * 30]
HOSTILE_STRINGS = ["", "\x00", "a\x00b", "\ud800", "\udfff", "é", "日本", "\u202e", "../../etc/passwd", "%2e%2e%2f",
                   "..", "0" * 64, "F" * 64, "g" * 64, "0" * 63, "0" * 65, "x" * 100_000, "http://[::1",
                   "http://a:0/", "http://a:99999/", " ", "\n", "\\"]
HOSTILE_INTS = [-1, 0, 1, 255, 256, 2**31, 2**32, 2**50 + 1, 2**53 + 1, 2**60 + 1, 2**62, 2**63 - 1, -(2**63),
                2**63, 2**64, 10**30, 10**15 + 1]
HOSTILE_VALUES = st.one_of(
    st.none(), st.booleans(), st.sampled_from(HOSTILE_INTS), st.integers(),
    st.sampled_from(HOSTILE_STRINGS), st.text(max_size=30),
    st.sampled_from([f"{_RAW}{i}" for i in range(len(RAW_TOKENS))]),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.sampled_from(["a", "v", "body"]), st.none(),
                                                               max_size=2),
    st.recursive(st.none() | st.integers() | st.text(max_size=5),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                 max_leaves=6),
)


def dump(value: Any, ascii: bool = True) -> bytes:
    """JSON text of ``value``, with the RAW_TOKENS it names written in raw (``ascii=False``: strings in UTF-8,
    a lone surrogate as the bytes no decoder accepts)."""
    text = json.dumps(value, ensure_ascii=ascii)
    for index, token in enumerate(RAW_TOKENS):
        text = text.replace(json.dumps(f"{_RAW}{index}", ensure_ascii=ascii), token)
    return text.encode("utf-8", "surrogatepass")


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, prefix + (index,))


def _edit(value: Any, path: tuple[Any, ...], op: str, new: Any) -> Any:
    if not path:
        return new if op == "set" else value
    head, rest = path[0], path[1:]
    copy: Any = dict(value) if isinstance(value, dict) else list(value)
    if rest:
        copy[head] = _edit(copy[head], rest, op, new)
    elif op == "set":
        copy[head] = new
    elif op == "delete":
        del copy[head]
    return copy


@st.composite
def mutated_value(draw: st.DrawFn, template: Any) -> Any:
    """``template`` (a valid message) with one to three hostile edits: a field set to a hostile value, removed,
    or added. Strings that stand for RAW_TOKENS become raw JSON text in :func:`dump`."""
    value = template
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(value))))
        op = draw(st.sampled_from(["set", "set", "set", "delete", "extra"]))
        target = value
        for step in path:
            target = target[step]
        if op == "extra" and isinstance(target, dict):
            extra = {**target, draw(st.sampled_from(["extra", "v", ""])): draw(HOSTILE_VALUES)}
            value = _edit(value, path, "set", extra)
        elif op == "delete" and path:
            value = _edit(value, path, "delete", None)
        else:
            value = _edit(value, path, "set", draw(HOSTILE_VALUES))
    return value


@st.composite
def mutated(draw: st.DrawFn, template: Any) -> bytes:
    """:func:`mutated_value` as JSON text, sometimes with a top-level key given twice."""
    value = draw(mutated_value(template))
    text = dump(value, draw(st.booleans()))
    if isinstance(template, dict) and template and text.startswith(b"{") and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(template)))
        text = b"{" + dump({key: draw(HOSTILE_VALUES)})[1:-1] + b"," + text[1:]
    return text


@st.composite
def sealed(draw: st.DrawFn, kind: str, body: dict[str, Any], key: SigningKey) -> dict[str, Any]:
    """An envelope of ``kind`` whose signature by ``key`` is good but whose body is ``body`` mutated: the
    hostile content a legitimate signer could send (a body canonical JSON cannot carry is left unsigned)."""
    value = draw(mutated_value(body))
    try:
        return Envelope.seal(kind, value, key).to_json() if isinstance(value, dict) else value
    except RemoteProtocolError:
        return {"v": 1, "kind": kind, "signer": key.public.to_text(), "body": value, "sig": "A" * 86}


def hostile_body(template: Any) -> st.SearchStrategy[bytes]:
    """A body for a signed request: mostly ``template`` mutated, sometimes no JSON or no object at all."""
    return st.one_of(
        mutated(template), mutated(template), mutated(template),
        st.just(dump(template)),
        st.binary(max_size=300),
        HOSTILE_VALUES.map(dump),
        st.sampled_from([b"", b"{", b"[]", b"null", b"\xff\xfe{}", b'{"a":1}' * 3, b"\x00" * 100,
                         dump(template) + b"x", b" " * 10 + dump(template)]),
    )

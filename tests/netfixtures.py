"""A whole Fincrypt network inside one trio nursery: one real mediatord and N real storaged on 127.0.0.1.

Usage (under pytest-trio)::

    async def test_x(tmp_path, nursery):
        net = await start_network(tmp_path, nursery, nodes=6, MEDIATORD_AUDIT_PERIOD="1")
        ... net.mediator_url, net.nodes[0].url, net.nodes[0].share_dirs ...
        await net.stop_node(0)        # the node's task ends; its files stay
        await net.restart_node(0)     # same identity, same port, same files

    net = await start_network(tmp_path, nursery, gated=True)
        net.hold()                    # every node keeps its connections open and answers nothing ...
        net.release()                 # ... until released: uploads stay unfinished for as long as a test needs

Keyword overrides are environment variables for the role their prefix names (``MEDIATORD_*`` for the mediator,
``STORAGED_*`` for every node). Everything is cancelled with the nursery, so a failing test leaves nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import httpx
import trio

from fincryptfs.core.settings import MediatorSettings, StorageSettings

DEFAULT_NODE_CAPACITY = "2G"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie counts as dead: it only waits to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
RELAY_CHUNK = 256 * 1024


class Gate:
    """A TCP relay on 127.0.0.1 in front of one node (its public URL), which a test can hold shut.

    While held, bytes stop flowing both ways on open connections and new ones are accepted but not forwarded, so
    a transfer in progress stays in progress: a deterministic "upload still running" for crash tests, where
    waiting for the right moment would race a fast machine.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.port = 0
        self.delay = delay  # seconds added to every forwarded read: a WAN-like round trip on loopback
        self.target: tuple[str, int] | None = None
        self.flip_at: int | None = None  # once: flip the byte this far into the next request stream to the node
        self.flipped = False
        self.trickle: float | None = None  # answers go back one byte every this many seconds: a node that never
        # pauses long enough for a per-read timeout, yet never finishes
        self.accepted = 0  # connections accepted so far (forwarded or held)
        self._open = trio.Event()
        self._open.set()

    def hold(self) -> None:
        if self._open.is_set():
            self._open = trio.Event()

    def release(self) -> None:
        self._open.set()

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream, *, to_node: bool = False) -> None:
        seen = 0
        while data := await source.receive_some(RELAY_CHUNK):
            await self._open.wait()
            if self.delay:
                await trio.sleep(self.delay)
            if to_node and self.flip_at is not None and seen <= self.flip_at < seen + len(data):
                damaged = bytearray(data)
                damaged[self.flip_at - seen] ^= 0x01
                data, self.flip_at, self.flipped = bytes(damaged), None, True
            seen += len(data)
            if not to_node and (trickle := self.trickle) is not None:
                for at in range(len(data)):
                    await sink.send_all(data[at:at + 1])
                    await trio.sleep(trickle)
                continue
            await sink.send_all(data)
        await sink.send_eof()

    async def _relay(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        await self._open.wait()
        assert self.target is not None
        try:
            async with client, await trio.open_tcp_stream(*self.target) as upstream, trio.open_nursery() as pumps:
                pumps.start_soon(partial(self._pump, client, upstream, to_node=True))
                pumps.start_soon(self._pump, upstream, client)
        except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # either side went away (alone, or in the pumps' group): so does the relayed connection

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._relay, listeners)


@dataclass
class Node:
    """One storage node of the network. ``cancel_scope`` stops it; ``share_dirs`` hold its share files."""

    index: int
    url: str
    node_id: str
    settings: StorageSettings
    cancel_scope: trio.CancelScope
    share_dirs: list[Path]
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def running(self) -> bool:
        return not self.stopped.is_set()


@dataclass
class Network:
    mediator_url: str
    mediator_settings: MediatorSettings
    nodes: list[Node]
    nursery: trio.Nursery
    root: Path
    gates: list[Gate] = field(default_factory=list)

    def hold(self) -> None:
        """Hold every node's gate shut (needs ``start_network(..., gated=True)``)."""
        if not self.gates:
            raise RuntimeError("this network was started without gates")
        for gate in self.gates:
            gate.hold()

    def release(self) -> None:
        for gate in self.gates:
            gate.release()

    @property
    def node_urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def node_by_id(self, node_id: str) -> Node:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(node_id)

    def node_by_url(self, url: str) -> Node:
        for node in self.nodes:
            if node.url == url.rstrip("/"):
                return node
        raise KeyError(url)

    async def stop_node(self, index: int) -> None:
        """Stop one node (as if its process died) and wait until its server is closed."""
        node = self.nodes[index]
        node.cancel_scope.cancel()
        await node.stopped.wait()

    async def restart_node(self, index: int) -> Node:
        """Start a stopped node again on its old port, with its identity and shares."""
        old = self.nodes[index]
        if old.running:
            await self.stop_node(index)
        node = await _start_node(self.nursery, index, old.settings)
        self.nodes[index] = node
        return node

    async def wait_listed(self, count: int | None = None, timeout: float = 20.0) -> None:
        """Wait until the mediator lists ``count`` nodes (default: all running ones) as online."""
        await wait_listed(self.mediator_url, count if count is not None else sum(n.running for n in self.nodes),
                          timeout)


async def wait_listed(mediator_url: str, count: int, timeout: float = 20.0) -> list[dict[str, object]]:
    async with httpx.AsyncClient(trust_env=False) as client:
        with trio.fail_after(timeout):
            while True:
                try:
                    answer = (await client.get(f"{mediator_url}/v1/nodes")).json()
                    nodes = [n for n in answer.get("nodes", []) if n.get("state", "online") == "online"]
                    if len(nodes) >= count:
                        return nodes
                except (httpx.HTTPError, ValueError):
                    pass
                await trio.sleep(0.05)


async def _run_node(settings: StorageSettings, cancel_scope: trio.CancelScope, stopped: trio.Event, *,
                    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    from storaged.daemon import serve

    try:
        with cancel_scope:
            await serve(settings, task_status=task_status)
    finally:
        stopped.set()


async def _start_node(nursery: trio.Nursery, index: int, settings: StorageSettings) -> Node:
    scope, stopped = trio.CancelScope(), trio.Event()
    url = await nursery.start(_run_node, settings, scope, stopped)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    if settings.listen[1] == 0:  # pin the port so a restart comes back at the same address
        settings = replace(settings, listen=(settings.listen[0], port))
    async with httpx.AsyncClient(trust_env=False) as client:
        node_id = (await client.get(f"{url}/health")).json()["node_id"]
    return Node(index, url.rstrip("/"), node_id, settings, scope, [d.path for d in settings.share_dirs], stopped)


async def _run_mediator(settings: MediatorSettings, *,
                        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    from mediatord.daemon import serve

    await serve(settings, task_status=task_status)


async def start_network(tmp_path: Path, nursery: trio.Nursery, nodes: int = 6, *,
                        node_env: Mapping[int, Mapping[str, str]] | None = None, gated: bool = False,
                        gate_delay: float = 0.0, **overrides: str) -> Network:
    """Start a mediator and ``nodes`` storage nodes announcing to it; return once the mediator lists them all.

    ``node_env`` adds settings for single nodes by index (e.g. ``{0: {"STORAGED_PUBLIC_URL": proxy_url}}``).
    ``gated`` puts a ``Gate`` in front of every node (its public URL), for ``Network.hold``/``release``;
    ``gate_delay`` makes each gate add that many seconds to every read it forwards (a slower network).
    """
    unknown = [k for k in overrides if not k.startswith(("MEDIATORD_", "STORAGED_"))]
    if unknown:
        raise ValueError(f"start_network overrides must be MEDIATORD_* or STORAGED_* variables, not {unknown}")
    root = tmp_path / "net"
    root.mkdir(parents=True, exist_ok=True)
    mediator_env = {"MEDIATORD_LISTEN": "127.0.0.1:0", "MEDIATORD_DATA_DIR": str(root / "mediator")}
    mediator_env.update({k: str(v) for k, v in overrides.items() if k.startswith("MEDIATORD_")})
    mediator_settings = MediatorSettings.from_env(mediator_env, home=root)
    mediator_url = (await nursery.start(_run_mediator, mediator_settings)).rstrip("/")
    started: list[Node] = []
    gates: list[Gate] = []
    for index in range(nodes):
        node_root = root / f"node{index}"
        env = {"STORAGED_LISTEN": "127.0.0.1:0", "STORAGED_DATA_DIR": str(node_root),
               "STORAGED_SHARE_DIRS": f"{node_root / 'shares'}:{DEFAULT_NODE_CAPACITY}",
               "STORAGED_RESERVE_BYTES": "0", "STORAGED_MEDIATORS": mediator_url,
               "STORAGED_ANNOUNCE_INTERVAL": "1", "STORAGED_OPERATOR": f"op{index}"}
        env.update({k: str(v) for k, v in overrides.items() if k.startswith("STORAGED_")})
        if gated:
            gate = Gate(gate_delay)
            gates.append(gate)
            env["STORAGED_PUBLIC_URL"] = f"http://127.0.0.1:{await nursery.start(gate.serve)}"
        env.update((node_env or {}).get(index, {}))
        node = await _start_node(nursery, index, StorageSettings.from_env(env, home=node_root))
        if gated:
            gates[-1].target = node.settings.listen
        started.append(node)
    net = Network(mediator_url, mediator_settings, started, nursery, root, gates)
    await net.wait_listed(nodes)
    return net

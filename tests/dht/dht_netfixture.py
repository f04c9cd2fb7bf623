"""Real DHT networks on loopback: each node binds its own 127.x.y.z address (Linux routes all of 127/8 to lo),
so per-IP limits see distinct hosts as they would on the internet."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import trio

from fincryptfs.core.identity import SigningKey
from fincryptfs.dht.node import DhtNode, DhtParams, serve

# Generous per-query timeout: one process runs every node on 2 shared cores, and a response that arrives late
# counts as a lost node. Tests of churn pass a shorter one so dead nodes cost less time.
TEST_PARAMS = DhtParams(query_timeout=1.0, lookup_timeout=10.0)

def loopback_host(i: int, net: int = 0) -> str:
    return f"127.{net}.{i // 250}.{i % 250 + 1}"

async def _scoped_node(key: SigningKey, listen: tuple[str, int], bootstrap: list[tuple[str, int]],
                       params: DhtParams, *, task_status: trio.TaskStatus[tuple[DhtNode, trio.CancelScope]]
                       ) -> None:
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            node = await nursery.start(functools.partial(serve, key, listen, bootstrap, params=params))
            task_status.started((node, scope))

@dataclass
class Network:
    nursery: trio.Nursery
    nodes: list[DhtNode] = field(default_factory=list)
    scopes: dict[int, trio.CancelScope] = field(default_factory=dict)

    async def add(self, host: str, *, key: SigningKey | None = None, bootstrap: list[tuple[str, int]] | None = None,
                  params: DhtParams = TEST_PARAMS, port: int = 0) -> DhtNode:
        if bootstrap is None:
            bootstrap = [self.nodes[0].address] if self.nodes else []
        node, scope = await self.nursery.start(_scoped_node, key or SigningKey.generate(), (host, port), bootstrap,
                                               params)
        self.nodes.append(node)
        self.scopes[id(node)] = scope
        return node

    async def grow(self, count: int, *, net: int = 0, start: int = 0, params: DhtParams = TEST_PARAMS
                   ) -> list[DhtNode]:
        added = [await self.add(loopback_host(start + i, net), params=params) for i in range(count)]
        await self.settle()
        return added

    async def settle(self, timeout: float = 30.0) -> None:
        """Wait until no node is still verifying contacts that queried it. Right after a mass join those
        background pings lag on a loaded machine, and until they answer the newcomers are missing from older
        nodes' tables: an announce made then can land on nodes that are not the nearest to its key (found by
        a test that failed about once in 20 runs under load; on a real network, republishing heals it)."""
        with trio.fail_after(timeout):
            while any(node.verifications_pending for node in self.nodes):
                await trio.sleep(0.05)

    def stop(self, node: DhtNode) -> None:
        """The node leaves: its socket closes, it answers nothing more."""
        self.scopes.pop(id(node)).cancel()
        self.nodes.remove(node)


def total(nodes: list[DhtNode], counter: str) -> int:
    return sum(n.counters[counter] for n in nodes)

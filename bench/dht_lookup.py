"""Median hops and time of a DHT lookup in a loopback network of real UDP nodes (default 1,000).

Each node binds its own 127.x.y.z address and joins through the first node; then random nodes look up random
node ids and the mediators key. Prints a human summary, then one JSON line (last line) for tooling.
Usage: python bench/dht_lookup.py [--nodes N] [--lookups L]
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import time

import trio

from fincryptfs.core.identity import SigningKey
from fincryptfs.dht.node import DhtParams, serve

PARAMS = DhtParams(query_timeout=1.0, lookup_timeout=10.0)


def host(i: int) -> str:
    return f"127.1.{i // 250}.{i % 250 + 1}"


async def run(nodes_wanted: int, lookups: int) -> dict[str, object]:
    rng = random.Random(42)
    async with trio.open_nursery() as nursery:
        started = time.perf_counter()
        nodes = [await nursery.start(functools.partial(serve, SigningKey.generate(), (host(0), 0), [],
                                                       params=PARAMS))]
        for i in range(1, nodes_wanted):
            bootstrap = [rng.choice(nodes).address]
            nodes.append(await nursery.start(functools.partial(serve, SigningKey.generate(), (host(i), 0),
                                                               bootstrap, params=PARAMS)))
        join_seconds = time.perf_counter() - started
        hops, seconds, queries, found = [], [], [], 0
        for _ in range(lookups):
            source, target = rng.sample(nodes, 2)
            t0 = time.perf_counter()
            result = await source.lookup(target.id)
            seconds.append(time.perf_counter() - t0)
            hops.append(result.hops)
            queries.append(result.queries)
            found += bool(result.contacts) and result.contacts[0].id == target.id
        mediator = nodes[rng.randrange(len(nodes))]
        await mediator.announce_mediator("http://127.1.250.1:8700")
        t0 = time.perf_counter()
        records = await rng.choice(nodes).find_mediators()
        find_seconds = time.perf_counter() - t0
        table_sizes = [len(n.table) for n in nodes]
        nursery.cancel_scope.cancel()
    return {
        "bench": "dht_lookup", "nodes": nodes_wanted, "lookups": lookups,
        "median_hops": statistics.median(hops), "max_hops": max(hops),
        "median_lookup_ms": round(1000 * statistics.median(seconds), 2),
        "p90_lookup_ms": round(1000 * sorted(seconds)[int(0.9 * len(seconds))], 2),
        "median_queries": statistics.median(queries), "found_target": found / lookups,
        "find_mediators_ms": round(1000 * find_seconds, 2), "mediator_found": len(records) == 1,
        "median_table_size": statistics.median(table_sizes), "join_seconds": round(join_seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--lookups", type=int, default=100)
    args = parser.parse_args()
    result = trio.run(run, args.nodes, args.lookups)
    print(f"{result['nodes']} nodes: median {result['median_hops']} hops, {result['median_lookup_ms']} ms per lookup "
          f"(p90 {result['p90_lookup_ms']} ms), target found in {result['found_target']:.0%} "
          f"[join took {result['join_seconds']} s]")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()

"""The ``network`` fixture: a DHT network on loopback that is torn down (every socket closed) after the test."""

from collections.abc import AsyncIterator

import pytest
import trio
from dht_netfixture import Network


@pytest.fixture
async def network() -> AsyncIterator[Network]:
    async with trio.open_nursery() as nursery:
        yield Network(nursery)
        nursery.cancel_scope.cancel()

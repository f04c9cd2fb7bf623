"""fincryptfs.rpc: whatever goes wrong reaching a peer becomes a PeerError, never a raw httpx error."""

from __future__ import annotations

import pytest

from fincryptfs import rpc
from fincryptfs.core.identity import SigningKey


@pytest.mark.parametrize("url", ["http://[::1/v1/challenges", "http://[x/v1", "http://1.2.3.999/v1"])
async def test_an_unusable_url_is_an_unreachable_peer(url: str) -> None:
    async with rpc.new_client() as client:
        for key in (None, SigningKey.generate()):  # signing parses the URL too
            with pytest.raises(rpc.PeerError) as info:
                await rpc.call(client, "POST", url, key=key, json={})
            assert info.value.unreachable and "unreachable" in str(info.value)

"""fincryptfs.rpc: whatever goes wrong reaching a peer becomes a PeerError, never a raw httpx error."""

from __future__ import annotations

import socket

import httpx
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


async def test_an_unreachable_peer_is_explained_in_words() -> None:
    """The message once read "ConnectError all attempts to connect to ... failed": httpx's class names."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1/info"
    async with rpc.new_client() as client:
        with pytest.raises(rpc.PeerError, match=r"is unreachable: cannot connect \(") as info:
            await rpc.call(client, "GET", url)
    assert "Error" not in str(info.value), str(info.value)
    assert rpc.why_unreachable(httpx.ReadTimeout("")) == "no answer in time"
    assert rpc.why_unreachable(httpx.RemoteProtocolError("peer closed connection")) == (
        "the connection broke (peer closed connection)")

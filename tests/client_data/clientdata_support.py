"""Shared pieces of the data-path tests: a client ObjectStore talking to a real network."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from fincryptfs import rpc
from fincryptfs.core.crypto import account_signing_key, new_master_key
from fincryptfs.objectstore import ObjectStore

MARKER = b"FINCRYPT-PLAINTEXT-MARKER-7f3a9c"


@asynccontextmanager
async def open_store(mediator_url: str, tmp_path: Path, *, master_key: bytes | None = None, segment_size: int = 65536,
                     k: int = 3, n: int = 6, happy: int = 5, hedge_after: float = 2.0,
                     run_share_bytes: int = 8 * 2**20) -> AsyncIterator[ObjectStore]:
    spool = tmp_path / f"spool-{trio.current_time():.6f}"
    spool.mkdir(mode=0o700)
    async with rpc.new_client() as http:
        yield ObjectStore(mediator_url=mediator_url, account_key=account_signing_key(master_key or new_master_key()),
                          k=k, n=n, happy=happy, segment_size=segment_size, spool_dir=spool, http=http,
                          cpu=trio.CapacityLimiter(2), hedge_after=hedge_after,
                          run_share_bytes=run_share_bytes)

"""Run a daemon's ``serve`` in the foreground until SIGINT or SIGTERM, then stop it cleanly; load its settings.

Both daemons' CLIs use this, so Ctrl-C and ``kill`` behave the same for every Fincrypt process: the signal
cancels the one nursery, every task unwinds through its ``finally`` blocks, and the process exits 0. They find
their settings the same way too (``load_settings``).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from .core.settings import MediatorSettings, StorageSettings, read_env_file

DaemonSettings = TypeVar("DaemonSettings", StorageSettings, MediatorSettings)

log = logging.getLogger(__name__)


async def run_until_signalled(serve: Callable[..., Awaitable[Any]], settings: Any, name: str) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve, settings)
            print(f"{name} listening on {url}", flush=True)
            async for signum in signals:
                log.info("%s: stopping on %s", name, signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def load_settings(role: type[DaemonSettings], env_file: Path | None) -> DaemonSettings:
    """``role``'s settings from ``env_file`` (default: ./.env when it exists) overlaid with the environment."""
    if env_file is None and Path(".env").exists():
        env_file = Path(".env")
    return role.from_env(read_env_file(env_file), home=Path.home())

"""Command line of the mediator daemon: ``mediatord [--env-file F]`` runs it, ``mediatord status`` asks it.

SIGINT and SIGTERM stop the daemon cleanly: the nursery is cancelled, open requests end, the database closes.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import httpx
import trio

from fincryptfs.asgi import dumps
from fincryptfs.core.errors import FincryptError
from fincryptfs.core.settings import MediatorSettings, read_env_file
from mediatord import __version__


def load_settings(env_file: Path | None) -> MediatorSettings:
    if env_file is None and Path(".env").exists():
        env_file = Path(".env")
    return MediatorSettings.from_env(read_env_file(env_file), home=Path.home())


async def run(settings: MediatorSettings) -> None:
    from .daemon import serve
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve, settings)
            print(f"mediatord listening on {url}", flush=True)
            async for signum in signals:
                logging.getLogger(__name__).info("signal %d: stopping", signum)
                nursery.cancel_scope.cancel()
                break


def status(settings: MediatorSettings, as_json: bool) -> int:
    host, port = settings.listen
    base = settings.public_url or f"http://{host}:{port}"
    try:
        response = httpx.get(f"{base}/v1/status", timeout=10, trust_env=False)
        response.raise_for_status()
        data = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        print(f"mediatord status: cannot reach the mediator at {base}: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(dumps(data))
    else:
        for name, value in data.items():
            print(f"{name:22} {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mediatord",
        description="Fincrypt mediator: match clients with storage nodes, audit nodes, settle payments.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--env-file", type=Path, help="settings file (default: ./.env if present)")
    sub = parser.add_subparsers(dest="command")
    status_parser = sub.add_parser("status", help="show the running mediator's counters")
    status_parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(args.env_file)
    except FincryptError as exc:
        print(f"mediatord: {exc}", file=sys.stderr)
        return 2
    if args.command == "status":
        return status(settings, args.json)
    trio.run(run, settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Command line of the storage node: ``storaged`` runs it, ``storaged status`` and ``storaged id`` inspect it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import trio

from fincryptfs import allocator, logs, run_daemon
from fincryptfs.asgi import dumps
from fincryptfs.core.errors import ConfigError
from fincryptfs.core.settings import StorageSettings
from fincryptfs.run_daemon import run_until_signalled
from storaged import __version__

from .daemon import IDENTITY_FILE, load_or_create_identity, open_database, prepare_data_dir, serve

log = logging.getLogger("storaged")


def load_settings(env_file: Path | None) -> StorageSettings:
    return run_daemon.load_settings(StorageSettings, env_file)


async def _run(settings: StorageSettings) -> None:
    await run_until_signalled(serve, settings, "storaged")


def _status(settings: StorageSettings) -> dict[str, object]:
    # read-only look at the state: no cleanup, so it is safe while the daemon runs
    from .db import STATE_CORRUPT, STATE_MISSING
    from .store import ShareStore

    if not (settings.data_dir / IDENTITY_FILE).exists():  # never a new node, mistaken for this one
        raise ConfigError(f"no storage node has run with STORAGED_DATA_DIR={settings.data_dir} (it has no "
                          f"{IDENTITY_FILE}): check STORAGED_DATA_DIR and the settings file (--env-file, or ./.env "
                          "in the folder you run storaged from), or start the node first")
    db = open_database(settings.data_dir)
    try:
        key = load_or_create_identity(settings.data_dir, db)
        shares, stored = db.totals()
        store = ShareStore(settings.share_dirs, settings.reserve_bytes, db.shares_by_dir(),
                           data_dir=settings.data_dir)
        for folder, used in db.bytes_by_dir().items():
            store.account_existing(folder, used)
        free = store.free_bytes()  # looks at every folder: notes those that cannot be used
        by_state = db.shares_by_state()
        return {"node_id": key.id, "shares": shares, "bytes_stored": stored, "free_bytes": free,
                "capacity_bytes": store.capacity_bytes(),
                "shares_missing": by_state.get(STATE_MISSING, 0), "shares_corrupt": by_state.get(STATE_CORRUPT, 0),
                "problems": store.problems(),
                "mediators": [m.url for m in db.trusted_mediators()],
                "earnings": [e.to_json() for e in db.earnings()]}
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="storaged",
        description="Fincrypt storage node: store encrypted shares and get paid for them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--env-file", type=Path, help="settings file (default: ./.env if present)")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    sub = parser.add_subparsers(dest="command")
    status = sub.add_parser("status", help="print node id, shares, bytes stored and free space")
    status.add_argument("--json", action="store_true", help="print JSON")
    node_id = sub.add_parser("id", help="print this node's id")
    for extra in (status, node_id):  # after the command too, as mediatord takes it
        extra.add_argument("--env-file", type=Path, default=argparse.SUPPRESS,
                           help="settings file (default: ./.env if present)")
    args = parser.parse_args(argv)
    logs.configure(args.log_level)
    allocator.keep_freed_memory()
    return run_daemon.exit_status("storaged", lambda: _command(args))


def _command(args: argparse.Namespace) -> None:
    """The command ``args`` names (the daemon itself without one)."""
    settings = load_settings(args.env_file)
    if args.command == "id":
        prepare_data_dir(settings)
        db = open_database(settings.data_dir)
        try:
            print(load_or_create_identity(settings.data_dir, db).id)
        finally:
            db.close()
    elif args.command == "status":
        info = _status(settings)
        if args.json:
            print(dumps(info))
        else:
            for name, value in info.items():
                if name not in ("earnings", "problems"):
                    print(f"{name}: {value}")
            for problem in info["problems"]:  # type: ignore[attr-defined]
                print(f"problem: {problem}")
            if info["shares_missing"] or info["shares_corrupt"]:
                print("missing and corrupt shares are never served or proven: the mediators repair them on "
                      "other nodes once they audit this node")
            for e in info["earnings"]:  # type: ignore[attr-defined]
                print(f"earnings from {e['url']}: earned {e['earned_msat']} msat, pending {e['pending_msat']} "
                      f"msat (paid at {e['payout_threshold_msat']}), paid {e['paid_msat']} msat")
    else:
        trio.run(_run, settings)


if __name__ == "__main__":
    raise SystemExit(main())

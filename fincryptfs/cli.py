"""Command-line entry point of the Fincrypt client.

Exit codes: 0 success, 1 an error the message explains, 2 a usage error. Every command reads the client
settings from ``--env-file`` (default ``~/.config/fincrypt/client.env`` if it exists) overlaid with FINCRYPT_*
variables from the environment. ``flush`` and ``status`` read the mount's SQLite tree directly (WAL allows a
reader beside the writer), so they need no connection to the running mount.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from fincryptfs import __version__

from . import allocator, logs, meta
from .core.crypto import decode_key_file, master_key_from_phrase, new_master_key, recovery_phrase
from .core.errors import ConfigError, FincryptError
from .core.settings import ClientSettings, read_env_file
from .keystore import ask_new_passphrase, load_master_key, read_passphrase_file, save_key_file
from .lockfile import uploads_stalled

DEFAULT_ENV_FILE = Path("~/.config/fincrypt/client.env")
DAEMON_START_TIMEOUT = 60.0
FLUSH_POLL = 0.02  # seconds between looks at the queue: a cheap read, and a flush returns this much sooner
RESTORE_CHECK_TIMEOUT = 15.0  # seconds restore waits for the mediator's answer about the account's tree


class UsageError(FincryptError):
    """Wrong combination of arguments (exit code 2)."""


# --- settings -----------------------------------------------------------------------------------------------


def _env_path(args: argparse.Namespace) -> Path:
    return Path(args.env_file).expanduser() if args.env_file else DEFAULT_ENV_FILE.expanduser()


def load_settings(args: argparse.Namespace) -> ClientSettings:
    path = _env_path(args)
    if not args.env_file and not path.exists():
        return ClientSettings.from_env(read_env_file(None), home=Path.home())
    return ClientSettings.from_env(read_env_file(path), home=Path.home())


def _mediator_argument(text: str) -> str:
    """--mediator's value, checked as FINCRYPT_MEDIATOR_URL is, so that a bad one is a usage error naming the
    option the user typed rather than the variable it is stored in."""
    try:
        ClientSettings.from_env({"FINCRYPT_MEDIATOR_URL": text}, home=Path.home())
    except ConfigError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL, e.g. "
                                         "http://127.0.0.1:8700") from None
    return text


def _write_env(path: Path, updates: dict[str, str]) -> None:
    """Merge ``updates`` into the .env file at ``path`` (created 0600 if new)."""
    values = {k: v for k, v in dotenv_values(path).items() if v is not None} if path.exists() else {}
    values.update(updates)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# Fincrypt client settings (see .env.example for every variable)\n")
        for key, value in values.items():
            f.write(f"{key}={value}\n")
    os.rename(tmp, path)


def _master_key(settings: ClientSettings, *, interactive: bool | None = None) -> bytes:
    return load_master_key(settings.key_file, settings.passphrase_file, interactive=interactive)


def _new_passphrase(args: argparse.Namespace) -> str | None:
    if args.passphrase_file and args.no_passphrase:
        raise UsageError("give either --passphrase-file or --no-passphrase, not both")
    if args.no_passphrase:
        return None
    if args.passphrase_file:
        return read_passphrase_file(Path(args.passphrase_file).expanduser())
    return ask_new_passphrase()


def _find_mediator(settings: ClientSettings) -> ClientSettings:
    """With no mediator configured but DHT bootstrap peers, find one through the DHT (fincryptfs.discovery)."""
    if settings.mediator_url is not None or not settings.dht_bootstrap:
        return settings
    import trio

    from .discovery import discover_mediator

    found = trio.run(discover_mediator, settings.dht_bootstrap)
    print(f"Found mediator {found.url} (id {found.mediator_id[:16]}…) through the DHT.")
    return replace(settings, mediator_url=found.url)


def _holds_key(path: Path, args: argparse.Namespace, master_key: bytes) -> bool:
    """Whether the key file at ``path`` holds ``master_key``, opened with ``--passphrase-file`` if it has one."""
    try:
        passphrase = read_passphrase_file(Path(args.passphrase_file).expanduser()) if args.passphrase_file else None
        return hmac.compare_digest(decode_key_file(path.read_bytes(), passphrase), master_key)
    except (OSError, FincryptError):
        return False


def _setup_account(args: argparse.Namespace, master_key: bytes, *, restoring: bool = False
                   ) -> tuple[ClientSettings, bool]:
    """Write the settings file and key file of an account (shared by init and restore); returns the settings and
    whether the key file was there already. A restore run again (the mediator did not answer the first time, or
    its URL was mistyped) keeps a key file that holds the same key, and writes the settings file again."""
    env_path = _env_path(args)
    updates: dict[str, str] = {}
    if args.mediator:
        updates["FINCRYPT_MEDIATOR_URL"] = args.mediator
    existing = {k: v for k, v in dotenv_values(env_path).items() if v} if env_path.exists() else {}
    merged = {**existing, **updates}
    settings = ClientSettings.from_env({**merged, **read_env_file(None)}, home=Path.home())
    kept = settings.key_file.exists()
    if kept and not (restoring and _holds_key(settings.key_file, args, master_key)):
        raise ConfigError(f"a key file already exists at {settings.key_file}; this account is set up already "
                          "(move the file away first to replace it)")
    if (settings.data_dir / "meta.db").exists():
        raise ConfigError(f"a local tree already exists at {settings.data_dir / 'meta.db'}; move it away first")
    if settings.mediator_url is None and restoring and not settings.dht_bootstrap:
        raise UsageError("give --mediator URL (or set FINCRYPT_DHT_BOOTSTRAP to find one through the DHT)")
    settings = _find_mediator(settings)
    if settings.mediator_url is not None:
        merged["FINCRYPT_MEDIATOR_URL"] = settings.mediator_url
    passphrase = None if kept else _new_passphrase(args)
    _write_env(env_path, merged)
    if not kept:
        save_key_file(settings.key_file, master_key, passphrase)
    return settings, kept


# --- commands -----------------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    master_key = new_master_key()
    settings, _ = _setup_account(args, master_key)
    print(f"Created the key file {settings.key_file} and the settings file {_env_path(args)}.")
    print("\nYour recovery phrase (shown only this once; write it down and keep it safe: with it, anyone can")
    print("read your backup, and without it and the key file, nobody can, including you):\n")
    print("    " + recovery_phrase(master_key) + "\n")
    if settings.mediator_url is None:
        print("Next: set FINCRYPT_MEDIATOR_URL in the settings file, then 'fincryptfs mount DIR'.")
    else:
        print("Next: fincryptfs mount DIR")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    if args.phrase_file:
        path = Path(args.phrase_file).expanduser()
        try:
            phrase = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read the recovery phrase file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError:
            raise ConfigError(f"the recovery phrase file {path} is not text: it should hold the 24 words") from None
    elif sys.stdin.isatty():
        phrase = input("Recovery phrase (24 words): ")
    else:
        raise UsageError("no terminal to ask for the recovery phrase: use --phrase-file F")
    master_key = master_key_from_phrase(phrase)
    settings, kept = _setup_account(args, master_key, restoring=True)
    if kept:
        print(f"The key file {settings.key_file} holds this account's key already: kept it. Wrote the settings "
              f"file {_env_path(args)}.")
    else:
        print(f"Restored the key file {settings.key_file} and the settings file {_env_path(args)}.")
    import trio

    print(trio.run(_tree_at_mediator, settings, master_key))
    print("Next: fincryptfs mount DIR (the first mount fetches the latest tree; contents come on first read)")
    return 0


async def _tree_at_mediator(settings: ClientSettings, master_key: bytes) -> str:
    """Whether the mediator holds a tree for the restored account, in a sentence: a mistyped phrase (one that
    still passes its checksum) or a wrong mediator URL shows here, not as an empty folder at the first mount."""
    import trio

    from . import rpc
    from .core.crypto import account_signing_key
    from .manifest import account_pointer
    from .mediator_client import MediatorClient

    assert settings.mediator_url is not None
    try:
        with trio.fail_after(RESTORE_CHECK_TIMEOUT):
            async with rpc.new_client() as http:
                pointer = await account_pointer(MediatorClient(url=settings.mediator_url, http=http,
                                                               account_key=account_signing_key(master_key)))
    except (FincryptError, trio.TooSlowError) as exc:
        reason = str(exc) or f"no answer in {RESTORE_CHECK_TIMEOUT:g} s"  # a TooSlowError says nothing
        return (f"Could not ask the mediator whether it holds this account's tree ({reason}); the first mount "
                "will, or run this again once it answers.")
    if pointer is None:
        return (f"warning: the mediator at {settings.mediator_url} holds no tree for this account. If it has "
                "stored files before, check the recovery phrase and the mediator URL: the first mount would show "
                "an empty folder.")
    published = time.strftime("%Y-%m-%d %H:%M", time.localtime(pointer.created_at))
    return f"The mediator holds this account's tree (version {pointer.version}, published {published})."


def cmd_mount(args: argparse.Namespace) -> int:
    import trio

    from .mount import check_mountpoint, run_mount

    settings = load_settings(args)
    if settings.mediator_url is None and settings.dht_bootstrap:
        settings = _find_mediator(settings)
        assert settings.mediator_url is not None
        _write_env(_env_path(args), {"FINCRYPT_MEDIATOR_URL": settings.mediator_url})
        print(f"Wrote FINCRYPT_MEDIATOR_URL={settings.mediator_url} into {_env_path(args)}.")
    mountpoint = Path(args.dir).expanduser().resolve()
    check_mountpoint(mountpoint)  # before the passphrase is asked, and in the foreground with --daemon
    if args.key_stdin:
        master_key = bytes.fromhex(sys.stdin.readline().strip())
    else:
        master_key = _master_key(settings)
    if args.daemon:
        return _daemonize(args, settings, mountpoint, master_key)
    trio.run(run_mount, settings, mountpoint, master_key)
    return 0


def _daemonize(args: argparse.Namespace, settings: ClientSettings, mountpoint: Path, master_key: bytes) -> int:
    """Run the mount in a background process; return once it is mounted (or report why it is not)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.data_dir / "mount.log"
    log_start = log_path.stat().st_size if log_path.exists() else 0
    command = [sys.executable, "-m", "fincryptfs.cli", "mount", str(mountpoint), "--key-stdin"]
    if args.env_file:
        command += ["--env-file", str(Path(args.env_file).expanduser().resolve())]
    with open(log_path, "ab") as log_file:
        child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log_file, stderr=log_file,
                                 start_new_session=True, cwd="/")
    assert child.stdin is not None
    child.stdin.write(master_key.hex().encode() + b"\n")
    child.stdin.close()
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while not os.path.ismount(mountpoint):
        if child.poll() is not None:
            reason = _last_error(log_path, log_start) or f"the mount process exited with status {child.returncode}"
            raise FincryptError(f"{reason} (log: {log_path})")
        if time.monotonic() > deadline:
            raise FincryptError(f"{mountpoint} was not mounted within {DAEMON_START_TIMEOUT:.0f} s; see {log_path}")
        time.sleep(0.1)
    print(f"mounted {mountpoint} (process {child.pid}, log {log_path})")
    return 0


def _last_error(log_path: Path, start: int) -> str | None:
    """The last ``error:`` line the mount process wrote to its log after offset ``start``, without the prefix."""
    with open(log_path, "rb") as log_file:
        log_file.seek(start)
        lines = log_file.read().decode("utf-8", "replace").splitlines()
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else None


def cmd_umount(args: argparse.Namespace) -> int:
    from .mount import is_dead_mount

    mountpoint = Path(args.dir).expanduser().resolve()
    if not os.path.ismount(mountpoint) and not is_dead_mount(mountpoint):
        raise FincryptError(f"{mountpoint} is not mounted")
    result = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0:
        raise FincryptError(f"could not unmount {mountpoint}: {result.stderr.strip()} (close the files and "
                            "shells that use it, then try again)")
    return 0


def _open_tree(settings: ClientSettings) -> Any:
    path = settings.data_dir / "meta.db"
    if not path.exists():
        raise ConfigError(f"no local tree at {path}: mount the filesystem first (fincryptfs mount DIR)")
    return meta.connect_readonly(path)


def _flush_state(db: Any) -> tuple[list[tuple[int, int, str, int, str | None]], int, int]:
    return meta.pending_uploads(db), meta.counter(db, "meta_version"), meta.counter(db, "published_version")


def wait_flushed(db: Any, timeout: float | None, *, hint: str, stop: threading.Event | None = None,
                 data_dir: Path | None = None) -> bool:
    """Wait until no upload is pending and the tree snapshot is published, printing progress every second (and,
    given ``data_dir``, saying when nothing is uploading); False (with the failed or pending files named, and
    ``hint``) if an upload failed for good, on timeout, or once ``stop`` is set (from another thread)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last_report = 0.0
    while stop is None or not stop.is_set():
        pending, meta_version, published = _flush_state(db)
        failed = meta.failed_uploads(db)
        if failed:
            for _, ino, error in failed:
                path = meta.path_of(db, ino) or f"inode {ino}"
                print(f"error: {path} cannot be uploaded: {error}", file=sys.stderr)
            return False
        if not pending and published >= meta_version:
            return True
        problem = meta.publish_problem(db)
        if problem is not None and problem.blocked:
            print(f"error: the tree snapshot cannot be published: {problem.message}", file=sys.stderr)
            return False
        now = time.monotonic()
        if now - last_report >= 1.0:
            last_report = now
            errors = [error for *_, error in pending if error]
            stalled = uploads_stalled(data_dir) if data_dir is not None else None
            print(f"{len(pending)} upload(s) pending; tree version {meta_version}, published {published}"
                  + (f"; {stalled}" if stalled else "")
                  + (f"; {len(errors)} retrying after an error, e.g.: {errors[0]}" if errors else "")
                  + (f"; publishing the tree failed, retrying: {problem.message}" if problem else ""),
                  file=sys.stderr)
        if deadline is not None and now > deadline:
            print(f"error: timed out with {len(pending)} upload(s) pending and the tree snapshot "
                  f"{'published' if published >= meta_version else 'not yet published'}:", file=sys.stderr)
            for _, ino, state, attempts, error in pending[:20]:
                path = meta.path_of(db, ino) or f"inode {ino}"
                print(f"  {path}: {state}, {attempts} attempt(s)" + (f", last error: {error}" if error else ""),
                      file=sys.stderr)
            print(hint, file=sys.stderr)
            return False
        time.sleep(FLUSH_POLL)
    return False


def cmd_flush(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    db = _open_tree(settings)
    meta.request_flush(settings.data_dir / "meta.db")
    try:
        if not wait_flushed(db, args.timeout, hint="Is the filesystem mounted (fincryptfs mount DIR) and the "
                                                   "mediator reachable?", data_dir=settings.data_dir):
            return 1
        print("flushed: every closed file is stored and the tree snapshot is published", file=sys.stderr)
        return 0
    finally:
        db.close()


def cmd_put(args: argparse.Namespace) -> int:
    import trio

    from .put import run_put

    settings = load_settings(args)
    sources = [Path(p).expanduser() for p in args.sources]
    started = time.monotonic()

    def wait(db: Any, stop: threading.Event) -> bool:
        return wait_flushed(db, args.timeout, stop=stop, hint="What was copied stays queued: the next mount or put "
                                                              "uploads it. Is the mediator reachable?")
    interrupted = False
    try:
        try:
            report, stored = trio.run(lambda: run_put(settings, sources, args.dest,
                                                      load_key=lambda: _master_key(settings), wait=wait))
        except* KeyboardInterrupt:  # raised in whichever task ran when Ctrl-C came, so possibly in a group
            interrupted = True
    except OSError as exc:
        raise FincryptError(f"put stopped: {exc.strerror or exc}"
                            + (f": {exc.filename}" if exc.filename else "")) from exc
    if interrupted:
        print("put interrupted: what it had recorded stays in the backup and its uploads stay queued (the next "
              "mount or put stores them); run the same put again to finish", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    for line in report.skipped:
        print(f"skipped: {line}", file=sys.stderr)
    for line in report.errors:
        print(f"error: {line}", file=sys.stderr)
    rate = f" ({report.files / elapsed:,.0f} files/s, {report.bytes / elapsed / 1e6:,.1f} MB/s)" if elapsed else ""
    state = "stored" if stored else "copied, NOT all stored yet"
    print(f"put: {report.summary()}; {state} in {elapsed:.2f} s{rate}", file=sys.stderr)
    return 0 if stored and not report.errors else 1


def cmd_status(args: argparse.Namespace) -> int:
    import trio

    settings = load_settings(args)
    db = _open_tree(settings)
    try:
        pending, meta_version, published = _flush_state(db)
        files: list[dict[str, Any]] = []
        names = meta.PathNamer(db)
        for inode in meta.files(db):
            object_id = meta.content_object_id(inode.object) if inode.object else None
            ref = meta.pack_ref(inode.object)
            files.append({"path": names.of(inode), "size": inode.size, "state": inode.state,
                          "object_id": object_id, "packed": ref is not None, "shares_healthy": None,
                          "shares_total": None, "health": None})
        failed = meta.failed_uploads(db)
        problem = meta.publish_problem(db)
        report: dict[str, Any] = {
            "pending_uploads": len(pending),
            "failed_uploads": [{"path": meta.path_of(db, ino), "error": error} for _, ino, error in failed],
            "upload_errors": [{"path": meta.path_of(db, ino), "attempts": attempts, "error": error}
                              for _, ino, _, attempts, error in pending if error],
            "pending_deletes": meta.pending_deletes(db),
            "packs": [{"pack_id": pack_id, "live_files": live} for pack_id, live in meta.packs(db)],
            "tree_version": meta_version,
            "published_version": published,
            "publish_problem": None if problem is None else {"error": problem.message, "blocked": problem.blocked,
                                                             "since": int(problem.since)},
            "uploads_stalled": (uploads_stalled(settings.data_dir) if pending or published < meta_version
                                else None),
            "files": files,
        }
    finally:
        db.close()
    from .cache import used_bytes

    cache_used = used_bytes(settings.cache_dir)
    report["cache"] = {"bytes": cache_used, "limit_bytes": settings.cache_limit_bytes}
    report["mediator"] = trio.run(_add_health, settings, files)
    report["account"] = trio.run(_account_state, settings)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"mediator: {report['mediator']}")
    for line in _account_lines(report["account"]):
        print(line)
    print(f"pending uploads: {report['pending_uploads']}  pending deletions: {report['pending_deletes']}  "
          f"tree version {meta_version} (published {published})")
    print(f"cache: {cache_used / 2**20:.1f} MiB of {settings.cache_limit_bytes / 2**20:.0f} MiB")
    if report["uploads_stalled"]:
        print(f"uploads: {report['uploads_stalled']}")
    if problem is not None:
        print(f"tree snapshot {'cannot be published' if problem.blocked else 'publish failing, retrying'}: "
              f"{problem.message}")
    for err in report["upload_errors"] + report["failed_uploads"]:
        print(f"upload problem: {err['path']}: {err['error']}")
    for f in files:
        health = f"{f['shares_healthy']}/{f['shares_total']}" if f["shares_total"] is not None else "-"
        if f["health"] not in (None, "healthy"):
            health += f" {f['health']}"
        packed = f" (in pack {f['object_id'][:12]})" if f["packed"] else ""
        print(f"{f['state']:8} {health:>6} {f['size']:>14} {f['path']}{packed}")
    return 0


HEALTH_WAIT = 30.0  # seconds ``status`` waits for the mediator's view of every file's shares


async def _add_health(settings: ClientSettings, files: list[dict[str, Any]]) -> str:
    """Fill shares_healthy/shares_total from the mediator; returns a one-line mediator state."""
    import trio

    from . import rpc
    from .datadir import open_store

    if settings.mediator_url is None:
        return "not configured"
    try:
        master_key = _master_key(settings, interactive=False)
    except FincryptError as exc:
        return f"health not checked: {exc}"
    errors: list[str] = []
    async with rpc.new_client() as http:
        store = open_store(settings, master_key, http, trio.CapacityLimiter(1))
        limiter = trio.CapacityLimiter(16)

        by_object: dict[str, list[dict[str, Any]]] = {}
        for entry in files:
            if entry["object_id"] is not None:
                by_object.setdefault(entry["object_id"], []).append(entry)  # a pack's files share its health

        async def one(object_id: str, entries: list[dict[str, Any]]) -> None:
            async with limiter:
                try:
                    health = await store.health(object_id)
                    for entry in entries:
                        entry["shares_healthy"] = int(health["healthy"])
                        entry["shares_total"] = int(health["total"])
                        entry["health"] = str(health["state"])
                except (FincryptError, KeyError, ValueError, TypeError) as exc:
                    errors.append(str(exc))

        with trio.move_on_after(HEALTH_WAIT) as waiting:
            async with trio.open_nursery() as nursery:
                for object_id, entries in by_object.items():
                    nursery.start_soon(one, object_id, entries)
    if waiting.cancelled_caught:  # said first: the files' "-" would otherwise look like files never uploaded
        errors.insert(0, f"no answer within {HEALTH_WAIT:g} s, share health not shown for every file")
    return f"{settings.mediator_url} ({len(errors)} error(s): {errors[0]})" if errors else settings.mediator_url


ACCOUNT_FIELDS = ("deposit_address", "network", "balance_msat", "burn_rate_msat_per_hour", "time_left_seconds",
                  "low_balance", "uploads_refused", "out_of_funds_since", "grace_ends_at", "pending_deposits_sat")


async def _account_state(settings: ClientSettings) -> dict[str, Any] | None:
    """The prepaid account as the mediator sees it (GET /v1/account), or ``{"error"}``; None if no mediator."""
    from . import rpc
    from .core.crypto import account_signing_key
    from .mediator_client import MediatorClient

    if settings.mediator_url is None:
        return None
    try:
        master_key = _master_key(settings, interactive=False)
        async with rpc.new_client() as http:
            answer = await MediatorClient(url=settings.mediator_url, account_key=account_signing_key(master_key),
                                          http=http).account()
    except FincryptError as exc:
        return {"error": str(exc)}
    return {name: answer.get(name) for name in ACCOUNT_FIELDS}


def _account_lines(account: dict[str, Any] | None) -> list[str]:
    """``fincryptfs status`` text: balance, burn rate, time left, where to deposit, and a warning if due."""
    if account is None:
        return []
    if "error" in account:
        return [f"account: not checked: {account['error']}"]
    balance, rate, left = account["balance_msat"], account["burn_rate_msat_per_hour"], account["time_left_seconds"]
    lines = [f"account: balance {balance // 1000:,} sat ({balance:,} msat), burn rate {rate:,} msat/hour, "
             + ("nothing stored yet" if left is None else f"time left {_duration(left)}"),
             f"deposit address ({account['network']}): {account['deposit_address'] or 'none yet (store a file first)'}"]
    if account["pending_deposits_sat"]:
        lines.append(f"deposits waiting for confirmations: {account['pending_deposits_sat']:,} sat")
    if account["uploads_refused"]:
        lines.append(f"WARNING: prepaid balance exhausted: new uploads are refused until you deposit to "
                     f"{account['deposit_address']}; your files stay safe here and upload once it confirms")
    elif account["out_of_funds_since"] is not None:
        lines.append(f"WARNING: prepaid balance exhausted: deposit to {account['deposit_address']} before "
                     f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(account['grace_ends_at']))} or new "
                     "uploads will be refused")
    elif account["low_balance"]:
        lines.append(f"WARNING: low balance: about {_duration(left)} of storage left; deposit to "
                     f"{account['deposit_address']}")
    return lines


def _duration(seconds: int) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds // 86400} days"
    if seconds >= 2 * 3600:
        return f"{seconds // 3600} hours"
    return f"{seconds // 60} minutes"


def cmd_devnet(args: argparse.Namespace) -> int:
    import signal

    import trio

    from .devnet import run_devnet

    if args.nodes < 2:
        raise UsageError("--nodes: a devnet needs at least 2 storage nodes")
    if args.audit_period < 0.5:
        raise UsageError("--audit-period: at least 0.5 seconds (the mediator's shortest audit period)")
    home = Path(args.home).expanduser()
    mount = Path(args.mount).expanduser() if args.mount else None

    async def run() -> None:
        ready = trio.Event()
        async with trio.open_nursery() as nursery:
            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        print("\nstopping the devnet…", file=sys.stderr)
                        nursery.cancel_scope.cancel()
                        return

            async def announce() -> None:
                await ready.wait()
                _print_devnet_ready(home, mount)

            nursery.start_soon(stop_on_signal)
            nursery.start_soon(announce)
            await run_devnet(home, nodes=args.nodes, mount=mount, audit_period=args.audit_period, ready=ready)

    trio.run(run)
    return 0


def command_name() -> str:
    """How the user types this command: ``fincryptfs`` when that is what their PATH finds, else its path in the
    virtual environment (``make run`` does not put ``.venv/bin`` on the PATH: the hints it printed failed with
    "command not found"), relative to the current folder when inside it."""
    script = Path(sys.executable).parent / "fincryptfs"
    found = shutil.which("fincryptfs")
    if found is not None and (not script.exists() or Path(found).resolve() == script.resolve()):
        return "fincryptfs"
    if not script.exists():
        return f"{sys.executable} -m fincryptfs.cli"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def _print_devnet_ready(home: Path, mount: Path | None) -> None:
    info = json.loads((home / "devnet.json").read_text())
    env = info["client_env"]
    cmd = command_name()
    print(f"\nFincrypt devnet is up: mediator {info['mediator']['url']}, {len(info['nodes'])} storage nodes "
          f"(logs in {info['logs']}).")
    if mount is not None:
        print(f"\nYour backup folder is mounted at {info['mount']}. Try:")
        print(f"    cp -a /etc/hostname /usr/share/common-licenses {info['mount']}/")
        print(f"    {cmd} flush --env-file {env}     # wait until everything is stored on the nodes")
        print(f"    {cmd} status --env-file {env}    # per-file share health")
    else:
        print(f"\nMount it with: {cmd} mount DIR --env-file {env}")
    print(f"\nThe account's recovery phrase is in {home / 'recovery-phrase.txt'}. Ctrl-C stops everything.\n",
          flush=True)


# --- argument parsing ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fincryptfs",
        description="Fincrypt client: mount an encrypted, erasure-coded backup filesystem.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--env-file", metavar="F",
                       help=f"client settings file (default {DEFAULT_ENV_FILE} if it exists)")
        return p

    p = command("init", "Create a new account: master key, key file (0600), settings file; prints the "
                        "recovery phrase once.")
    p.add_argument("--mediator", metavar="URL", type=_mediator_argument,
                   help="mediator to store through (FINCRYPT_MEDIATOR_URL; without it, one found via "
                        "FINCRYPT_DHT_BOOTSTRAP)")
    p.add_argument("--passphrase-file", metavar="F", help="protect the key file with the passphrase in F")
    p.add_argument("--no-passphrase", action="store_true", help="leave the key file unprotected (mode 0600)")
    p.set_defaults(func=cmd_init)

    p = command("restore", "Recreate the key file and settings from the recovery phrase; the next mount shows "
                           "the whole tree.")
    p.add_argument("--mediator", metavar="URL", type=_mediator_argument,
                   help="mediator the account stores through (default: FINCRYPT_MEDIATOR_URL, or one found via "
                        "FINCRYPT_DHT_BOOTSTRAP)")
    p.add_argument("--phrase-file", metavar="F", help="file holding the 24-word recovery phrase")
    p.add_argument("--passphrase-file", metavar="F", help="protect the new key file with the passphrase in F")
    p.add_argument("--no-passphrase", action="store_true", help="leave the key file unprotected (mode 0600)")
    p.set_defaults(func=cmd_restore)

    p = command("mount", "Mount the backup at DIR; runs in the foreground until unmounted or interrupted.")
    p.add_argument("dir", metavar="DIR", help="an empty folder, nothing mounted on it")
    p.add_argument("--daemon", action="store_true", help="run in the background; return once mounted")
    p.add_argument("--key-stdin", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = command("umount", "Unmount DIR (uploads left pending resume at the next mount).")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=cmd_umount)

    p = command("flush", "Wait until every closed file is uploaded and the tree snapshot is published.")
    p.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds (exit status 1)")
    p.set_defaults(func=cmd_flush)

    p = sub.add_parser("devnet", help="Run a whole local network on 127.0.0.1 (mediator, storage nodes, an "
                                      "account, optionally a mount) until Ctrl-C.",
                       description="Run one mediatord and N storaged on 127.0.0.1, each with its own folder, a "
                                   "client account (HOME/client.env, HOME/recovery-phrase.txt) and optionally "
                                   "a mount. HOME/devnet.json appears once everything is up. Ctrl-C or SIGTERM "
                                   "unmounts and stops everything.")
    p.add_argument("--home", metavar="DIR", required=True, help="folder for every node's data, logs and the "
                                                                  "client account")
    p.add_argument("--nodes", type=int, default=6, metavar="N", help="storage nodes to start (default 6)")
    p.add_argument("--mount", metavar="MNT", help="also mount the account here")
    p.add_argument("--audit-period", type=float, default=10.0, metavar="S",
                   help="seconds between audits (default 10, so audits and repair show within a minute)")
    p.set_defaults(func=cmd_devnet)

    p = command("put", "Copy local files and folders into the backup without the mount (like cp -a into DEST; "
                       "unchanged files are skipped), and wait until they are stored.")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="files or folders to copy (links are copied as links)")
    p.add_argument("dest", metavar="DEST", help="folder in the backup, e.g. / or Photos/2024 (created if missing)")
    p.add_argument("--timeout", type=float, metavar="S", help="stop waiting for uploads after S seconds (exit "
                                                              "status 1; they resume at the next mount or put)")
    p.set_defaults(func=cmd_put)

    p = command("status", "Show pending uploads, cache use and the health of every file's shares.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    return parser


def _run_command(args: argparse.Namespace) -> int:
    """Run the command; an error that a trio nursery grouped on its own (a failed start, or a Ctrl-C before the
    signal handler ran) is raised as itself, so that it is reported in words like any other."""
    try:
        return int(args.func(args))
    except BaseExceptionGroup as group:
        sole: BaseException = group
        while isinstance(sole, BaseExceptionGroup) and len(sole.exceptions) == 1:
            sole = sole.exceptions[0]
        if isinstance(sole, BaseExceptionGroup):
            raise
        raise sole from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logs.configure(logging.INFO if args.command in ("mount", "devnet") else logging.WARNING)
    allocator.keep_freed_memory()
    try:
        return _run_command(args)
    except UsageError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FincryptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except BrokenPipeError:  # whoever read our output stopped reading (fincryptfs status | head): not our error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor is the flush at exit
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The whole-system harness of the fault suite: a ``fincryptfs devnet`` child process and the CLIs.

Everything is a real process: the devnet (mediator, storage nodes, the client's FUSE mount), nodes and mediators
this harness restarts itself, and the ``fincryptfs`` / ``mediatord`` commands a user would type. The harness only
*observes* through public surfaces (the CLIs, the HTTP API, the files each daemon keeps on disk) and *breaks*
things the way the world does: signals, deleted or damaged files.

Every process is tracked by PID. :meth:`Devnet.stop` (called in ``finally``) SIGTERMs the devnet, which unmounts
and stops its children, then stops what the harness started, checks that no PID from devnet.json is alive and
nothing is mounted, and kills leftovers by PID.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from fincryptfs.mediator_client import ObjectInfo

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
MiB = 2**20


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Poll ``predicate`` until it returns something truthy; AssertionError naming ``what`` on timeout."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path → SHA-256 of every regular file under ``root`` (what "byte for byte" compares)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = sha256_file(path)
    return out


def write_tree(root: Path, seed: int, *, large: int = 2, large_size: int = 3 * MiB // 2, small: int = 6,
               marker: bytes = b"") -> dict[str, str]:
    """A folder of large and small files with deterministic random contents; returns its digest."""
    import random

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    for i in range(large):
        (root / f"large-{i}.bin").write_bytes(rng.randbytes(large_size + rng.randrange(4096)))
    for i in range(small):
        folder = root / "sub" if i % 2 else root
        (folder / f"note-{i}.txt").write_bytes(marker + rng.randbytes(rng.randrange(1, 3000)) + marker)
    return tree_digest(root)


@dataclass
class Devnet:
    """One running ``fincryptfs devnet`` and what the tests started beside it."""

    home: Path
    mount: Path
    process: subprocess.Popen[bytes]
    info: dict[str, Any] = field(default_factory=dict)
    mount_pid: int | None = None
    started: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)  # name → process we started
    mediator_pid: int = 0

    # --- life cycle -----------------------------------------------------------------------------------------

    @classmethod
    def start(cls, home: Path, *, nodes: int, audit_period: float, attempts: int = 2) -> Devnet:
        last: AssertionError | None = None
        for attempt in range(attempts):
            run_home = home / f"try-{attempt}"
            run_home.mkdir(parents=True)
            mount = run_home / "mnt"
            log = open(run_home / "devnet.out", "wb")  # noqa: SIM115 - the child keeps it
            process = subprocess.Popen(
                [PYTHON, "-m", "fincryptfs.cli", "devnet", "--home", str(run_home / "net"), "--nodes", str(nodes),
                 "--mount", str(mount), "--audit-period", str(audit_period)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
            log.close()
            net = cls(run_home / "net", mount, process)
            try:
                net.info = wait_until(net._read_info, 90, "devnet.json")
            except AssertionError as exc:
                out = (run_home / "devnet.out").read_text(errors="replace")[-3000:]
                last = AssertionError(f"{exc}\n{out}")
                net.stop()
                continue
            net.mediator_pid = int(net.info["mediator"]["pid"])
            net.mount_pid = net._find_mount_pid()
            return net
        assert last is not None
        raise last

    def _read_info(self) -> dict[str, Any] | None:
        if self.process.poll() is not None:
            raise AssertionError(f"the devnet exited with status {self.process.returncode}")
        path = self.home / "devnet.json"
        return json.loads(path.read_text()) if path.exists() else None

    def _find_mount_pid(self) -> int | None:
        """The devnet's mount child: the process whose parent is the devnet and that runs our mount."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == self.process.pid and b"mount" in cmdline and str(self.mount).encode() in cmdline:
                return int(entry)
        return None

    def all_pids(self) -> list[int]:
        pids = [self.process.pid]
        if self.info:
            pids += [int(self.info["mediator"]["pid"])] + [int(n["pid"]) for n in self.info["nodes"]]
        pids += [p.pid for p in self.started.values()]
        if self.mount_pid is not None:
            pids.append(self.mount_pid)
        return pids

    def stop(self) -> list[str]:
        """SIGTERM the devnet, stop what we started, verify nothing is left; returns problems found (and fixed)."""
        problems: list[str] = []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                problems.append("the devnet did not stop within 30 s of SIGTERM")
                self.process.kill()
                self.process.wait()
        if os.path.ismount(self.mount):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mount)], check=False, capture_output=True)
        for name, proc in self.started.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    problems.append(f"{name} did not stop within 10 s of SIGTERM")
                    proc.kill()
                    proc.wait()
        for pid in self.all_pids():
            if pid_alive(pid):
                problems.append(f"process {pid} outlived the devnet")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if os.path.ismount(self.mount):
            problems.append(f"{self.mount} still mounted")
            subprocess.run(["fusermount3", "-u", "-z", str(self.mount)], check=False, capture_output=True)
        return problems

    # --- the CLIs -------------------------------------------------------------------------------------------

    @property
    def client_env(self) -> Path:
        return Path(self.info["client_env"])

    @property
    def client_dir(self) -> Path:
        return self.home / "client"

    def fincryptfs(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([PYTHON, "-m", "fincryptfs.cli", *args], capture_output=True, text=True,
                                timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"fincryptfs {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n"
                                 f"{result.stderr}")
        return result

    def flush(self, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.fincryptfs("flush", "--env-file", str(self.client_env), "--timeout", str(timeout),
                               check=check, timeout=timeout + 30)

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.fincryptfs("status", "--json", "--env-file", str(self.client_env)).stdout))

    def file_status(self, path: str) -> dict[str, Any]:
        for entry in self.status()["files"]:
            if entry["path"] == path:
                return dict(entry)
        raise AssertionError(f"{path} is not in the status")

    def ledger(self) -> dict[str, Any]:
        out = subprocess.run([PYTHON, "-m", "mediatord.cli", "--env-file", str(self.mediator_env), "ledger",
                              "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT, check=True).stdout
        return dict(json.loads(out))

    # --- the mount ------------------------------------------------------------------------------------------

    def unmount(self) -> None:
        """Unmount cleanly (as a user would) and wait for the mount process to exit."""
        if os.path.ismount(self.mount):
            wait_until(lambda: self.fincryptfs("umount", str(self.mount), check=False).returncode == 0
                       or not os.path.ismount(self.mount), 30, "the mount to become idle for umount", 0.5)
        if self.mount_pid is not None:
            wait_until(lambda: not pid_alive(self.mount_pid or 0), 30, f"mount process {self.mount_pid} to exit")
            self.mount_pid = None

    def remount(self, *, clear_cache: bool = False) -> None:
        self.unmount()
        if clear_cache:
            cache = self.client_dir / "cache"
            subprocess.run(["rm", "-rf", str(cache)], check=True)
        out = self.fincryptfs("mount", str(self.mount), "--daemon", "--env-file", str(self.client_env))
        # "mounted DIR (process PID, log FILE)"
        self.mount_pid = int(out.stdout.split("(process ", 1)[1].split(",", 1)[0])

    def kill_mount(self) -> None:
        """kill -9 the client, then detach its dead mount point (what a user's reboot would do)."""
        assert self.mount_pid is not None
        os.kill(self.mount_pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(self.mount_pid or 0), 10, "the killed mount process to go")
        self.mount_pid = None
        subprocess.run(["fusermount3", "-u", "-z", str(self.mount)], check=False, capture_output=True)

    def kill_mount_if_alive(self) -> None:
        if self.mount_pid is not None and pid_alive(self.mount_pid):
            os.kill(self.mount_pid, signal.SIGKILL)
            wait_until(lambda: not pid_alive(self.mount_pid or 0), 10, "the mount process to go")
        self.mount_pid = None
        subprocess.run(["fusermount3", "-u", "-z", str(self.mount)], check=False, capture_output=True)

    # --- storage nodes --------------------------------------------------------------------------------------

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return list(self.info["nodes"])

    def node_index(self, node_id: str) -> int:
        for i, node in enumerate(self.nodes):
            if node["id"] == node_id:
                return i
        raise AssertionError(f"node {node_id[:16]} is not a devnet node")

    def node_env(self, i: int) -> Path:
        return self.home / f"node-{i}" / "storaged.env"

    def node_pid(self, i: int) -> int:
        proc = self.started.get(f"node-{i}")
        return proc.pid if proc is not None else int(self.nodes[i]["pid"])

    def node_running(self, i: int) -> bool:
        return pid_alive(self.node_pid(i))

    def node_running_all(self) -> bool:
        return all(self.node_running(i) for i in range(len(self.nodes)))

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        pid = self.node_pid(i)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        wait_until(lambda: not pid_alive(pid), 15, f"node {i} (process {pid}) to exit")

    def start_node(self, i: int, argv: list[str] | None = None) -> None:
        """(Re)start node i on its own port, identity and files; ``argv`` runs another program on its env."""
        assert not self.node_running(i), f"node {i} is still running"
        log = open(self.home / "logs" / f"storaged-{i}.restarted.log", "ab")  # noqa: SIM115
        command = argv or [PYTHON, "-m", "storaged.cli", "--env-file", str(self.node_env(i))]
        self.started[f"node-{i}"] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                     stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
        log.close()
        url = self.nodes[i]["url"]
        wait_until(lambda: self._healthy(url, f"node-{i}"), 30, f"node {i} to answer at {url}", 0.1)

    def _healthy(self, url: str, name: str) -> bool:
        proc = self.started.get(name)
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{name} exited with status {proc.returncode}; see {self.home / 'logs'}")
        try:
            return httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def share_files(self, i: int) -> dict[str, Path]:
        """share id → data file of every share file node i keeps."""
        out = {}
        for folder in self.nodes[i]["share_dirs"]:
            for path in Path(folder).glob("??/*.data"):
                out[path.name.split(".")[0]] = path
        return out

    def share_path(self, node_id: str, share_id: str) -> Path:
        return self.share_files(self.node_index(node_id))[share_id]

    # --- the mediator ---------------------------------------------------------------------------------------

    @property
    def mediator_url(self) -> str:
        return str(self.info["mediator"]["url"])

    @property
    def mediator_env(self) -> Path:
        return self.home / "mediator" / "mediatord.env"

    def mediator(self, path: str) -> dict[str, Any]:
        response = httpx.get(self.mediator_url + path, timeout=10, trust_env=False)
        response.raise_for_status()
        return dict(response.json())

    def node_record(self, node_id: str) -> dict[str, Any]:
        for node in self.mediator("/v1/nodes")["nodes"]:
            if node["node_id"] == node_id:
                return dict(node)
        raise AssertionError(f"the mediator does not list node {node_id[:16]}")

    def kill_mediator(self, sig: int = signal.SIGKILL) -> None:
        pid = self.mediator_pid
        os.kill(pid, sig)
        wait_until(lambda: not pid_alive(pid), 20, f"the mediator (process {pid}) to exit")

    def start_mediator(self, env_updates: dict[str, str] | None = None) -> None:
        """(Re)start the mediator on its own port, key and database, optionally with changed settings."""
        if env_updates:
            lines = [line for line in self.mediator_env.read_text().splitlines()
                     if line.split("=", 1)[0] not in env_updates]
            lines += [f"{k}={v}" for k, v in env_updates.items()]
            self.mediator_env.write_text("\n".join(lines) + "\n")
        log = open(self.home / "logs" / "mediatord.restarted.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen([PYTHON, "-m", "mediatord.cli", "--env-file", str(self.mediator_env)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
        log.close()
        old = self.started.pop("mediator", None)
        if old is not None:
            old.wait()
            self.started["mediator-old-" + str(old.pid)] = old
        self.started["mediator"] = proc
        self.mediator_pid = proc.pid
        wait_until(lambda: self._healthy(self.mediator_url, "mediator"), 30, "the mediator to answer", 0.1)

    def mediator_db(self) -> Any:
        """A read-only look at the mediator's SQLite (audit rounds and passes are not in any API)."""
        import sqlite3

        path = self.home / "mediator" / "data" / "mediator.sqlite3"
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        db.execute("PRAGMA busy_timeout=5000")
        return db

    # --- the account's view of its objects ------------------------------------------------------------------

    def object_info(self, object_id: str) -> ObjectInfo:
        """``GET /v1/objects/{id}`` signed by the account, as the client asks it (returns an ObjectInfo)."""
        from fincryptfs import rpc
        from fincryptfs.core.crypto import account_signing_key, decode_key_file
        from fincryptfs.mediator_client import MediatorClient

        master = decode_key_file((self.client_dir / "master.key").read_bytes(), None)

        async def ask() -> ObjectInfo:
            async with rpc.new_client() as http:
                client = MediatorClient(url=self.mediator_url, account_key=account_signing_key(master), http=http)
                return await client.object_info(object_id)

        return trio.run(ask)

    def read_object(self, stored_json: dict[str, Any]) -> bytes:
        """Read a whole stored object from the network with the client's own ObjectStore (no mount, no cache)."""
        from fincryptfs import rpc
        from fincryptfs.core.crypto import decode_key_file
        from fincryptfs.core.settings import ClientSettings, read_env_file
        from fincryptfs.datadir import open_store
        from fincryptfs.objectstore import StoredObject

        settings = ClientSettings.from_env(read_env_file(self.client_env, {}), home=self.home)
        master = decode_key_file((self.client_dir / "master.key").read_bytes(), None)
        stored = StoredObject.from_json(stored_json)

        async def read() -> bytes:
            async with rpc.new_client() as http:
                store = open_store(settings, master, http, trio.CapacityLimiter(2))
                return await store.read_range(stored, 0, stored.size)

        return trio.run(read)

    def stored_object_json(self, path: str) -> dict[str, Any]:
        """The StoredObject the client keeps for ``path`` in its tree (read-only look at the client's SQLite)."""
        from fincryptfs import meta

        db = meta.connect_readonly(self.client_dir / "data" / "meta.db")
        try:
            for inode in meta.files(db):
                if meta.path_of(db, inode.ino) == path and inode.object:
                    return dict(json.loads(inode.object))
        finally:
            db.close()
        raise AssertionError(f"{path} has no stored object")

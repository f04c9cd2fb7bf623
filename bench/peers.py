"""Fincrypt next to its peers, in one run, on the same generated data: a large file (``--big-mib``, 256 MiB) and
a tree of ``--small-files`` (2,000) files of 1-64 KiB.

Systems (``--peers``, every one by default):

* ``fincrypt``: a whole local network (``fincryptfs devnet``: one mediator, six storage nodes, 3-of-6) and a
  mount of its account. Upload = ``cp`` into the mount until ``fincryptfs flush`` returns (every share fsynced
  on its node, the object committed, the tree published). Cold read = unmount, delete the client's cache, mount
  again, read every byte (fetched from the nodes and decoded). Also, as ``fincrypt put``, the same data stored
  with ``fincryptfs put`` (no mount: the command copies into the tree and returns once everything is stored;
  timed whole, Python's start included), read back after the cold read and checked (not timed).
* ``restic``: ``restic backup`` to a fresh local repository + ``sync``; ``restic restore`` (its cache deleted).
* ``gocryptfs``: ``cp`` into the mount + ``sync``; read back through the mount.
* ``tahoe``: Tahoe-LAFS 1.20 on 127.0.0.1 (introducer, six storage nodes, one client; 3-of-6, happy 5), installed
  from PyPI into its own virtual environment (``--cache-dir``, reused across runs); ``tahoe put`` + ``sync`` /
  ``tahoe get`` for the large file, ``tahoe cp -r`` both ways for the first ``--tahoe-small-files`` (300) small
  files only, as it stores a few dozen files a second. If it cannot be installed or started, the run goes on
  without it and says why.
* ``cp``: ``cp`` + ``sync`` to a plain folder, and reading it back: the disk's own figures.

The page cache is dropped before every timed phase, for every system alike, so each upload reads its source
from the disk and each read comes from the disk or the network. Every read is checked against the source
afterwards (not timed). With ``--reps N`` each figure is the median of N runs. restic and gocryptfs are
installed with apt-get when missing (``--no-install`` to skip). Output: a table of MB/s and files/s per system
and phase, the peak RSS of Fincrypt's processes, Fincrypt's ratio to each peer, the issue's targets, and one
JSON object as the last line.

    python bench/peers.py [--big-mib 256] [--small-files 2000] [--tahoe-small-files 300] \\
        [--peers fincrypt,restic,gocryptfs,tahoe,cp] [--reps 1]

Needs root (drop_caches, apt-get) and /dev/fuse. Nothing is stopped by name: every daemon is tracked by PID and
stopped, and every mount unmounted, on the way out.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchkit import PYTHON, compile_sources, drop_caches, log_tail, peak_rss, timed

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6
SYSTEMS = ("fincrypt", "restic", "gocryptfs", "tahoe", "cp")
PHASES = ("upload_big", "read_big", "upload_small", "read_small")
TAHOE_VERSION = "1.20.0"
TAHOE_NEEDED, TAHOE_HAPPY, TAHOE_TOTAL = 3, 5, 6
# (phase, peer, minimum Fincrypt/peer ratio): the targets of the issue.
TARGETS = (("upload_big", "restic", 1.0), ("upload_big", "tahoe", 2.5), ("read_big", "restic", 1.0),
           ("upload_small", "restic", 1.0), ("read_small", "restic", 1.0))
LONG = 3600.0  # timeout of one command: generous, only there so a wedged peer cannot hang the run forever


def say(message: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the data ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    big: Path
    big_bytes: int
    small: Path  # a folder of sub-folders of 100 files each
    small_bytes: int
    small_files: int


def make_data(root: Path, big_mib: int, small_files: int) -> Dataset:
    """Random (incompressible, undeduplicable) content; sizes from a fixed seed."""
    rng = random.Random(7)
    root.mkdir(parents=True)
    big = root / "big.bin"
    with open(big, "wb") as f:
        for _ in range(big_mib):
            f.write(os.urandom(2**20))
    small = root / "small"
    small_bytes = 0
    for i in range(small_files):
        size = rng.randrange(1024, 64 * 1024 + 1)
        folder = small / f"d{i // 100:03}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i:05}").write_bytes(os.urandom(size))
        small_bytes += size
    return Dataset(big, big_mib * 2**20, small, small_bytes, small_files)


def small_subset(data: Dataset, count: int, root: Path) -> Dataset:
    """The first ``count`` small files (hard links, same layout), for a peer too slow for the whole tree."""
    if count >= data.small_files:
        return data
    small, total = root / "small", 0
    for path in sorted(data.small.rglob("f*"))[:count]:
        target = small / path.relative_to(data.small)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
        total += target.stat().st_size
    return Dataset(data.big, data.big_bytes, small, total, count)


def read_all(path: Path) -> int:
    """Read every byte of a file or of every file below a folder, 1 MiB at a time (``cat > /dev/null``)."""
    files: Iterator[Path] = iter([path]) if path.is_file() else (p for p in sorted(path.rglob("*")) if p.is_file())
    total = 0
    for name in files:
        with open(name, "rb", buffering=0) as f:
            while chunk := f.read(2**20):
                total += len(chunk)
    return total


def check_same(source: Path, copy: Path) -> None:
    """The copy holds exactly the source's files and bytes (raises otherwise)."""
    if source.is_file():
        if not filecmp.cmp(source, copy, shallow=False):
            raise RuntimeError(f"{copy} differs from {source}")
        return
    want = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
    got = sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file())
    if want != got:
        raise RuntimeError(f"{copy} holds {len(got)} files, {source} {len(want)}")
    for rel in want:
        if not filecmp.cmp(source / rel, copy / rel, shallow=False):
            raise RuntimeError(f"{copy / rel} differs from {source / rel}")


def run(*argv: object, env: dict[str, str] | None = None, timeout: float = LONG) -> str:
    """Run a command to completion; on failure raise with the end of its output."""
    result = subprocess.run([str(a) for a in argv], env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(str(a) for a in argv[:3])} failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()[-600:]}")
    return result.stdout


def synced(*argv: object, env: dict[str, str] | None = None, sync: bool = True) -> Callable[[], None]:
    """A command followed by ``sync`` (unless ``sync`` is false): what a durable local copy costs."""
    def go() -> None:
        run(*argv, env=env)
        if sync:
            os.sync()
    return go


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- processes and mounts we own --------------------------------------------------------------------------------


class Interrupted(SystemExit):
    """SIGINT or SIGTERM: unwinds like an exit, so every ``finally`` releases what it holds."""


@dataclass
class Owned:
    """Every process this run started (by PID) and every mount it made, released in reverse order by ``close``.

    SIGINT and SIGTERM are held back while a child is being started, so none can start untracked."""

    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    mounts: list[Path] = field(default_factory=list)
    starting: bool = False
    pending_signal: int | None = None

    def on_signal(self, signum: int, _frame: object) -> None:
        if self.starting:
            self.pending_signal = signum
        else:
            raise Interrupted(128 + signum)

    def spawn(self, argv: list[str], log: Path, *, new_session: bool = False,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.starting = True
        try:
            with open(log, "ab") as out:
                process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           cwd=ROOT, env=env, start_new_session=new_session)
            self.processes.append(process)
        finally:
            self.starting = False
        if self.pending_signal is not None:
            raise Interrupted(128 + self.pending_signal)
        return process

    def stop(self, process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 30.0) -> None:
        """``sig``, then SIGKILL after ``grace`` seconds (to its own process group if it leads one)."""
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                if os.getpgid(process.pid) == process.pid:
                    os.killpg(process.pid, signal.SIGKILL)
                else:
                    process.kill()
                process.wait()
        if process in self.processes:
            self.processes.remove(process)

    def mounted(self, path: Path, process: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
        self.mounts.append(path)
        deadline = time.monotonic() + timeout
        while not os.path.ismount(path):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{path} was not mounted; see {log}")
            time.sleep(0.05)

    def unmount(self, path: Path) -> None:
        if os.path.ismount(path):
            result = subprocess.run(["fusermount3", "-u", str(path)], capture_output=True)
            if result.returncode != 0:  # busy: detach it so nothing is left behind
                subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)
        if path in self.mounts:
            self.mounts.remove(path)

    def close(self) -> None:
        self.starting = True  # a further signal is only noted: the cleanup runs to its end
        for path in reversed(list(self.mounts)):
            self.unmount(path)
        for process in reversed(list(self.processes)):
            self.stop(process)


# --- measurements -----------------------------------------------------------------------------------------------


@dataclass
class Results:
    seconds: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    amounts: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)  # system -> phase -> bytes, files
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, object] = field(default_factory=dict)

    def record(self, system: str, phase: str, seconds: float, nbytes: int, files: int) -> None:
        self.seconds.setdefault(system, {}).setdefault(phase, []).append(seconds)
        self.amounts.setdefault(system, {})[phase] = (nbytes, files)
        rate = f"{nbytes / MB / seconds:.1f} MB/s" + (f", {files / seconds:.0f} files/s" if files > 1 else "")
        say(f"  {system} {phase}: {seconds:.2f} s ({rate})")

    def figures(self, system: str) -> dict[str, float]:
        """MB/s of every phase, files/s of the small-file phases, from the median time of the repetitions."""
        out: dict[str, float] = {}
        for phase, times in self.seconds.get(system, {}).items():
            nbytes, files = self.amounts[system][phase]
            median = statistics.median(times)
            out[f"{phase}_mb_s"] = round(nbytes / MB / median, 2)
            if phase.endswith("small"):
                out[f"{phase}_files_s"] = round(files / median, 1)
        return out


def rate_key(phase: str) -> str:
    """The figure a phase is compared on: files/s for small files, MB/s for the large file."""
    return f"{phase}_files_s" if phase.endswith("small") else f"{phase}_mb_s"


# --- the systems ------------------------------------------------------------------------------------------------


def copy_in_and_read_back(system: str, data: Dataset, dest: Path, results: Results) -> None:
    """``cp -a`` both data sets into ``dest`` (+ sync), then read them back, each timed from a cold page cache:
    the whole benchmark of a system that is just a folder (plain disk, a gocryptfs mount)."""
    dest.mkdir()
    for phase, source in (("big", data.big), ("small", data.small)):
        nbytes, files = (data.big_bytes, 1) if phase == "big" else (data.small_bytes, data.small_files)
        target = dest / source.name
        drop_caches(required=True)
        results.record(system, f"upload_{phase}", timed(synced("cp", "-a", source, target)), nbytes, files)
        drop_caches(required=True)
        results.record(system, f"read_{phase}", timed(read_all, target), nbytes, files)
        check_same(source, target)


def bench_cp(data: Dataset, work: Path, reps: int, results: Results, owned: Owned) -> None:
    for rep in range(reps):
        copy_in_and_read_back("cp", data, work / f"plain-{rep}", results)
        shutil.rmtree(work / f"plain-{rep}")


def bench_restic(data: Dataset, work: Path, reps: int, results: Results, owned: Owned) -> None:
    results.notes["restic_version"] = run("restic", "version").strip()
    cache = work / "restic-cache"
    env = {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(cache)}
    for rep in range(reps):
        for phase, source in (("big", data.big), ("small", data.small)):
            nbytes, files = (data.big_bytes, 1) if phase == "big" else (data.small_bytes, data.small_files)
            repo, target = work / f"restic-repo-{phase}-{rep}", work / f"restic-restore-{phase}-{rep}"
            run("restic", "init", "-q", "-r", repo, env=env)
            drop_caches(required=True)
            up = timed(synced("restic", "backup", "-q", "--host", "bench", "-r", repo, source, env=env))
            results.record("restic", f"upload_{phase}", up, nbytes, files)
            shutil.rmtree(cache, ignore_errors=True)  # cold, like Fincrypt's deleted cache
            drop_caches(required=True)
            down = timed(synced("restic", "restore", "-q", "latest", "-r", repo, "--target", target,
                                 env=env, sync=False))
            results.record("restic", f"read_{phase}", down, nbytes, files)
            check_same(source, target / source.relative_to("/"))
            shutil.rmtree(repo)
            shutil.rmtree(target)
    shutil.rmtree(cache, ignore_errors=True)


def bench_gocryptfs(data: Dataset, work: Path, reps: int, results: Results, owned: Owned) -> None:
    results.notes["gocryptfs_version"] = run("gocryptfs", "--version").strip()
    cipher, mnt, password = work / "gocryptfs-cipher", work / "gocryptfs-mnt", work / "gocryptfs-pass"
    cipher.mkdir()
    mnt.mkdir()
    password.write_text("bench\n")
    run("gocryptfs", "-init", "-q", "-passfile", password, cipher)
    log = work / "gocryptfs.log"
    process = owned.spawn(["gocryptfs", "-fg", "-q", "-passfile", str(password), str(cipher), str(mnt)], log)
    try:
        owned.mounted(mnt, process, log)
        for rep in range(reps):
            copy_in_and_read_back("gocryptfs", data, mnt / f"r{rep}", results)
    finally:
        owned.unmount(mnt)
        owned.stop(process)


def env_value(env_file: Path, name: str) -> str:
    for line in env_file.read_text().splitlines():
        if line.startswith(f"{name}="):
            return line.split("=", 1)[1].strip()
    raise RuntimeError(f"{env_file} does not set {name}")


def bench_fincrypt(data: Dataset, work: Path, reps: int, results: Results, owned: Owned) -> None:
    """The devnet runs without its own mount: this function mounts and unmounts the account itself, so that a
    cold read can follow an unmount and a deleted cache, and so that the mount's RSS can be read."""
    python = PYTHON
    home, mnt = work / "fincrypt-net", work / "fincrypt-mnt"
    home.mkdir()
    mnt.mkdir()
    devnet_log = work / "fincrypt-devnet.log"
    devnet = owned.spawn([python, "-m", "fincryptfs.cli", "devnet", "--home", str(home), "--nodes", "6"],
                         devnet_log, new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (home / "devnet.json").exists():
            if devnet.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Fincrypt devnet did not start:\n{log_tail(devnet_log)}")
            time.sleep(0.2)
        info = json.loads((home / "devnet.json").read_text())
        env_file = Path(info["client_env"])
        with open(env_file, "a") as f:
            f.write("FINCRYPT_CACHE_LIMIT_BYTES=4G\n")  # keep everything written in the cache: no eviction work
        cache_dir = Path(env_value(env_file, "FINCRYPT_CACHE_DIR"))
        mount_log = work / "fincrypt-mount.log"
        rss = {"mount": 0}

        def mount() -> subprocess.Popen[bytes]:
            process = owned.spawn([python, "-m", "fincryptfs.cli", "mount", str(mnt), "--env-file", str(env_file)],
                                  mount_log)
            owned.mounted(mnt, process, mount_log)
            return process

        def unmount(process: subprocess.Popen[bytes]) -> None:
            rss["mount"] = max(rss["mount"], peak_rss(process.pid))
            owned.unmount(mnt)
            owned.stop(process, grace=60)

        def durable(*argv: object) -> Callable[[], None]:
            def go() -> None:
                run(*argv)
                run(python, "-m", "fincryptfs.cli", "flush", "--env-file", env_file)
            return go

        for rep in range(reps):
            process = mount()
            try:
                dest = mnt / f"r{rep}"
                dest.mkdir()
                for phase, source in (("big", data.big), ("small", data.small)):
                    nbytes, files = (data.big_bytes, 1) if phase == "big" else (data.small_bytes, data.small_files)
                    drop_caches(required=True)
                    results.record("fincrypt", f"upload_{phase}", timed(durable("cp", "-a", source, dest)), nbytes,
                                   files)
            finally:
                unmount(process)
            for phase, source in (("big", data.big), ("small", data.small)):
                nbytes, files = (data.big_bytes, 1) if phase == "big" else (data.small_bytes, data.small_files)
                drop_caches(required=True)
                results.record("fincrypt put", f"upload_{phase}",
                               timed(run, python, "-m", "fincryptfs.cli", "put", source, f"/put{rep}", "--env-file",
                                     env_file), nbytes, files)
            shutil.rmtree(cache_dir)
            process = mount()
            try:
                for phase, source in (("big", data.big), ("small", data.small)):
                    nbytes, files = (data.big_bytes, 1) if phase == "big" else (data.small_bytes, data.small_files)
                    target = dest / source.name
                    drop_caches(required=True)
                    results.record("fincrypt", f"read_{phase}", timed(read_all, target), nbytes, files)
                    check_same(source, target)
                    check_same(source, mnt / f"put{rep}" / source.name)
            finally:
                unmount(process)
        rss["nodes_max"] = max(peak_rss(node["pid"]) for node in info["nodes"])
        rss["mediator"] = peak_rss(info["mediator"]["pid"])
        results.notes["fincrypt_peak_rss_mib"] = {k: round(v / 2**20, 1) for k, v in rss.items()}
    finally:
        owned.unmount(mnt)
        owned.stop(devnet, signal.SIGINT, grace=60)  # the devnet stops its own children by PID


def tahoe_install(cache: Path, install: bool) -> Path:
    """The ``tahoe`` of a virtual environment under ``cache`` holding tahoe-lafs 1.20 (installed if need be)."""
    venv = cache / "tahoe-venv"
    tahoe = venv / "bin" / "tahoe"
    version = subprocess.run([str(tahoe), "--version"], capture_output=True, text=True) if tahoe.exists() else None
    if version is not None and f"tahoe-lafs/{TAHOE_VERSION}" in version.stdout:
        return tahoe
    if not install:
        raise RuntimeError(f"tahoe-lafs {TAHOE_VERSION} is not installed in {venv} and --no-install was given")
    say(f"installing tahoe-lafs=={TAHOE_VERSION} into {venv} (a minute or two, once)")
    shutil.rmtree(venv, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    base_python = shutil.which("python3") or sys.executable
    run(base_python, "-m", "venv", venv, timeout=600)
    log = cache / "tahoe-pip.log"
    with open(log, "w") as out:
        pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--disable-pip-version-check",
                              f"tahoe-lafs=={TAHOE_VERSION}"], stdout=out, stderr=subprocess.STDOUT, timeout=1800)
    if pip.returncode != 0 or not tahoe.exists():
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise RuntimeError(f"pip install tahoe-lafs=={TAHOE_VERSION} failed (see {log}): {tail}")
    return tahoe


def tahoe_grid(tahoe: Path, grid: Path, owned: Owned) -> Path:
    """Introducer + six storage nodes + one client on 127.0.0.1; returns the client's folder once it is connected
    to all six storage nodes."""
    encoding = [f"--shares-needed={TAHOE_NEEDED}", f"--shares-happy={TAHOE_HAPPY}", f"--shares-total={TAHOE_TOTAL}"]
    port = free_port()
    run(tahoe, "create-introducer", f"--port=tcp:{port}:interface=127.0.0.1", f"--location=tcp:127.0.0.1:{port}",
        grid / "introducer")
    owned.spawn([str(tahoe), "run", "--allow-stdin-close", str(grid / "introducer")], grid / "introducer.log")
    furl_file = grid / "introducer" / "private" / "introducer.furl"
    deadline = time.monotonic() + 60
    while not (furl_file.exists() and furl_file.stat().st_size):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Tahoe introducer wrote no furl; see {grid / 'introducer.log'}")
        time.sleep(0.1)
    furl = furl_file.read_text().strip()
    for i in range(TAHOE_TOTAL):
        port = free_port()
        run(tahoe, "create-node", f"--nickname=storage{i}", f"--port=tcp:{port}:interface=127.0.0.1",
            f"--location=tcp:127.0.0.1:{port}", "--webport=none", f"--introducer={furl}", *encoding,
            grid / f"storage{i}")
    web = free_port()
    client = grid / "client"
    run(tahoe, "create-client", "--nickname=client", f"--introducer={furl}",
        f"--webport=tcp:{web}:interface=127.0.0.1", *encoding, client)
    for name in [f"storage{i}" for i in range(TAHOE_TOTAL)] + ["client"]:
        owned.spawn([str(tahoe), "run", "--allow-stdin-close", str(grid / name)], grid / f"{name}.log")
    deadline = time.monotonic() + 120
    connected = 0
    while connected < TAHOE_TOTAL:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Tahoe client saw {connected} of {TAHOE_TOTAL} storage nodes after 120 s; "
                               f"see the logs in {grid}")
        time.sleep(0.5)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{web}/?t=json", timeout=5) as answer:
                servers = json.load(answer).get("servers", [])
        except (OSError, ValueError):
            continue
        connected = sum(str(s.get("connection_status", "")).lower().startswith("connected") for s in servers)
    return client


def bench_tahoe(data: Dataset, work: Path, reps: int, results: Results, owned: Owned, *, cache: Path,
                install: bool) -> None:
    tahoe = tahoe_install(cache, install)
    results.notes["tahoe_version"] = run(tahoe, "--version").strip().splitlines()[0]
    grid, out = work / "tahoe-grid", work / "tahoe-out"
    grid.mkdir()
    out.mkdir()
    started = len(owned.processes)
    try:
        client = tahoe_grid(tahoe, grid, owned)
        cli = [tahoe, "-d", client]
        run(*cli, "create-alias", "bench")
        for rep in range(reps):
            drop_caches(required=True)
            results.record("tahoe", "upload_big", timed(synced(*cli, "put", data.big, f"bench:big-{rep}.bin")),
                           data.big_bytes, 1)
            target = out / f"big-{rep}.bin"
            drop_caches(required=True)
            results.record("tahoe", "read_big", timed(run, *cli, "get", f"bench:big-{rep}.bin", target),
                           data.big_bytes, 1)
            check_same(data.big, target)
            target.unlink()
            run(*cli, "mkdir", f"bench:r{rep}")
            drop_caches(required=True)
            results.record("tahoe", "upload_small", timed(synced(*cli, "cp", "-r", data.small, f"bench:r{rep}/")),
                           data.small_bytes, data.small_files)
            drop_caches(required=True)
            results.record("tahoe", "read_small",
                           timed(run, *cli, "cp", "-r", f"bench:r{rep}/small", out),
                           data.small_bytes, data.small_files)
            check_same(data.small, out / "small")
            shutil.rmtree(out / "small")
    finally:
        for process in reversed(owned.processes[started:]):
            owned.stop(process)


def ensure_apt_tools(tools: list[str], install: bool) -> None:
    """apt-get install the Debian packages of the named tools that are missing (best effort)."""
    missing = [tool for tool in tools if not shutil.which(tool)]
    if not missing or not install:
        return
    say(f"apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env, capture_output=True)


# --- the report -------------------------------------------------------------------------------------------------


def report(args: argparse.Namespace, data: Dataset, tahoe_files: int, results: Results, elapsed: dict[str, float]
           ) -> dict[str, Any]:
    systems = {name: results.figures(name) for name in (*args.peers, "fincrypt put") if name in results.seconds}
    ours = systems.get("fincrypt", {})
    put = systems.get("fincrypt put", {})
    ratios: dict[str, float | None] = {}
    for peer in (p for p in SYSTEMS if p != "fincrypt" and p in args.peers):
        for phase in PHASES:
            key = rate_key(phase)
            theirs = systems.get(peer, {}).get(key)
            ratios[f"{phase}_vs_{peer}"] = round(ours[key] / theirs, 2) if key in ours and theirs else None
    for phase in ("upload_big", "upload_small"):  # fincryptfs put, without the mount
        key = rate_key(phase)
        theirs = systems.get("restic", {}).get(key)
        ratios[f"put_{phase}_vs_restic"] = round(put[key] / theirs, 2) if key in put and theirs else None
    targets = {}
    for phase, peer, minimum in TARGETS:
        ratio = ratios.get(f"{phase}_vs_{peer}")
        targets[f"{phase}_vs_{peer}"] = {"min": minimum, "ratio": ratio,
                                         "met": None if ratio is None else ratio >= minimum}
    measured = [t["met"] for t in targets.values() if t["met"] is not None]
    return {
        "bench": "peers", "big_mib": args.big_mib, "small_files": data.small_files, "small_bytes": data.small_bytes,
        "tahoe_small_files": tahoe_files if "tahoe" in systems else None, "reps": args.reps,
        "peers": list(args.peers), "systems": systems, "skipped": results.skipped, "ratios": ratios,
        "targets": targets, "meets_targets": all(measured) if len(measured) == len(targets) else None,
        **results.notes, "elapsed_s": {k: round(v, 1) for k, v in elapsed.items()},
    }


def print_table(summary: dict[str, Any], tahoe_files: int) -> None:
    systems: dict[str, dict[str, float]] = summary["systems"]
    small = summary["small_files"]
    print(f"\nSame data for every system: a {summary['big_mib']} MiB file and {small} files of 1-64 KiB "
          f"({summary['small_bytes'] / MB:.1f} MB); median of {summary['reps']} run(s); page cache dropped before "
          f"each phase.")
    heads = ("system", "upload big MB/s", "cold read big MB/s", "small up files/s", "small down files/s",
             "small files")
    print("| " + " | ".join(heads) + " |")
    print("|" + "|".join("---" for _ in heads) + "|")
    for name, figures in systems.items():
        cells = [figures.get(rate_key(phase)) for phase in PHASES]
        count = tahoe_files if name == "tahoe" else small
        print("| " + " | ".join([name, *("-" if c is None else f"{c:,.1f}" for c in cells), f"{count:,}"]) + " |")
    for name, why in summary["skipped"].items():
        print(f"skipped {name}: {why}")
    rss = summary.get("fincrypt_peak_rss_mib")
    if rss:
        print(f"Fincrypt peak RSS (MiB): mount {rss['mount']}, largest storage node {rss['nodes_max']}, "
              f"mediator {rss['mediator']}")
    if not any(v is not None for v in summary["ratios"].values()):
        print("\nNo Fincrypt/peer ratios: Fincrypt or every peer was left out.")
    else:
        print("\nFincrypt / peer (files/s for small files, MB/s otherwise):")
    for name, value in summary["ratios"].items():
        if value is not None:
            print(f"  {name:<28} {value:>6.2f}x")
    print("\nTargets (Fincrypt through the mount):")
    for name, target in summary["targets"].items():
        verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        ratio = "-" if target["ratio"] is None else f"{target['ratio']:.2f}x"
        print(f"  {name:<28} {ratio:>7} (>= {target['min']}x): {verdict}")
    if "tahoe" in systems and tahoe_files != small:
        print(f"(Tahoe's small-file figures are over the first {tahoe_files} of the {small} files.)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big-mib", type=int, default=256, help="size of the large file (MiB)")
    parser.add_argument("--small-files", type=int, default=2000, help="number of small files (1-64 KiB each)")
    parser.add_argument("--tahoe-small-files", type=int, default=300,
                        help="how many of the small files Tahoe gets (it stores a few dozen files/s)")
    parser.add_argument("--peers", default=",".join(SYSTEMS), help="systems to measure, comma-separated")
    parser.add_argument("--reps", type=int, default=1, help="runs of every measurement (median reported)")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "fincrypt-bench",
                        help="where Tahoe's virtual environment is kept between runs")
    parser.add_argument("--no-install", action="store_true", help="install nothing (apt-get, pip)")
    args = parser.parse_args()
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(args.peers) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {','.join(SYSTEMS)}")
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("peers: skipped (needs root and /dev/fuse)")
        print(json.dumps({"bench": "peers", "skipped": "needs root and /dev/fuse"}))
        return 0
    compile_sources()
    owned = Owned()
    signal.signal(signal.SIGTERM, owned.on_signal)
    signal.signal(signal.SIGINT, owned.on_signal)
    work = Path(tempfile.mkdtemp(prefix="fincrypt-peers-"))
    results = Results()
    elapsed: dict[str, float] = {}
    start = time.perf_counter()
    try:
        ensure_apt_tools([p for p in ("restic", "gocryptfs") if p in args.peers], not args.no_install)
        data = make_data(work / "data", args.big_mib, args.small_files)
        tahoe_data = small_subset(data, args.tahoe_small_files, work / "tahoe-data")
        say(f"data: {args.big_mib} MiB file and {data.small_files} small files ({data.small_bytes / MB:.1f} MB) "
            f"in {work}")
        benches: dict[str, Callable[[], None]] = {
            "cp": lambda: bench_cp(data, work, args.reps, results, owned),
            "restic": lambda: bench_restic(data, work, args.reps, results, owned),
            "gocryptfs": lambda: bench_gocryptfs(data, work, args.reps, results, owned),
            "fincrypt": lambda: bench_fincrypt(data, work, args.reps, results, owned),
            "tahoe": lambda: bench_tahoe(tahoe_data, work, args.reps, results, owned, cache=args.cache_dir,
                                         install=not args.no_install),
        }
        for name in (s for s in SYSTEMS if s in args.peers):
            if name in ("restic", "gocryptfs") and not shutil.which(name):
                results.skipped[name] = f"{name} is not installed (apt-get install {name})"
                say(f"skipping {name}: {results.skipped[name]}")
                continue
            say(f"{name}: starting")
            t0 = time.perf_counter()
            try:
                benches[name]()
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
                if name == "fincrypt":
                    raise
                results.skipped[name] = str(error)
                results.seconds.pop(name, None)
                say(f"{name} failed, going on without it: {error}")
            elapsed[name] = time.perf_counter() - t0
        elapsed["total"] = time.perf_counter() - start
        summary = report(args, data, tahoe_data.small_files, results, elapsed)
        print_table(summary, tahoe_data.small_files)
        print(json.dumps(summary))
        return 0
    finally:
        owned.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

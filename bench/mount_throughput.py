"""Throughput of a real mount over a real local network (one mediator, six storage nodes, all on loopback).

Phases, each timed and printed separately:

* large file: ``cp`` into the mount (warm write: the write-back cache absorbs it), then until ``fincryptfs
  flush`` returns (durable upload: encrypted, erasure-coded, fsynced on the nodes, committed, tree published);
* small files: the same with ``cp -a`` of the small-file tree (files/s);
* cold read: after unmounting and clearing the cache, every byte fetched from the nodes (large MB/s, small
  files/s);
* warm read of the large file and of the small files from the local cache (page cache dropped first, as for
  the others).

Small-file figures are files/s: ``write_small_files_s`` (``cp -a`` into the mount), ``durable_upload_small_files_s``
(from the start of the copy until ``fincryptfs flush`` returns), ``cold_read_small_files_s`` and
``warm_read_small_files_s``.

Beside them, measured in the same run on the same data: ``cp`` + ``sync`` to a plain folder, restic (backup of
a fresh local repository + sync, restore after dropping the page cache) and gocryptfs (``cp`` into the mount +
sync, ``cat`` after dropping the page cache). restic and gocryptfs are installed with apt-get when missing
(``--no-install`` to skip). Reports MB/s, files/s, Fincrypt-to-peer ratios and the mount's peak RSS; the last
line of output is one JSON object.

    python bench/mount_throughput.py [--large-mib 256] [--small-files 2000] [--no-install]

Needs root and /dev/fuse (as the mount does).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import PYTHON, compile_sources, drop_caches, peak_rss, start_devnet, timed

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6


def make_source(src: Path, large_mib: int, small_files: int) -> tuple[int, int]:
    """A large file and ``small_files`` files of 1-64 KiB; returns (bytes, files)."""
    rng = random.Random(1)
    (src / "small").mkdir(parents=True)
    total = 0
    with open(src / "large.bin", "wb") as f:
        for _ in range(large_mib):
            f.write(os.urandom(2**20))
    total += large_mib * 2**20
    for i in range(small_files):
        size = rng.randrange(1024, 64 * 1024 + 1)
        sub = src / "small" / f"d{i // 100:02}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i:05}").write_bytes(os.urandom(size))
        total += size
    return total, small_files + 1


def read_all(root: Path) -> int:
    """Read every file below ``root`` (or ``root`` itself if it is a file) in 1 MiB chunks."""
    total = 0
    walk = [(str(root.parent), [], [root.name])] if root.is_file() else os.walk(root)
    for dirpath, _, filenames in walk:
        for name in filenames:
            with open(Path(dirpath) / name, "rb", buffering=0) as f:
                while chunk := f.read(2**20):
                    total += len(chunk)
    return total


def cli(env_file: Path, *args: str) -> None:
    subprocess.run([PYTHON, "-m", "fincryptfs.cli", *args, "--env-file", str(env_file)], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)


class Mount:
    def __init__(self, env_file: Path, mountpoint: Path, log: Path) -> None:
        self.env_file, self.mountpoint, self.log = env_file, mountpoint, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([PYTHON, "-m", "fincryptfs.cli", "mount", str(self.mountpoint),
                                             "--env-file", str(self.env_file)], stdout=log, stderr=log, cwd=ROOT)
        deadline = time.monotonic() + 60
        while not os.path.ismount(self.mountpoint):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the mount did not come up; see {self.log}")
            time.sleep(0.05)

    def stop(self) -> int:
        """Unmount, wait for the process; returns its peak RSS."""
        assert self.process is not None
        rss = peak_rss(self.process.pid)
        subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        return rss


def ensure_peers(install: bool) -> None:
    """apt-get install restic and gocryptfs when missing (best effort: the bench runs without them)."""
    missing = [tool for tool in ("restic", "gocryptfs") if not shutil.which(tool)]
    if not missing or not install:
        return
    print(f"installing {' '.join(missing)} with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env, capture_output=True)


def sh(*argv: str, env: dict[str, str] | None = None, sync: bool = False) -> None:
    """Run a command (failing loudly); ``sync``: then write everything back, as a durable copy needs."""
    subprocess.run(list(argv), env=env, check=True, capture_output=True)
    if sync:
        os.sync()


def compare_tools(src: Path, work: Path, large_bytes: int, small_bytes: int, small_files: int
                  ) -> dict[str, float]:
    """cp + sync to a plain folder, restic and gocryptfs (when installed) on the same data."""
    large, small = src / "large.bin", src / "small"
    plain = work / "plain"
    plain.mkdir()
    drop_caches()
    result = {"plain_cp_large_mb_s": large_bytes / MB / timed(sh, "cp", str(large), str(plain / "large.bin"),
                                                               sync=True)}
    drop_caches()
    result["plain_cp_small_files_s"] = small_files / timed(
        sh, "cp", "-a", str(small), str(plain / "small"), sync=True)
    shutil.rmtree(plain)
    if shutil.which("restic"):
        env = {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(work / "restic-cache")}
        for label, path, nbytes, nfiles in (("large", large, large_bytes, 0), ("small", small, small_bytes,
                                                                                small_files)):
            repo, target = work / f"restic-repo-{label}", work / f"restic-restore-{label}"
            sh("restic", "init", "-q", "-r", str(repo), env=env)
            drop_caches()
            up = timed(sh, "restic", "backup", "-q", "-r", str(repo), str(path), env=env, sync=True)
            drop_caches()
            down = timed(sh, "restic", "restore", "-q", "latest", "-r", str(repo), "--target", str(target), env=env)
            if label == "large":
                result["restic_backup_large_mb_s"] = nbytes / MB / up
                result["restic_restore_large_mb_s"] = nbytes / MB / down
            else:
                result["restic_backup_small_files_s"] = nfiles / up
                result["restic_restore_small_files_s"] = nfiles / down
            shutil.rmtree(repo)
            shutil.rmtree(target)
        shutil.rmtree(work / "restic-cache", ignore_errors=True)
    if shutil.which("gocryptfs"):
        cipher, mnt = work / "gc-cipher", work / "gc-plain"
        cipher.mkdir()
        mnt.mkdir()
        pw = work / "gc-pass"
        pw.write_text("bench\n")
        sh("gocryptfs", "-init", "-q", "-passfile", str(pw), str(cipher))
        sh("gocryptfs", "-q", "-passfile", str(pw), str(cipher), str(mnt))
        try:
            drop_caches()
            result["gocryptfs_write_large_mb_s"] = large_bytes / MB / timed(
                sh, "cp", str(large), str(mnt / "large.bin"), sync=True)
            drop_caches()
            result["gocryptfs_read_large_mb_s"] = large_bytes / MB / timed(read_all, mnt / "large.bin")
            drop_caches()
            result["gocryptfs_write_small_files_s"] = small_files / timed(
                sh, "cp", "-a", str(small), str(mnt / "small"), sync=True)
            drop_caches()
            result["gocryptfs_read_small_files_s"] = small_files / timed(read_all, mnt / "small")
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        shutil.rmtree(cipher, ignore_errors=True)
    return result


RATIOS = (("durable_upload_large_mb_s", "restic_backup_large_mb_s"),
          ("cold_read_large_mb_s", "restic_restore_large_mb_s"),
          ("write_large_mb_s", "gocryptfs_write_large_mb_s"),
          ("warm_read_large_mb_s", "gocryptfs_read_large_mb_s"),
          ("durable_upload_small_files_s", "restic_backup_small_files_s"),
          ("cold_read_small_files_s", "restic_restore_small_files_s"),
          ("write_small_files_s", "gocryptfs_write_small_files_s"),
          ("warm_read_small_files_s", "gocryptfs_read_small_files_s"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large-mib", type=int, default=256)
    parser.add_argument("--small-files", type=int, default=2000)
    parser.add_argument("--no-install", action="store_true", help="do not apt-get install restic / gocryptfs")
    args = parser.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("mount_throughput: skipped (needs root and /dev/fuse)")
        print(json.dumps({"bench": "mount_throughput", "skipped": "needs root and /dev/fuse"}))
        return 0
    compile_sources()
    work = Path(tempfile.mkdtemp(prefix="fincrypt-bench-"))
    network = None
    mount = None
    try:
        src = work / "src"
        nbytes, nfiles = make_source(src, args.large_mib, args.small_files)
        large_bytes = args.large_mib * 2**20
        small_bytes = nbytes - large_bytes
        print(f"source: {nbytes / MB:.0f} MB in {nfiles} files", file=sys.stderr)
        report: dict[str, object] = {"bench": "mount_throughput", "bytes": nbytes, "files": nfiles}
        ensure_peers(not args.no_install)
        report.update(compare_tools(src, work, large_bytes, small_bytes, args.small_files))

        home = work / "net"
        home.mkdir()
        network = start_devnet(home)
        info = json.loads((home / "devnet.json").read_text())
        env_file = Path(info["client_env"])
        with open(env_file, "a") as f:
            f.write("FINCRYPT_CACHE_LIMIT_BYTES=4G\n")
        cache_dir = Path(next(line.split("=", 1)[1] for line in env_file.read_text().splitlines()
                              if line.startswith("FINCRYPT_CACHE_DIR=")))
        mnt = work / "mnt"
        mnt.mkdir()
        mount = Mount(env_file, mnt, work / "mount.log")
        mount.start()

        drop_caches()
        start = time.perf_counter()
        # cp, as for the plain folder and gocryptfs (shutil.copyfile's sendfile writes 64 KiB at a time, 2-3 x
        # slower into any FUSE mount: one request per 64 KiB instead of per 1 MiB)
        large_s = timed(sh, "cp", str(src / "large.bin"), str(mnt / "large.bin"))
        cli(env_file, "flush")
        large_durable_s = time.perf_counter() - start
        start = time.perf_counter()
        small_s = timed(subprocess.run, ["cp", "-a", str(src / "small"), str(mnt / "small")])
        cli(env_file, "flush")
        small_durable_s = time.perf_counter() - start
        write_rss = mount.stop()

        shutil.rmtree(cache_dir)
        mount.start()
        cold_large_s = timed(read_all, mnt / "large.bin")
        cold_small_s = timed(read_all, mnt / "small")
        drop_caches()
        warm_large_s = timed(read_all, mnt / "large.bin")
        drop_caches()
        warm_small_s = timed(read_all, mnt / "small")
        read_rss = mount.stop()
        mount = None
        report.update({
            "write_large_mb_s": large_bytes / MB / large_s,
            "durable_upload_large_mb_s": large_bytes / MB / large_durable_s,
            "write_small_files_s": args.small_files / small_s,
            "durable_upload_small_files_s": args.small_files / small_durable_s,
            "cold_read_large_mb_s": large_bytes / MB / cold_large_s,
            "cold_read_small_files_s": args.small_files / cold_small_s,
            "cold_read_small_mb_s": small_bytes / MB / cold_small_s,
            "warm_read_large_mb_s": large_bytes / MB / warm_large_s,
            "warm_read_small_files_s": args.small_files / warm_small_s,
            "peak_rss_mib": max(write_rss, read_rss) / 2**20,
        })
        for ours, theirs in RATIOS:
            if isinstance(report.get(theirs), float):
                report[f"{ours}_vs_{theirs.split('_')[0]}"] = report[ours] / report[theirs]  # type: ignore[operator]
        for key, value in report.items():
            if isinstance(value, float):
                report[key] = round(value, 2 if key.endswith(("_vs_restic", "_vs_gocryptfs")) else 1)
            print(f"{key:>44}: {report[key]}", file=sys.stderr)
        print(json.dumps(report))
        return 0
    finally:
        if mount is not None and mount.process is not None:
            mount.stop()
        if network is not None and network.poll() is None:
            os.kill(network.pid, signal.SIGINT)
            try:
                network.wait(timeout=30)
            except subprocess.TimeoutExpired:
                network.kill()
                network.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

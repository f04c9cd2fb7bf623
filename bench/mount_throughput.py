"""Throughput of a real mount over a real local network (one mediator, six storage nodes, all on loopback).

Phases, each timed: write a large file and many small files into the mount (the write-back cache absorbs them);
the same until ``fincryptfs flush`` returns (everything encrypted, erasure-coded, stored and the tree
published); a cold read after unmounting and clearing the cache (every byte fetched from the nodes); a warm
read. Beside them, ``cp -a`` of the same data to a plain folder, and gocryptfs / restic when installed.
Reports MB/s, files/s and the mount process's peak RSS; the last line of output is one JSON object.

    python bench/mount_throughput.py [--large-mib 256] [--small-files 2000]

Needs root and /dev/fuse (as the mount does).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def timed(fn: object, *args: object) -> float:
    start = time.perf_counter()
    fn(*args)  # type: ignore[operator]
    return time.perf_counter() - start


def peak_rss(pid: int) -> int:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


def cli(env_file: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "fincryptfs.cli", *args, "--env-file", str(env_file)], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)


class Mount:
    def __init__(self, env_file: Path, mountpoint: Path, log: Path) -> None:
        self.env_file, self.mountpoint, self.log = env_file, mountpoint, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "fincryptfs.cli", "mount", str(self.mountpoint),
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


def start_network(home: Path) -> subprocess.Popen[bytes]:
    code = ("import sys, trio; from pathlib import Path; from fincryptfs.devnet import run_devnet; "
            "trio.run(lambda: run_devnet(Path(sys.argv[1]), nodes=6, node_capacity='8G'))")
    log = open(home / "devnet.log", "ab")  # noqa: SIM115 - handed to the child
    process = subprocess.Popen([sys.executable, "-c", code, str(home)], stdout=log, stderr=log, cwd=ROOT,
                               start_new_session=True)
    log.close()
    deadline = time.monotonic() + 90
    while not (home / "devnet.json").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the network did not start; see {home / 'devnet.log'} and {home / 'logs'}")
        time.sleep(0.2)
    return process


def compare_tools(src: Path, work: Path, nbytes: int) -> dict[str, float]:
    """MB/s of cp -a to a plain folder, and of gocryptfs / restic when installed (informational)."""
    result = {"plain_cp_mb_s": nbytes / MB / timed(subprocess.run, ["cp", "-a", str(src), str(work / "plain")])}
    shutil.rmtree(work / "plain")
    if shutil.which("restic"):
        repo = work / "restic-repo"
        env = {**os.environ, "RESTIC_PASSWORD": "bench"}
        subprocess.run(["restic", "init", "-r", str(repo)], env=env, capture_output=True, check=True)
        seconds = timed(lambda: subprocess.run(["restic", "backup", "-q", "-r", str(repo), str(src)], env=env,
                                               capture_output=True, check=True))
        result["restic_backup_mb_s"] = nbytes / MB / seconds
        shutil.rmtree(repo)
    if shutil.which("gocryptfs"):
        cipher, plain = work / "gc-cipher", work / "gc-plain"
        cipher.mkdir()
        plain.mkdir()
        pw = work / "gc-pass"
        pw.write_text("bench\n")
        subprocess.run(["gocryptfs", "-init", "-q", "-passfile", str(pw), str(cipher)], check=True,
                       capture_output=True)
        subprocess.run(["gocryptfs", "-q", "-passfile", str(pw), str(cipher), str(plain)], check=True)
        try:
            seconds = timed(subprocess.run, ["cp", "-a", f"{src}/.", str(plain)])
            result["gocryptfs_cp_mb_s"] = nbytes / MB / seconds
        finally:
            subprocess.run(["fusermount3", "-u", str(plain)], capture_output=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large-mib", type=int, default=256)
    parser.add_argument("--small-files", type=int, default=2000)
    args = parser.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("mount_throughput: skipped (needs root and /dev/fuse)")
        print(json.dumps({"bench": "mount_throughput", "skipped": "needs root and /dev/fuse"}))
        return 0
    work = Path(tempfile.mkdtemp(prefix="fincrypt-bench-"))
    network = None
    mount = None
    try:
        src = work / "src"
        nbytes, nfiles = make_source(src, args.large_mib, args.small_files)
        print(f"source: {nbytes / MB:.0f} MB in {nfiles} files", file=sys.stderr)
        report: dict[str, object] = {"bench": "mount_throughput", "bytes": nbytes, "files": nfiles}
        report.update(compare_tools(src, work, nbytes))

        home = work / "net"
        home.mkdir()
        network = start_network(home)
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

        start = time.perf_counter()
        large_s = timed(shutil.copyfile, src / "large.bin", mnt / "large.bin")
        small_s = timed(subprocess.run, ["cp", "-a", str(src / "small"), str(mnt / "small")])
        write_s = time.perf_counter() - start
        cli(env_file, "flush")
        flushed_s = time.perf_counter() - start
        write_rss = mount.stop()

        shutil.rmtree(cache_dir)
        mount.start()
        cold_large_s = timed(read_all, mnt / "large.bin")
        cold_small_s = timed(read_all, mnt / "small")
        cold_s = cold_large_s + cold_small_s
        warm_s = timed(read_all, mnt)
        read_rss = mount.stop()
        mount = None
        report.update({
            "write_large_mb_s": args.large_mib * 2**20 / MB / large_s,
            "write_small_files_s": args.small_files / small_s,
            "write_mb_s": nbytes / MB / write_s,
            "until_flushed_mb_s": nbytes / MB / flushed_s,
            "until_flushed_files_s": nfiles / flushed_s,
            "cold_read_mb_s": nbytes / MB / cold_s,
            "cold_read_large_mb_s": args.large_mib * 2**20 / MB / cold_large_s,
            "cold_read_small_files_s": args.small_files / cold_small_s,
            "warm_read_mb_s": nbytes / MB / warm_s,
            "peak_rss_mib": max(write_rss, read_rss) / 2**20,
        })
        for key, value in report.items():
            if isinstance(value, float):
                report[key] = round(value, 1)
            print(f"{key:>24}: {report[key]}", file=sys.stderr)
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

"""Helpers for the client's end-to-end tests: a real network (tests/netfixtures.py) and a real FUSE mount.

Imported by name (``from mountkit import ...``), not as a conftest: conftest modules of two folders would clash.

The mount runs in a child process (``python -m fincryptfs.cli mount``) so that the test's own file operations,
run in worker threads, never wait on the event loop that serves the network. Every mount is unmounted and its
process stopped by PID in ``finally``, whatever happened.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from fincryptfs import meta

ROOT = Path(__file__).resolve().parents[2]

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root")


def fincryptfs(*args: str, check: bool = True, timeout: float = 120, **kwargs: object
               ) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a child process (blocking: call through trio.to_thread.run_sync)."""
    result = subprocess.run([sys.executable, "-m", "fincryptfs.cli", *args], capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT, **kwargs)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise AssertionError(f"fincryptfs {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n"
                             f"{result.stderr}")
    return result


@dataclass
class Client:
    """One client machine: its settings file, data and cache folders, mount point and mount process."""

    home: Path
    mediator_url: str
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def env_file(self) -> Path:
        return self.home / "client.env"

    @property
    def mountpoint(self) -> Path:
        return self.home / "mnt"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def log_path(self) -> Path:
        return self.home / "mount.log"

    def write_env(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        values = {"FINCRYPT_DATA_DIR": str(self.data_dir), "FINCRYPT_CACHE_DIR": str(self.cache_dir),
                  "FINCRYPT_KEY_FILE": str(self.home / "master.key"), "FINCRYPT_PUBLISH_DELAY": "0.2",
                  **self.extra_env}
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))

    def init(self) -> str:
        """``fincryptfs init``; returns the recovery phrase it printed."""
        self.write_env()
        out = fincryptfs("init", "--env-file", str(self.env_file), "--mediator", self.mediator_url,
                         "--no-passphrase").stdout
        words = [line.strip() for line in out.splitlines() if len(line.split()) == 24]
        assert len(words) == 1, out
        return words[0]

    async def restore(self, phrase: str, mediator_url: str) -> None:
        """``fincryptfs restore`` on this (new) machine from the recovery phrase alone."""
        self.write_env()
        phrase_file = self.home / "phrase.txt"
        phrase_file.write_text(phrase + "\n")
        await trio.to_thread.run_sync(lambda: self.cli("restore", "--phrase-file", str(phrase_file), "--mediator",
                                                       mediator_url, "--no-passphrase"))

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return fincryptfs(*args, "--env-file", str(self.env_file), check=check, timeout=timeout)

    async def mount(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "fincryptfs.cli", "mount", str(self.mountpoint),
                                         "--env-file", str(self.env_file)], stdout=log, stderr=log, cwd=ROOT)
        log.close()
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mountpoint):
            if self.process.poll() is not None:
                raise AssertionError(f"mount exited {self.process.returncode}:\n{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not mounted after 30 s:\n{self.log_path.read_text()}")
            await trio.sleep(0.05)

    async def flush(self, timeout: float = 60) -> None:
        await trio.to_thread.run_sync(lambda: self.cli("flush", "--timeout", str(timeout), timeout=timeout + 30))

    async def unmount(self) -> None:
        """Unmount cleanly and wait for the mount process to exit."""
        if os.path.ismount(self.mountpoint):
            await trio.to_thread.run_sync(lambda: subprocess.run(["fusermount3", "-u", str(self.mountpoint)],
                                                                 capture_output=True))
        await self._wait_exit(20)

    async def kill(self) -> None:
        """kill -9 the mount process (as a crash would) and clear the dead mount."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        await self._wait_exit(10)
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)

    async def _wait_exit(self, timeout: float) -> None:
        if self.process is None:
            return
        with trio.move_on_after(timeout):
            while self.process.poll() is None:
                await trio.sleep(0.05)
        if self.process.poll() is None:
            self.process.terminate()
            with trio.move_on_after(5):
                while self.process.poll() is None:
                    await trio.sleep(0.05)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        self.process = None

    async def cleanup(self) -> None:
        try:
            await self.unmount()
        finally:
            if os.path.ismount(self.mountpoint):
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
            if self.process is not None and self.process.poll() is None:
                self.process.kill()
                self.process.wait()


def tree_of(root: Path) -> dict[str, tuple[str, object]]:
    """Every entry below ``root``: kind and content (bytes, link target) or mode for directories."""
    result: dict[str, tuple[str, object]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            if path.is_symlink():
                result[rel] = ("symlink", os.readlink(path))
            elif path.is_dir():
                result[rel] = ("dir", st.st_mode & 0o7777)
            else:
                result[rel] = ("file", (st.st_mode & 0o7777, st.st_size, path.read_bytes()))
    return result


def ino_of(db: object, path: str) -> int:
    """The inode of ``path`` in the tree (a connection to the client's database)."""
    ino = meta.ROOT_INO
    for part in path.strip("/").split("/"):
        ino = meta.lookup(db, ino, part.encode()).ino  # type: ignore[arg-type]
    return ino

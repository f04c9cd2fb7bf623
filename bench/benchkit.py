"""What several bench scripts need alike: timing, peak RSS, dropping the page cache, a devnet to measure against.

Bench scripts are run as files (``python bench/x.py``), so this folder is first on ``sys.path`` and they import
this module by its plain name.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fincryptfs", "storaged", "mediatord")
# The Python that runs Fincrypt's commands: the project's virtual environment (``make setup``) when there is one,
# whichever Python runs the bench script.
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable


def compile_sources() -> None:
    """Byte-compile Fincrypt's modules as an install does, so each command starts as it does for a user: with
    PYTHONDONTWRITEBYTECODE set (or a read-only tree) Python would compile ~30 modules at every start (~70 ms)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", *(str(ROOT / p) for p in PACKAGES)], check=True,
                   stdout=subprocess.DEVNULL)


def timed(fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    """Seconds ``fn(*args, **kwargs)`` took (wall clock)."""
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def peak_rss(pid: int) -> int:
    """VmHWM of a live process, in bytes (0 once it is gone)."""
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return 0
    return int(match.group(1)) * 1024 if match else 0


def drop_caches(*, required: bool = False) -> None:
    """Write everything back and drop the page cache, so the next phase reads from the disk or the network.

    Needs root; without it the figures include cached reads, which ``required`` turns into an error.
    """
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        if required:
            raise


def log_tail(path: Path, lines: int = 20) -> str:
    """The end of a log, for an error message: the bench removes its work folder, and the log with it."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def start_devnet(home: Path, *, nodes: int = 6, node_capacity: str = "8G") -> subprocess.Popen[bytes]:
    """A ``fincryptfs devnet`` (mediator + storage nodes) in ``home``, in its own session; returns once it is up."""
    code = ("import sys, trio; from pathlib import Path; from fincryptfs.devnet import run_devnet; "
            f"trio.run(lambda: run_devnet(Path(sys.argv[1]), nodes={nodes}, node_capacity={node_capacity!r}))")
    log = open(home / "devnet.log", "ab")  # noqa: SIM115 - handed to the child
    process = subprocess.Popen([PYTHON, "-c", code, str(home)], stdout=log, stderr=log, cwd=ROOT,
                               start_new_session=True)
    log.close()
    deadline = time.monotonic() + 90
    while not (home / "devnet.json").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the network did not start:\n{log_tail(home / 'devnet.log')}")
        time.sleep(0.2)
    return process

"""``fincryptfs devnet`` killed with SIGKILL (no chance to stop its children): the mediator, the storage nodes
and the mount notice that their lifeline pipe closed and stop by themselves; the mount unmounts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mountkit import ROOT, needs_fuse
from netfixtures import pid_alive

pytestmark = [pytest.mark.e2e, needs_fuse]


def test_children_stop_when_the_devnet_is_killed(tmp_path: Path) -> None:
    home, mnt = tmp_path / "devnet", tmp_path / "mnt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDIATORD_", "STORAGED_", "FINCRYPT_"))}
    devnet = subprocess.Popen([sys.executable, "-m", "fincryptfs.cli", "devnet", "--home", str(home), "--nodes",
                               "2", "--mount", str(mnt)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=env, start_new_session=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while not (home / "devnet.json").exists():
            assert devnet.poll() is None, devnet.stderr.read().decode()[-2000:] if devnet.stderr else ""
            assert time.monotonic() < deadline, "the devnet did not start within 90 s"
            time.sleep(0.2)
        info = json.loads((home / "devnet.json").read_text())
        pids = [info["mediator"]["pid"], *(n["pid"] for n in info["nodes"]), info["mount_pid"]]
        assert os.path.ismount(mnt) and all(pid_alive(p) for p in pids)
        (mnt / "note.txt").write_text("written before the crash\n")

        devnet.send_signal(signal.SIGKILL)
        devnet.wait(timeout=10)
        deadline = time.monotonic() + 30
        while (running := [p for p in pids if pid_alive(p)]) or os.path.ismount(mnt):
            assert time.monotonic() < deadline, (f"still running 30 s after the devnet died: {running}, "
                                                 f"mounted: {os.path.ismount(mnt)}")
            time.sleep(0.2)
        logs = Path(info["logs"])
        assert "the process that started this one is gone" in (logs / "storaged-0.log").read_text()
    finally:
        if devnet.poll() is None:
            devnet.kill()
            devnet.wait()
        for pid in pids:  # a failed test must not leave daemons behind
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)

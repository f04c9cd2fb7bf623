"""The fault suite of the whole system (docs/e2e.md): real processes, a real FUSE mount, the users' CLIs.

Scenarios share one devnet (see conftest.py) and run in file order; each one leaves every node running and the
mount up. Numbers in the test names are the scenarios of docs/e2e.md.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from e2e_net import MiB, PYTHON, ROOT, Devnet, pid_alive, sha256_file, tree_digest, wait_until, write_tree

from fincryptfs.core.layout import ObjectLayout
from fincryptfs.core.merkle import TreeBuilder
from fincryptfs.core.padding import padded_length

pytestmark = pytest.mark.e2e

K, N, HAPPY = 3, 6, 5  # the client's defaults (FINCRYPT_K, FINCRYPT_N, FINCRYPT_HAPPY)
MARKER = b"FINCRYPT-E2E-PLAINTEXT-MARKER-5e1f"
SECRET_NAME = "quarterly-salaries-e2e-7c2d"


def copy_in(net: Devnet, source: Path, name: str) -> Path:
    target = net.mount / name
    shutil.copytree(source, target)
    return target


def object_shares(net: Devnet, path: str) -> tuple[str, object]:
    entry = net.file_status(path)
    assert entry["state"] == "stored", entry
    return entry["object_id"], net.object_info(entry["object_id"])


def wait_health(net: Devnet, object_id: str, predicate: object, timeout: float, what: str) -> object:
    def check() -> object:
        info = net.object_info(object_id)
        return info if predicate(info) else None  # type: ignore[operator]
    return wait_until(check, timeout, what, 0.5)


# --- 11: nothing readable leaves the machine ------------------------------------------------------------------


def test_11_no_plaintext_or_name_on_nodes_and_padded_share_sizes(healed: Devnet, tmp_path: Path) -> None:
    net = healed
    source = tmp_path / SECRET_NAME
    write_tree(source, seed=11, large=1, small=4, marker=MARKER)
    (source / f"{SECRET_NAME}.txt").write_bytes(MARKER * 50)
    (source / "exactly-4096.bin").write_bytes(os.urandom(4096))  # the padding floor's edge
    copy_in(net, source, SECRET_NAME)
    net.flush()

    needles = [MARKER, SECRET_NAME.encode(), b"exactly-4096", b"note-1.txt", b"large-0.bin"]
    scanned = 0
    for folder in [net.home / f"node-{i}" for i in range(len(net.nodes))] + [net.home / "mediator"]:
        for dirpath, _dirs, files in os.walk(folder):
            for name in files:
                data = (Path(dirpath) / name).read_bytes()
                scanned += len(data)
                for needle in needles:
                    assert needle not in data, f"{needle!r} found in {Path(dirpath) / name}"
                    assert needle.decode() not in name
    assert scanned > 3 * MiB  # the shares really were scanned

    status = net.status()
    files = [f for f in status["files"] if f["path"].startswith(f"/{SECRET_NAME}/")]
    assert len(files) == 7
    on_disk = {sid: path for i in range(len(net.nodes)) for sid, path in net.share_files(i).items()}
    for entry in files:
        info = net.object_info(entry["object_id"])
        layout = ObjectLayout(padded_length(entry["size"]), info.layout.segment_size, K, N)
        assert info.layout == layout, (entry["path"], info.layout)
        assert len(info.shares) == N
        for share in info.shares:
            assert share.share_size == layout.share_size
            assert on_disk[share.share_id].stat().st_size == layout.share_size
            if entry["size"] > 64:
                assert layout.share_size not in (entry["size"], entry["size"] // K), entry


# --- 1: n - k nodes gone, cache gone, everything still reads ----------------------------------------------------


def test_01_kill_n_minus_k_nodes_and_cache_read_everything_back(healed: Devnet, tmp_path: Path) -> None:
    net = healed
    source = tmp_path / "tree"
    expected = write_tree(source, seed=1, large=2, small=8)
    copy_in(net, source, "s1")
    net.flush()
    for i in range(N - K):  # nodes 0..2 hold a share of every object (placement prefers the lowest prices)
        net.kill_node(i)
    net.remount(clear_cache=True)
    assert not any((net.client_dir / "cache").glob("[0-9]*")), "the cache was not emptied"
    assert tree_digest(net.mount / "s1") == expected

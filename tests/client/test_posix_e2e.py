"""The mount against a plain folder on the machine's own file system, through the kernel: the answers a POSIX file
system gives that the kernel leaves to the file system itself, where the mount once answered differently."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio
from mountkit import Client, needs_fuse
from netfixtures import start_network

pytestmark = [pytest.mark.e2e, needs_fuse]


def outcome(action: Callable[[], object]) -> object:
    """What ``action`` returned, or the name of the errno it failed with."""
    try:
        return action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def set_group_id_folder(root: Path) -> object:
    shared = root / "shared"
    shared.mkdir()
    os.chown(shared, 0, 4321)
    os.chmod(shared, 0o2775)
    (shared / "file").write_text("x")
    (shared / "sub").mkdir(0o755)
    os.symlink("file", shared / "link")
    return [(os.lstat(shared / name).st_gid, oct(os.lstat(shared / name).st_mode)) for name in ("file", "sub", "link")]


def read_only_truncating_open(root: Path) -> object:
    path = root / "f"
    path.write_text("content")
    fd = os.open(path, os.O_RDONLY | os.O_TRUNC)
    try:
        data = os.read(fd, 100)
    finally:
        os.close(fd)
    return data, path.read_bytes(), os.stat(path).st_size


def name_too_long(root: Path) -> object:
    long = root / ("x" * 256)
    return [outcome(partial(action, long)) for action in (os.stat, os.unlink, os.rmdir, os.readlink)]


def removed_folder_still_open(root: Path) -> object:
    (root / "d").mkdir()
    fd = os.open(root / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(root / "d")
        return os.fstat(fd).st_nlink, os.listdir(fd), outcome(lambda: os.mkdir("sub", dir_fd=fd))
    finally:
        os.close(fd)


def listing_with_dot_entries(root: Path) -> object:
    (root / "sub").mkdir()
    (root / "file").touch()
    listed = subprocess.run(["ls", "-a1", str(root)], check=True, capture_output=True, text=True).stdout
    return listed.split(), sorted(os.listdir(root))


def mknod_of_a_regular_file(root: Path) -> object:
    os.mknod(root / "made", stat.S_IFREG | 0o640)
    st = os.stat(root / "made")
    return oct(st.st_mode), st.st_size, (root / "made").read_bytes()


CHECKS: dict[str, Callable[[Path], object]] = {
    "set-group-ID folder": set_group_id_folder,
    "O_RDONLY | O_TRUNC": read_only_truncating_open,
    "a name of 256 bytes": name_too_long,
    "a removed folder still open": removed_folder_still_open,
    "ls -a": listing_with_dot_entries,
    "mknod of a regular file": mknod_of_a_regular_file,
}


def run_checks(root: Path) -> dict[str, object]:
    results = {}
    for name, check in CHECKS.items():
        folder = root / "".join(c if c.isalnum() else "-" for c in name)
        folder.mkdir()
        results[name] = outcome(partial(check, folder))
    return results


async def test_the_mount_answers_as_a_plain_folder_does(tmp_path: Path, nursery: trio.Nursery) -> None:
    net = await start_network(tmp_path, nursery, nodes=6)
    client = Client(tmp_path / "c", net.mediator_url)
    client.init()
    plain = tmp_path / "plain"
    plain.mkdir()
    try:
        await client.mount()
        got = await trio.to_thread.run_sync(run_checks, client.mountpoint)
        want = await trio.to_thread.run_sync(run_checks, plain)
        assert got == want
    finally:
        await client.cleanup()

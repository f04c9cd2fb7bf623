"""The mount against an oracle: random operations applied to the mount and to a plain folder must give the same
tree and the same errors after every step; finally the last tree must survive flush, unmount and a cold cache."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from mountkit import Client, needs_fuse, tree_of
from netfixtures import start_network

from fincryptfs import meta

pytestmark = [pytest.mark.e2e, needs_fuse]

DIRS = ["", "d1", "d1/d2", "d3"]
NAMES = ["a", "b", "c"]
paths = st.builds(lambda d, n: f"{d}/{n}" if d else n, st.sampled_from(DIRS), st.sampled_from(NAMES + ["d1", "d3"]))


def outcome(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


def make_machine(mount_root: Path, oracle_root: Path) -> type[RuleBasedStateMachine]:
    class MountVersusFolder(RuleBasedStateMachine):
        @initialize()
        def clean(self) -> None:
            for root in (mount_root, oracle_root):
                for entry in list(root.iterdir()):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()

        def both(self, action: Callable[[Path], object]) -> None:
            got = outcome(lambda: action(mount_root))
            want = outcome(lambda: action(oracle_root))
            assert got == want, f"mount: {got}, plain folder: {want}"

        @rule(path=paths, offset=st.integers(0, 70_000), data=st.binary(min_size=1, max_size=5000))
        def write_at(self, path: str, offset: int, data: bytes) -> None:
            def act(root: Path) -> None:
                fd = os.open(root / path, os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    os.pwrite(fd, data, offset)
                finally:
                    os.close(fd)
            self.both(act)

        @rule(path=paths, size=st.integers(0, 80_000))
        def truncate(self, path: str, size: int) -> None:
            self.both(lambda root: os.truncate(root / path, size))

        @rule(src=paths, dst=paths)
        def rename(self, src: str, dst: str) -> None:
            self.both(lambda root: os.rename(root / src, root / dst))

        @rule(path=paths)
        def mkdir(self, path: str) -> None:
            self.both(lambda root: os.mkdir(root / path, 0o755))

        @rule(path=paths)
        def unlink(self, path: str) -> None:
            self.both(lambda root: os.unlink(root / path))

        @rule(path=paths)
        def rmdir(self, path: str) -> None:
            self.both(lambda root: os.rmdir(root / path))

        @rule(path=paths, link_to=st.sampled_from(["a", "../b", "d1/c", "nowhere"]))
        def symlink(self, path: str, link_to: str) -> None:
            self.both(lambda root: os.symlink(link_to, root / path))

        @rule(path=paths, mode=st.sampled_from([0o600, 0o644, 0o755, 0o700, 0o640]))
        def chmod(self, path: str, mode: int) -> None:
            self.both(lambda root: os.chmod(root / path, mode))  # follows a symlink, in both trees alike

        @rule(path=paths)
        def read(self, path: str) -> None:
            got = outcome(lambda: (mount_root / path).read_bytes())
            want = outcome(lambda: (oracle_root / path).read_bytes())
            assert got == want

        @invariant()
        def same_tree(self) -> None:
            assert tree_of(mount_root) == tree_of(oracle_root)

    return MountVersusFolder


def explain(client: Client, got: dict[str, tuple[str, object]], want: dict[str, tuple[str, object]]) -> str:
    """For a failed comparison: each differing path's tree row and upload jobs, and the end of the mount's log
    (which the mount and its upload worker share), so a rare failure leaves its evidence."""
    lines = []
    db = meta.connect_readonly(client.data_dir / "meta.db")
    try:
        for path in sorted(set(got) | set(want)):
            if got.get(path) == want.get(path):
                continue
            lines.append(f"{path}: mount {str(got.get(path))[:120]} / folder {str(want.get(path))[:120]}")
            try:
                ino = meta.ROOT_INO
                for part in path.split("/"):
                    ino = meta.lookup(db, ino, part.encode()).ino
            except meta.NotFound:
                continue
            inode = meta.get(db, ino)
            lines.append(f"  inode {ino}: version {inode.version} state {inode.state} size {inode.size} "
                         f"object {str(inode.object)[:160]}")
            for row in db.execute("SELECT id, version, state, last_error FROM upload_jobs WHERE ino = ? ORDER BY id",
                                  (ino,)):
                lines.append(f"  job {row}")
    finally:
        db.close()
    log = client.log_path.read_text().splitlines() if client.log_path.exists() else []
    return "\n".join(lines + ["mount log (end):"] + log[-80:])


async def test_mount_matches_plain_folder(tmp_path: Path, nursery: trio.Nursery) -> None:
    net = await start_network(tmp_path, nursery, nodes=6)
    client = Client(tmp_path / "c", net.mediator_url)
    client.init()
    oracle = tmp_path / "oracle"
    oracle.mkdir()
    try:
        await client.mount()
        machine = make_machine(client.mountpoint, oracle)
        config = settings(max_examples=12, stateful_step_count=25, deadline=None,
                          suppress_health_check=list(HealthCheck), database=None)
        await trio.to_thread.run_sync(lambda: run_state_machine_as_test(machine, settings=config))
        expected = tree_of(oracle)
        assert await trio.to_thread.run_sync(tree_of, client.mountpoint) == expected
        await client.flush()
        await client.unmount()
        shutil.rmtree(client.cache_dir)
        await client.mount()
        cold = await trio.to_thread.run_sync(tree_of, client.mountpoint)
        assert cold == expected, explain(client, cold, expected)
    finally:
        await client.cleanup()

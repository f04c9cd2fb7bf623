"""Mount lifecycle: --daemon and umount, a file rewritten while it uploads, statfs, memory of a large file."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import trio
from mountkit import Client, needs_fuse
from netfixtures import start_network

from fincryptfs import meta
from fincryptfs.core.crypto import new_master_key, recovery_phrase
from mediatord.daemon import DATABASE_FILE

pytestmark = [pytest.mark.e2e, needs_fuse]


def peak_rss_bytes(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", text)
    assert match is not None
    return int(match.group(1)) * 1024


async def test_daemon_rewrite_statfs_and_large_file(tmp_path: Path, nursery: trio.Nursery) -> None:
    net = await start_network(tmp_path, nursery, nodes=6)
    client = Client(tmp_path / "c", net.mediator_url, extra_env={"FINCRYPT_CACHE_LIMIT_BYTES": "8M"})
    client.init()
    mnt = client.mountpoint
    mnt.mkdir()
    daemon_pid = None
    try:
        out = await trio.to_thread.run_sync(lambda: client.cli("mount", str(mnt), "--daemon").stdout)
        found = re.search(r"process (\d+)", out)
        assert found is not None, out
        daemon_pid = int(found.group(1))
        assert os.path.ismount(mnt)
        # a second mount of the account says why it did not start, not only where its log is
        (tmp_path / "second").mkdir()
        second = await trio.to_thread.run_sync(lambda: client.cli("mount", str(tmp_path / "second"), "--daemon",
                                                                  check=False))
        assert second.returncode == 1 and "another fincryptfs mount is using" in second.stderr, second.stderr
        assert not os.path.ismount(tmp_path / "second")

        # statfs shows the network's capacity (6 nodes of 2 GiB), once the mount has asked the mediator
        with trio.fail_after(10):
            while os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize < 6 * 2**30 * 0.9:
                await trio.sleep(0.2)

        # a file rewritten while its first version uploads: the last version wins
        big = os.urandom(6 * 2**20)
        (mnt / "r.bin").write_bytes(big)
        final = os.urandom(3 * 2**20)
        (mnt / "r.bin").write_bytes(final)

        # a large file streams through bounded memory
        chunk = os.urandom(2**20)

        def write_large() -> None:
            with open(mnt / "large.bin", "wb") as f:
                for _ in range(48):
                    f.write(chunk)
        await trio.to_thread.run_sync(write_large)
        await client.flush(timeout=120)

        db = meta.connect_readonly(client.data_dir / "meta.db")
        try:
            states = {meta.path_of(db, f.ino): f.state for f in meta.files(db)}
            with trio.fail_after(20):  # superseded objects are released once a snapshot without them is out
                while meta.pending_deletes(db):
                    await trio.sleep(0.2)
        finally:
            db.close()
        assert states == {"/r.bin": "stored", "/large.bin": "stored"}

        # the cache limit (8 MiB) evicted what was uploaded; reading fetches it again
        with trio.fail_after(10):
            while sum(p.stat().st_size for p in client.cache_dir.iterdir()) > 8 * 2**20:
                await trio.sleep(0.2)

        def read_back() -> None:
            assert (mnt / "r.bin").read_bytes() == final
            with open(mnt / "large.bin", "rb") as f:
                for _ in range(48):
                    assert f.read(2**20) == chunk
                assert f.read(1) == b""
        await trio.to_thread.run_sync(read_back)
        assert peak_rss_bytes(daemon_pid) < 200 * 2**20

        result = await trio.to_thread.run_sync(lambda: client.cli("umount", str(mnt)))
        assert result.returncode == 0 and not os.path.ismount(mnt)
        with trio.fail_after(20):
            while os.path.exists(f"/proc/{daemon_pid}") and "zombie" not in Path(
                    f"/proc/{daemon_pid}/status").read_text():
                await trio.sleep(0.1)
        not_mounted = await trio.to_thread.run_sync(lambda: client.cli("umount", str(mnt), check=False))
        assert not_mounted.returncode == 1 and "not mounted" in not_mounted.stderr
    finally:
        if os.path.ismount(mnt):
            os.system(f"fusermount3 -u -z {mnt}")
        if daemon_pid is not None and os.path.exists(f"/proc/{daemon_pid}"):
            os.kill(daemon_pid, signal.SIGKILL)
        shutil.rmtree(client.cache_dir, ignore_errors=True)


def opened_under(folder: Path) -> bool:
    """Whether any process has a file in ``folder`` open (from /proc: we run as root)."""
    prefix = f"{folder.resolve()}/"
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            links = [os.readlink(fd) for fd in fd_dir.iterdir()]
        except OSError:  # the process ended, or is not ours to read
            continue
        if any(link.startswith(prefix) for link in links):
            return True
    return False


async def test_deleting_a_file_stops_its_upload_and_releases_what_landed(tmp_path: Path,
                                                                          nursery: trio.Nursery) -> None:
    """A large file deleted while its shares are on their way: the upload stops within a second (its
    disk space and the network are free again) instead of running on for a file nobody has any more."""
    net = await start_network(tmp_path, nursery, nodes=6, gated=True)
    client = Client(tmp_path / "c", net.mediator_url)
    client.init()
    mnt = client.mountpoint
    try:
        await client.mount()
        net.hold()  # the nodes accept connections and answer nothing: the upload cannot finish by itself
        await trio.to_thread.run_sync((mnt / "doomed.bin").write_bytes, os.urandom(8 * 2**20))
        db = meta.connect_readonly(client.data_dir / "meta.db")
        try:
            with trio.fail_after(20):  # the upload has begun: some process (the upload worker) reads the file
                while not any(state == "uploading" for _, _, state, _, _ in meta.pending_uploads(db)) \
                        or not opened_under(client.cache_dir):
                    await trio.sleep(0.05)
            await trio.to_thread.run_sync((mnt / "doomed.bin").unlink)
            with trio.fail_after(5):  # far below the 30 s a held node takes to time out
                while meta.pending_uploads(db):
                    await trio.sleep(0.05)
        finally:
            db.close()
        assert "stopped: the file was changed or deleted meanwhile" in client.log_path.read_text()
        mediator_db = sqlite3.connect(f"file:{net.mediator_settings.data_dir / DATABASE_FILE}?mode=ro", uri=True)
        try:  # one client on this network: any pending object would be the half-sent one
            assert mediator_db.execute("SELECT count(*) FROM objects WHERE state = 'pending'").fetchone()[0] == 0, \
                "the half-sent object was not released"
        finally:
            mediator_db.close()
        net.release()
        kept = os.urandom(2 * 2**20)
        await trio.to_thread.run_sync((mnt / "kept.bin").write_bytes, kept)
        await client.flush()
        assert await trio.to_thread.run_sync((mnt / "kept.bin").read_bytes) == kept
    finally:
        await client.cleanup()


async def test_a_close_that_could_not_be_recorded_is_recorded_once_it_can(tmp_path: Path,
                                                                           nursery: trio.Nursery) -> None:
    """The tree database stays locked by another process past the busy timeout while a file is closed: the
    writer is told (EIO), its bytes stay in the cache, and once the lock is gone the mount records the upload
    by itself, without a remount. Before, nothing asked again, and a cleared cache lost the file."""
    net = await start_network(tmp_path, nursery, nodes=6)
    client = Client(tmp_path / "c", net.mediator_url)
    client.init()
    mnt = client.mountpoint
    data = os.urandom(300_000)
    try:
        await client.mount()
        handle = await trio.to_thread.run_sync(lambda: open(mnt / "late.bin", "wb", buffering=0))
        lock = sqlite3.connect(client.data_dir / "meta.db", isolation_level=None)
        try:
            lock.execute("BEGIN IMMEDIATE")  # as a stuck process holding the tree's write lock would
            await trio.to_thread.run_sync(handle.write, data)  # no database work: the bytes go to the cache
            with pytest.raises(OSError) as info:
                await trio.to_thread.run_sync(handle.close)  # flush: the commit waits 5 s for the lock, fails
            assert info.value.errno == errno.EIO
            with trio.fail_after(20):  # the kernel's release of the file fails the same way
                while "release failed on the tree database" not in client.log_path.read_text():
                    await trio.sleep(0.1)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        with trio.fail_after(15):
            while "recorded 1 closed file(s) for upload" not in client.log_path.read_text():
                await trio.sleep(0.1)
        await client.flush()
        await client.unmount()
        shutil.rmtree(client.cache_dir)  # only the network has it now
        await client.mount()
        assert await trio.to_thread.run_sync((mnt / "late.bin").read_bytes) == data
    finally:
        await client.cleanup()


async def test_restore_into_a_data_folder_with_an_old_cache_shows_the_stored_version(tmp_path: Path,
                                                                                    nursery: trio.Nursery) -> None:
    """The tree database is lost (moved away, with the key file, as the CLI's messages ask) and the account is
    restored from the phrase into the same data folder: the old cache files, named by inode number, must not
    become the restored tree's content. They are set aside, not deleted."""
    net = await start_network(tmp_path, nursery, nodes=6)
    client = Client(tmp_path / "c", net.mediator_url)
    phrase = client.init()
    stored, unsent = b"stored version " * 8, b"NEWER, NEVER UPLOADED " * 20
    try:
        await client.mount()
        await trio.to_thread.run_sync((client.mountpoint / "f.txt").write_bytes, stored)
        await client.flush()
        await trio.to_thread.run_sync((client.mountpoint / "f.txt").write_bytes, unsent)
        await client.kill()  # before the new version is stored
        for name in ("meta.db", "meta.db-wal", "meta.db-shm"):
            if (client.data_dir / name).exists():
                os.rename(client.data_dir / name, tmp_path / name)
        os.rename(client.home / "master.key", tmp_path / "master.key")
        await client.restore(phrase, net.mediator_url)
        await client.mount()
        # read in a thread: the network runs on this test's event loop
        got = await trio.to_thread.run_sync((client.mountpoint / "f.txt").read_bytes)
        assert got in (stored, unsent)  # the newer one only if its upload and snapshot made it before the kill
        prefix = client.cache_dir.name + ".previous-"
        aside = [p for p in client.cache_dir.parent.iterdir() if p.name.startswith(prefix)]
        assert len(aside) == 1 and unsent in [f.read_bytes() for f in aside[0].iterdir() if f.is_file()]
    finally:
        await client.cleanup()


async def test_a_machine_that_missed_another_machines_publish_stops_and_says_so(tmp_path: Path,
                                                                                nursery: trio.Nursery) -> None:
    """The old laptop is still mounted when the account is restored on a new one, and both write. The new
    laptop's published tree must not be replaced by the old one's: the old one's flush fails with the reason
    (status too), and a third restore sees the new laptop's tree."""
    net = await start_network(tmp_path, nursery, nodes=6)
    old, new, third, stranger = (Client(tmp_path / name, net.mediator_url)
                                 for name in ("old", "new", "third", "stranger"))
    phrase = old.init()
    stranger.write_env()  # a phrase that passes its checksum but is not this account's: restore warns
    (stranger.home / "phrase.txt").write_text(recovery_phrase(new_master_key()))
    warned = await trio.to_thread.run_sync(lambda: stranger.cli(
        "restore", "--phrase-file", str(stranger.home / "phrase.txt"), "--mediator", net.mediator_url,
        "--no-passphrase"))
    assert "holds no tree for this account" in warned.stdout, warned.stdout

    async def write(client: Client, name: str, data: bytes) -> None:
        await trio.to_thread.run_sync((client.mountpoint / name).write_bytes, data)

    try:
        await old.mount()
        await write(old, "a.txt", b"written on the old laptop")
        await old.flush()
        await new.restore(phrase, net.mediator_url)
        await new.mount()
        await write(new, "b.txt", b"written on the new laptop")
        await new.flush()

        await write(old, "c.txt", b"written on the old laptop afterwards")
        flushed = await trio.to_thread.run_sync(lambda: old.cli("flush", "--timeout", "60", check=False))
        assert flushed.returncode == 1 and "published from another machine" in flushed.stderr, flushed.stderr
        status = json.loads((await trio.to_thread.run_sync(lambda: old.cli("status", "--json"))).stdout)
        assert status["publish_problem"]["blocked"] is True
        assert "c.txt" in {f["path"].lstrip("/") for f in status["files"]}  # kept on the old laptop

        third.write_env()
        (third.home / "phrase.txt").write_text(phrase)
        restored = await trio.to_thread.run_sync(lambda: third.cli(
            "restore", "--phrase-file", str(third.home / "phrase.txt"), "--mediator", net.mediator_url,
            "--no-passphrase"))
        assert "The mediator holds this account's tree (version 2, published" in restored.stdout, restored.stdout
        await third.mount()
        names = await trio.to_thread.run_sync(lambda: sorted(os.listdir(third.mountpoint)))
        assert names == ["a.txt", "b.txt"]
        assert await trio.to_thread.run_sync((third.mountpoint / "b.txt").read_bytes) == b"written on the new laptop"
    finally:
        for client in (old, new, third):
            await client.cleanup()


async def test_no_copy_of_a_deleted_file_is_left_in_the_cache(tmp_path: Path, nursery: trio.Nursery) -> None:
    """A cache file is plaintext: none may outlive its file. Two ways one did: a file deleted while open when
    the client was killed (its row was dropped at the next start, its cache file never), and a file deleted
    while its content was still being fetched (the fetch landed after the purge)."""
    net = await start_network(tmp_path, nursery, nodes=6)
    client = Client(tmp_path / "c", net.mediator_url)
    client.init()
    big = os.urandom(8 << 20)  # large enough to be an object of its own, fetched in the background
    try:
        await client.mount()
        mnt = client.mountpoint

        def deleted_while_open() -> int:
            fd = os.open(mnt / "ghost", os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, b"deleted, still open " * 100)
            os.unlink(mnt / "ghost")
            return os.fstat(fd).st_ino

        ghost = await trio.to_thread.run_sync(deleted_while_open)
        await trio.to_thread.run_sync((mnt / "big").write_bytes, big)
        await client.flush()
        assert client.cache_dir.joinpath(str(ghost)).exists()
        await client.kill()  # the ghost's handle dies with the mount
        shutil.rmtree(client.cache_dir)  # and the big file is fetched again on first read
        await client.mount()
        assert not client.cache_dir.joinpath(str(ghost)).exists()

        def read_a_byte_then_delete() -> int:
            with open(mnt / "big", "rb") as f:
                assert f.read(1) == big[:1]
                ino = os.fstat(f.fileno()).st_ino
            os.unlink(mnt / "big")
            return ino

        ino = await trio.to_thread.run_sync(read_a_byte_then_delete)
        await trio.sleep(3)  # the fetch of 8 MiB ends well within this
        left = sorted(p.name for p in client.cache_dir.iterdir() if p.name != "packs")
        assert str(ino) not in left and not [n for n in left if n.endswith(".part")], left
    finally:
        await client.cleanup()


async def test_ctime_is_the_time_of_the_last_change_never_a_copied_mtime(tmp_path: Path,
                                                                         nursery: trio.Nursery) -> None:
    """Backup and build tools trust ctime to move forward on every change: `cp -a` sets mtime to the source's
    (here 2001) while the file is open, and it must not drag ctime back with it, nor may a future mtime."""
    net = await start_network(tmp_path, nursery, nodes=6)
    client = Client(tmp_path / "c", net.mediator_url)
    client.init()
    try:
        await client.mount()
        mnt = client.mountpoint
        started = time.time()

        def copy_like_cp_a() -> tuple[float, float, float]:
            fd = os.open(mnt / "copied", os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, b"content")
            before = os.fstat(fd).st_ctime
            os.utime(fd, (1e9, 1e9))
            os.fchmod(fd, 0o644)
            during = os.fstat(fd).st_ctime
            os.close(fd)
            os.utime(mnt / "future", (4e9, 4e9)) if (mnt / "future").exists() else None
            return before, during, os.stat(mnt / "copied").st_mtime

        await trio.to_thread.run_sync((mnt / "future").write_bytes, b"x")
        before, during, mtime = await trio.to_thread.run_sync(copy_like_cp_a)
        assert mtime == 1e9 and started - 1 <= before <= during <= time.time() + 1
        await client.flush()
        await client.unmount()
        await client.mount()
        for name in ("copied", "future"):
            st = await trio.to_thread.run_sync(os.stat, mnt / name)
            assert started - 1 <= st.st_ctime <= time.time() + 1, (name, st.st_ctime)
        assert (await trio.to_thread.run_sync(os.stat, mnt / "future")).st_mtime == 4e9
    finally:
        await client.cleanup()


async def test_ctrl_c_at_the_terminal_unmounts_without_a_traceback(tmp_path: Path, nursery: trio.Nursery) -> None:
    """A Ctrl-C signals the terminal's whole process group: the upload worker used to die of it with a
    KeyboardInterrupt traceback beside the mount's clean stop."""
    net = await start_network(tmp_path, nursery, nodes=1)
    client = Client(tmp_path / "c", net.mediator_url)
    client.init()
    client.mountpoint.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "fincryptfs.cli", "mount", str(client.mountpoint),
                                "--env-file", str(client.env_file)], stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        with trio.fail_after(30):
            while not os.path.ismount(client.mountpoint):
                assert process.poll() is None, process.communicate()[1]
                await trio.sleep(0.05)
            await trio.sleep(0.5)  # the worker is up (it is started before the folder is mounted)
        os.killpg(process.pid, signal.SIGINT)
        with trio.fail_after(20):
            _, err = await trio.to_thread.run_sync(process.communicate)
        assert process.returncode == 0 and "SIGINT: unmounting" in err, err
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
        assert not os.path.ismount(client.mountpoint)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if os.path.ismount(client.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(client.mountpoint)], capture_output=True)


async def test_the_folder_of_a_killed_mount_is_named_as_such_and_umount_clears_it(tmp_path: Path,
                                                                                  nursery: trio.Nursery) -> None:
    """A mount killed outright leaves its folder mounted with nobody serving it (every access: ENOTCONN). mount
    printed a traceback there, and umount said the folder was not mounted."""
    net = await start_network(tmp_path, nursery, nodes=1)
    client = Client(tmp_path / "c", net.mediator_url)
    client.init()
    try:
        await client.mount()
        assert client.process is not None
        os.kill(client.process.pid, signal.SIGKILL)
        client.process.wait()
        with trio.fail_after(10):  # until the kernel's cached attributes of the folder expire
            while True:
                try:
                    os.stat(client.mountpoint)
                except OSError as exc:
                    assert exc.errno == errno.ENOTCONN
                    break
                await trio.sleep(0.1)
        for daemon in ((), ("--daemon",)):
            again = await trio.to_thread.run_sync(partial(client.cli, "mount", str(client.mountpoint), *daemon,
                                                          check=False))
            assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr
            assert "still mounted by a mount process that has stopped: unmount it first" in again.stderr
        await trio.to_thread.run_sync(lambda: client.cli("umount", str(client.mountpoint)))
        assert client.mountpoint.is_dir() and not os.path.ismount(client.mountpoint)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(client.mountpoint)], capture_output=True)  # if still dead
        await client.cleanup()

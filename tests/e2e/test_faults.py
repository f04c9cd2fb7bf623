"""The fault suite of the whole system (docs/e2e.md): real processes, a real FUSE mount, the users' CLIs.

Scenarios share one devnet (see conftest.py) and run in file order; each one leaves every node running and the
mount up. Numbers in the test names are the scenarios of docs/e2e.md.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from e2e_net import PYTHON, ROOT, Devnet, MiB, pid_alive, tree_digest, wait_until, write_tree

from fincryptfs.core.layout import ObjectLayout
from fincryptfs.core.merkle import TreeBuilder
from fincryptfs.core.padding import padded_length
from fincryptfs.mediator_client import ObjectInfo, ShareLocation

# Like every FUSE test: needs /dev/fuse and root (CI has both; the README says the tests run as root).
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                                  reason="needs /dev/fuse and root")]

K, N, HAPPY = 3, 6, 5  # the client's defaults (FINCRYPT_K, FINCRYPT_N, FINCRYPT_HAPPY)
MARKER = b"FINCRYPT-E2E-PLAINTEXT-MARKER-5e1f"
SECRET_NAME = "quarterly-salaries-e2e-7c2d"


def copy_in(net: Devnet, source: Path, name: str) -> Path:
    target = net.mount / name
    shutil.copytree(source, target)
    return target


def object_shares(net: Devnet, path: str) -> tuple[str, ObjectInfo]:
    entry = net.file_status(path)
    assert entry["state"] == "stored", entry
    return entry["object_id"], net.object_info(entry["object_id"])


def wait_health(net: Devnet, object_id: str, predicate: Callable[[ObjectInfo], bool], timeout: float, what: str
                ) -> ObjectInfo:
    def check() -> ObjectInfo | None:
        info = net.object_info(object_id)
        return info if predicate(info) else None
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
        for dirpath, _dirs, names in os.walk(folder):
            for name in names:
                data = (Path(dirpath) / name).read_bytes()
                scanned += len(data)
                for needle in needles:
                    assert needle not in data, f"{needle!r} found in {Path(dirpath) / name}"
                    assert needle.decode() not in name
    assert scanned > 3 * MiB  # the shares really were scanned

    status = net.status()
    entries = [f for f in status["files"] if f["path"].startswith(f"/{SECRET_NAME}/")]
    assert len(entries) == 7
    on_disk = {sid: path for i in range(len(net.nodes)) for sid, path in net.share_files(i).items()}
    members: dict[str, list[dict]] = {}
    for entry in entries:
        members.setdefault(entry["object_id"], []).append(entry)
    assert any(e["packed"] for e in entries), "small files were expected to travel in a pack"
    for object_id, group in members.items():
        info = net.object_info(object_id)
        if group[0]["packed"]:
            # a pack hides its members' sizes: its padded size is a Padmé value covering all of them
            content = sum(e["size"] for e in group)
            assert info.layout.padded_size >= content + 8, group
            assert padded_length(info.layout.padded_size - 8) == info.layout.padded_size, info.layout
            layout = info.layout
        else:
            (entry,) = group
            layout = ObjectLayout(padded_length(entry["size"]), info.layout.segment_size, K, N)
            assert info.layout == layout, (entry["path"], info.layout)
        assert (layout.k, layout.n) == (K, N)
        assert len(info.shares) == N
        for share in info.shares:
            assert share.share_size == layout.share_size
            assert on_disk[share.share_id].stat().st_size == layout.share_size
            for e in group:
                if e["size"] > 64:
                    assert layout.share_size not in (e["size"], e["size"] // K), e


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


def audit_rounds(net: Devnet, node_id: str, since: float) -> list[tuple[int, str, str]]:
    """(round, result, detail) of the node's finished audit rounds started after ``since``."""
    db = net.mediator_db()
    try:
        return list(db.execute("SELECT round_id, result, detail FROM audit_rounds WHERE node_id = ? AND "
                               "started_at >= ? AND finished_at IS NOT NULL ORDER BY round_id", (node_id, since)))
    finally:
        db.close()


def audit_counts(net: Devnet, node_id: str) -> tuple[int, int]:
    """(passed, failed) rounds in the node's record at the mediator."""
    db = net.mediator_db()
    try:
        passed, failed = db.execute("SELECT passed, failed FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
        return int(passed), int(failed)
    finally:
        db.close()


def audit_passes(net: Devnet, node_id: str, from_round: int) -> list[int]:
    db = net.mediator_db()
    try:
        return [r for (r,) in db.execute("SELECT round_id FROM audit_passes WHERE node_id = ? AND round_id >= ?",
                                         (node_id, from_round))]
    finally:
        db.close()


def healthy_shares(info: ObjectInfo) -> list[ShareLocation]:
    return [s for s in info.shares if s.state in ("stored", "proven")]


# --- 10: a new machine, only the recovery phrase ------------------------------------------------------------------


def test_10_restore_on_a_new_machine_from_the_phrase(healed: Devnet, tmp_path: Path) -> None:
    net = healed
    write_tree(tmp_path / "tree", seed=10, large=1, small=5)
    copy_in(net, tmp_path / "tree", "s10")
    net.flush()
    expected = tree_digest(net.mount)  # the whole tree, every scenario's files included
    net.unmount()  # one machine per account at a time (docs/client.md)
    machine = tmp_path / "new-machine"
    machine.mkdir()
    env = machine / "client.env"
    env.write_text(f"FINCRYPT_DATA_DIR={machine / 'data'}\nFINCRYPT_KEY_FILE={machine / 'master.key'}\n"
                   f"FINCRYPT_CACHE_DIR={machine / 'cache'}\n")
    mount = machine / "mnt"
    mount.mkdir()
    pid = None
    try:
        net.fincryptfs("restore", "--env-file", str(env), "--mediator", net.mediator_url, "--phrase-file",
                       str(net.home / "recovery-phrase.txt"), "--no-passphrase")
        out = net.fincryptfs("mount", str(mount), "--daemon", "--env-file", str(env)).stdout
        pid = int(out.split("(process ", 1)[1].split(",", 1)[0])
        assert tree_digest(mount) == expected
    finally:
        if os.path.ismount(mount):
            net.fincryptfs("umount", str(mount), check=False)
        if pid is not None:
            try:
                wait_until(lambda: not pid_alive(pid), 20, "the new machine's mount to exit")
            except AssertionError:
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["fusermount3", "-u", "-z", str(mount)], check=False, capture_output=True)
        net.remount()


# --- 7: the client killed mid-upload ------------------------------------------------------------------------------


def test_07_kill_9_client_mid_upload_loses_nothing_closed(healed: Devnet, tmp_path: Path) -> None:
    net = healed
    expected = write_tree(tmp_path / "tree", seed=7, large=3, small=6)
    copy_in(net, tmp_path / "tree", "s7")  # every file closed; uploads start now
    last = os.urandom(4 * MiB)
    (net.mount / "s7" / "last.bin").write_bytes(last)  # closed just before the kill: its upload is in flight
    expected["last.bin"] = hashlib.sha256(last).hexdigest()
    half_written = open(net.mount / "s7-open.bin", "wb")  # noqa: SIM115 - still open at the kill
    half_written.write(os.urandom(MiB))
    net.kill_mount()
    try:
        half_written.close()
    except OSError:
        pass  # the file system under it is gone; this file was never closed, so nothing was promised
    assert net.status()["pending_uploads"] > 0, "the uploads finished before the kill: nothing was tested"
    net.remount()
    net.flush()
    net.remount(clear_cache=True)  # what is read now comes from the network
    assert tree_digest(net.mount / "s7") == expected


# --- 2: nodes die while files are closed --------------------------------------------------------------------------


def test_02_close_succeeds_only_with_happy_shares(healed: Devnet, tmp_path: Path) -> None:
    net = healed
    # One node dead: enough shares still land (or are re-placed), so the flush succeeds.
    net.kill_node(0)
    one = os.urandom(MiB + 12345)
    (net.mount / "s2-one-down.bin").write_bytes(one)
    net.flush(timeout=60)
    _object_id, info = object_shares(net, "/s2-one-down.bin")
    assert len(healthy_shares(info)) >= HAPPY
    net.start_node(0)

    # Too many dead: fewer than happy shares can land; flush says so, the previous version stays readable.
    v1 = os.urandom(MiB + 999)
    (net.mount / "s2-file.bin").write_bytes(v1)
    net.flush()
    v1_object = net.stored_object_json("/s2-file.bin")
    dead = [0, 1, 2, 6]  # live: 3, 4, 5, 7 = four nodes, one short of happy; v1 keeps three shares (3, 4, 5)
    for i in dead:
        net.kill_node(i)
    v2 = os.urandom(MiB + 4242)
    (net.mount / "s2-file.bin").write_bytes(v2)
    failed = net.flush(timeout=8, check=False)
    assert failed.returncode == 1, failed.stderr
    assert "s2-file.bin" in failed.stderr and "last error" in failed.stderr, failed.stderr
    status = net.status()
    errors = [e for e in status["upload_errors"] if e["path"] == "/s2-file.bin"]
    assert errors and ("need 5" in errors[0]["error"] or "not enough storage nodes" in errors[0]["error"]), errors
    assert net.file_status("/s2-file.bin")["state"] != "stored"
    assert net.read_object(v1_object) == v1  # the previous version, read from the network
    for i in dead:
        net.start_node(i)
    net.flush(timeout=90)
    net.remount(clear_cache=True)
    assert (net.mount / "s2-file.bin").read_bytes() == v2
    assert (net.mount / "s2-one-down.bin").read_bytes() == one


# --- 3: repair, until no original share is left -------------------------------------------------------------------


def test_03_repair_restores_n_shares_until_no_original_is_left(healed: Devnet, tmp_path: Path) -> None:
    net = healed
    data = os.urandom(MiB + 777)
    (net.mount / "s3.bin").write_bytes(data)
    net.flush()
    object_id, info = object_shares(net, "/s3.bin")
    originals = {(s.share_id, s.node_id) for s in info.shares}
    assert len(originals) == N
    timings = []
    while True:
        info = net.object_info(object_id)
        left = sorted((s.share_id, s.node_id) for s in info.shares if (s.share_id, s.node_id) in originals)
        if not left:
            break
        doomed = left[:2]  # n - 2 healthy: below the repair threshold (n - 1)
        for share_id, node_id in doomed:
            data_file = net.share_path(node_id, share_id)
            data_file.unlink()
            data_file.with_suffix(".tree").unlink()
        started = time.monotonic()

        def repaired(info: ObjectInfo, doomed: Sequence[tuple[str, str]] = doomed) -> bool:
            where = {(s.share_id, s.node_id) for s in healthy_shares(info)}
            return len(where) == N and not where & set(doomed)

        wait_health(net, object_id, repaired, 30, f"repair of {len(doomed)} deleted shares")
        timings.append(time.monotonic() - started)
    net.remount(clear_cache=True)
    assert (net.mount / "s3.bin").read_bytes() == data
    print(f"repair rounds took {', '.join(f'{t:.1f}' for t in timings)} s (audit period 2 s)")
    assert len(timings) == N // 2


# --- 4: fewer than k shares: irreparable, then back --------------------------------------------------------------


def test_04_fewer_than_k_is_irreparable_until_a_node_returns(healed: Devnet, tmp_path: Path) -> None:
    net = healed
    data = os.urandom(300_000)
    (net.mount / "s4.bin").write_bytes(data)
    net.flush()
    object_id, info = object_shares(net, "/s4.bin")
    holders = sorted(net.node_index(s.node_id) for s in info.shares)
    down = holders[: N - K + 1] + [i for i in range(len(net.nodes)) if i not in holders]  # no repair target left
    for i in down:
        net.kill_node(i)

    def irreparable() -> bool:
        entry = net.file_status("/s4.bin")
        return entry["health"] == "irreparable" and entry["shares_healthy"] == K - 1
    wait_until(irreparable, 40, "the status to say irreparable")
    text = net.fincryptfs("status", "--env-file", str(net.client_env)).stdout
    assert any("irreparable" in line and "/s4.bin" in line for line in text.splitlines()), text
    wait_until(lambda: net.mediator("/v1/status")["objects_irreparable"] >= 1, 10,
               "the mediator's irreparable-object count")

    net.start_node(down[0])  # one holder back: k shares reachable again
    wait_until(lambda: net.file_status("/s4.bin")["health"] in ("degraded", "healthy"), 30,
               "the object to recover")
    net.remount(clear_cache=True)
    assert (net.mount / "s4.bin").read_bytes() == data
    for i in down[1:]:
        net.start_node(i)
    wait_until(lambda: net.file_status("/s4.bin")["health"] == "healthy", 60, "full health again")


# --- 5: a flipped byte ---------------------------------------------------------------------------------------------


def test_05_flipped_byte_reads_stay_correct_and_the_node_fails_its_audit(healed: Devnet, tmp_path: Path) -> None:
    net = healed
    small = os.urandom(2000)  # a one-leaf share: the audit's leaf is the damaged one
    large = os.urandom(2 * MiB + 5)
    (net.mount / "s5-small.bin").write_bytes(small)
    (net.mount / "s5-large.bin").write_bytes(large)
    net.flush()
    _, small_info = object_shares(net, "/s5-small.bin")
    _, large_info = object_shares(net, "/s5-large.bin")
    victim = next(s for s in small_info.shares if s.index == 0)
    passed_before, failed_before = audit_counts(net, victim.node_id)
    flipped_at = time.time()
    for share in (victim, next(s for s in large_info.shares if s.index == 0)):
        path = net.share_path(share.node_id, share.share_id)
        with open(path, "r+b") as f:
            at = path.stat().st_size // 2
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x01]))
    net.remount(clear_cache=True)
    assert (net.mount / "s5-small.bin").read_bytes() == small
    assert (net.mount / "s5-large.bin").read_bytes() == large
    failed = wait_until(lambda: [r for r in audit_rounds(net, victim.node_id, flipped_at) if r[1] == "failed"], 20,
                        "the damaged node's audit to fail")
    assert audit_passes(net, victim.node_id, failed[0][0]).count(failed[0][0]) == 0
    # its reputation drops below what its passed rounds alone give (a round in flight at the flip may pass)
    passed, failed_count = audit_counts(net, victim.node_id)
    after = float(net.node_record(victim.node_id)["reputation"])
    assert failed_count > failed_before and passed >= passed_before
    assert after < (passed + 1) / (passed + failed_before + 2) - 0.001, (passed, failed_count, after)


# --- 8: a node killed mid-write, again and again -------------------------------------------------------------------


def node_share_rows(net: Devnet, i: int) -> dict[str, tuple[int, bytes, str]]:
    import sqlite3

    db = sqlite3.connect(f"file:{net.home / f'node-{i}' / 'data' / 'storaged.sqlite3'}?mode=ro", uri=True)
    try:
        return {sid: (size, root, state) for sid, size, root, state in
                db.execute("SELECT share_id, size, root, state FROM shares")}
    finally:
        db.close()


def merkle_root(path: Path) -> bytes:
    builder = TreeBuilder()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            builder.update(chunk)
    return builder.finish().root


def test_08_kill_9_node_mid_write_never_serves_a_torn_share(healed: Devnet, tmp_path: Path) -> None:
    net = healed
    victim = 0  # the cheapest node: it gets a share of every new object
    tmp_dirs = [Path(d) / ".tmp" for d in net.nodes[victim]["share_dirs"]]
    written: dict[str, bytes] = {}
    before = set(node_share_rows(net, victim))  # (scenario 5 damaged some of these on purpose)
    caught = 0
    for round_ in range(6):
        data = os.urandom(4 * MiB + round_)
        name = f"s8-{round_}.bin"
        (net.mount / name).write_bytes(data)
        written[name] = data

        def writing() -> bool:
            return any(any(d.iterdir()) for d in tmp_dirs)
        end = time.monotonic() + 5
        while not writing() and time.monotonic() < end:
            time.sleep(0.002)
        caught += writing()
        net.kill_node(victim)
        net.start_node(victim)
    net.flush(timeout=120)
    restarted_at = time.time()
    assert caught >= 3, f"only {caught} of 6 kills hit a share being written"
    # What the node could serve or prove (its rows in state ok) is whole; nothing else is on its disk.
    rows = node_share_rows(net, victim)
    files = net.share_files(victim)
    assert set(files) <= set(rows), "a share file without a database row survived the restart"
    for share_id, (size, root, state) in rows.items():
        if state == "ok" and share_id not in before:
            assert files[share_id].stat().st_size == size
            assert merkle_root(files[share_id]) == root, f"torn share {share_id} is served"
    assert not any(any(d.iterdir()) for d in tmp_dirs)
    node_id = net.nodes[victim]["id"]
    wait_until(lambda: [r for r in audit_rounds(net, node_id, restarted_at) if r[1] == "passed"], 20,
               "an audit of the restarted node to pass")
    assert set(rows) - before, "the node stored no share during the kills: nothing was checked"
    assert not [r for r in audit_rounds(net, node_id, restarted_at) if r[1] == "failed"]
    net.remount(clear_cache=True)
    for name, data in written.items():
        assert (net.mount / name).read_bytes() == data, name


# --- 9: the mediator killed mid-audit (and mid-payments pass) -------------------------------------------------------


def test_09_kill_9_mediator_mid_audit_nothing_paid_twice(healed: Devnet, tmp_path: Path) -> None:
    import random

    net = healed
    data = os.urandom(MiB)
    (net.mount / "s9.bin").write_bytes(data)
    net.flush()
    deposits_before = net.ledger()["deposits"]
    interrupted = 0
    rng = random.Random(9)
    for _ in range(5):
        # kill the moment a round is open in the database (a round of 8 nodes lasts a few milliseconds)
        db = net.mediator_db()
        try:
            done = db.execute("SELECT count(*) FROM audit_rounds WHERE result = 'pending'").fetchone()[0]
            end = time.monotonic() + rng.uniform(2.0, 4.0)
            while time.monotonic() < end:
                if db.execute("SELECT count(*) FROM audit_rounds WHERE result = 'pending'").fetchone()[0] > done:
                    break
                time.sleep(0.001)
        finally:
            db.close()
        net.kill_mediator(signal.SIGKILL)
        db = net.mediator_db()
        try:
            pending = db.execute("SELECT count(*) FROM audit_rounds WHERE result = 'pending'").fetchone()[0]
            interrupted += pending > done
        finally:
            db.close()
        net.start_mediator()
    assert interrupted >= 1, "no kill landed during an audit round"
    ledger = net.ledger()
    assert ledger["invariant_holds"], ledger
    assert ledger["deposits"] == deposits_before, "a deposit was credited twice"
    keys = [p["key"] for p in ledger["recent"]]
    assert len(keys) == len(set(keys))
    db = net.mediator_db()
    try:
        credits = db.execute("SELECT count(*), count(DISTINCT round_id || ':' || node_id) FROM audit_credits"
                             ).fetchone()
        batches = db.execute("SELECT count(*), count(DISTINCT txid) FROM payout_batches WHERE txid IS NOT NULL"
                             ).fetchone()
    finally:
        db.close()
    assert credits[0] == credits[1] and batches[0] == batches[1]
    # audits go on after the restarts
    restarted = time.time()
    wait_until(lambda: audit_rounds(net, net.nodes[3]["id"], restarted), 20, "an audit round after the restarts")
    net.remount(clear_cache=True)
    assert (net.mount / "s9.bin").read_bytes() == data


# --- 6: a node keeping only its Merkle trees, and a node replaying old answers --------------------------------------


def test_06_tree_only_node_and_replaying_node_fail_their_first_audit_unpaid(healed: Devnet, tmp_path: Path) -> None:
    net = healed
    (net.mount / "s6.bin").write_bytes(os.urandom(MiB))
    net.flush()

    # Node 1 keeps its trees but throws its share bytes away (zeros, same sizes).
    tree_only = net.nodes[1]["id"]
    damaged_at = time.time()
    for path in net.share_files(1).values():
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.write(bytes(size))
    rounds = wait_until(lambda: audit_rounds(net, tree_only, damaged_at), 20, "the tree-only node's next audit")
    assert rounds[0][1] == "failed", rounds
    assert audit_passes(net, tree_only, rounds[0][0]).count(rounds[0][0]) == 0

    # Node 2 runs as a real node that records its answers, then replays the last one forever.
    liar = net.nodes[2]["id"]
    recording = tmp_path / "answer.bin"
    lying = [PYTHON, str(ROOT / "tests" / "e2e" / "lying_node.py"), "--env-file", str(net.node_env(2))]
    net.kill_node(2, signal.SIGTERM)
    net.start_node(2, lying + ["--record", str(recording)])
    wait_until(recording.exists, 20, "the recording node to answer a challenge")
    net.kill_node(2, signal.SIGTERM)
    lying_since = time.time()
    net.start_node(2, lying + ["--replay", str(recording)])
    rounds = wait_until(lambda: audit_rounds(net, liar, lying_since), 20, "the replaying node's first audit")
    assert rounds[0][1] == "failed" and "replayed" in rounds[0][2], rounds
    first = rounds[0][0]
    assert net.node_record(liar)["reputation"] < net.node_record(net.nodes[3]["id"])["reputation"]
    # its shares count as lost from that round on (and are repaired elsewhere): it is never challenged again
    # for them, so it can never be paid for them
    assert audit_passes(net, liar, first) == []
    ledger = net.ledger()
    assert ledger["invariant_holds"]
    for posting in ledger["recent"]:
        if posting["kind"] == "credit" and posting["dest"] == f"node:{liar}":
            assert int(posting["key"].split(":")[1]) < first, f"credited for a replayed answer: {posting}"
    net.remount(clear_cache=True)
    assert (net.mount / "s6.bin").stat().st_size == MiB

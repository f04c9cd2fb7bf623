"""The CLI without a network: help, exit codes, key files and their passphrases, actionable errors."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from fincryptfs import cli
from fincryptfs.core.crypto import master_key_from_phrase, new_master_key, recovery_phrase
from fincryptfs.core.errors import ConfigError, WrongKeyError
from fincryptfs.core.settings import ClientSettings
from fincryptfs.keystore import load_master_key, save_key_file

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINCRYPT_")}
    return subprocess.run([sys.executable, "-m", "fincryptfs.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60)


def write_env(tmp_path: Path) -> Path:
    env = tmp_path / "client.env"
    env.write_text(f"FINCRYPT_DATA_DIR={tmp_path / 'data'}\nFINCRYPT_KEY_FILE={tmp_path / 'key'}\n")
    return env


@pytest.mark.parametrize("command", ["init", "restore", "mount", "umount", "flush", "status"])
def test_every_command_has_help(command: str) -> None:
    result = run(command, "--help")
    assert result.returncode == 0
    assert "--env-file" in result.stdout


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run().returncode == 2
    assert run("mount").returncode == 2  # DIR missing
    assert run("restore").returncode == 2  # --mediator missing
    result = run("init", "--env-file", str(write_env(tmp_path)), "--passphrase-file", "x", "--no-passphrase")
    assert result.returncode == 2 and "not both" in result.stderr
    for command in ("init", "restore"):  # the error named FINCRYPT_MEDIATOR_URL, which the user had not typed
        result = run(command, "--env-file", str(write_env(tmp_path)), "--mediator", "127.0.0.1:8700")
        assert result.returncode == 2 and "argument --mediator: '127.0.0.1:8700' is not an http://" in result.stderr
    assert not (tmp_path / "key").exists()


def test_init_with_passphrase_then_restore_from_phrase(tmp_path: Path) -> None:
    env = write_env(tmp_path)
    (tmp_path / "pass").write_text("correct horse battery\n")
    result = run("init", "--env-file", str(env), "--mediator", "http://127.0.0.1:9", "--passphrase-file",
                 str(tmp_path / "pass"))
    assert result.returncode == 0, result.stderr
    phrase = next(line.strip() for line in result.stdout.splitlines() if len(line.split()) == 24)
    key_file = tmp_path / "key"
    assert os.stat(key_file).st_mode & 0o777 == 0o600
    assert "FINCRYPT_MEDIATOR_URL=http://127.0.0.1:9" in env.read_text()
    assert load_master_key(key_file, tmp_path / "pass") == master_key_from_phrase(phrase)
    with pytest.raises(WrongKeyError, match="FINCRYPT_PASSPHRASE_FILE"):
        load_master_key(key_file, None, interactive=False)
    (tmp_path / "wrong").write_text("wrong\n")
    with pytest.raises(WrongKeyError, match="wrong passphrase"):
        load_master_key(key_file, tmp_path / "wrong")

    again = run("init", "--env-file", str(env), "--no-passphrase")
    assert again.returncode == 1 and "already exists" in again.stderr

    other = tmp_path / "other"
    other.mkdir()
    env2 = write_env(other)
    (other / "phrase").write_text(phrase)
    restored = run("restore", "--env-file", str(env2), "--mediator", "http://127.0.0.1:9", "--phrase-file",
                   str(other / "phrase"), "--no-passphrase")
    assert restored.returncode == 0, restored.stderr
    assert "Could not ask the mediator whether it holds this account's tree" in restored.stdout  # nobody there
    assert load_master_key(other / "key") == master_key_from_phrase(phrase)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "phrase").write_text(" ".join(phrase.split()[::-1]))
    wrong = run("restore", "--env-file", str(write_env(bad)), "--mediator", "http://127.0.0.1:9", "--phrase-file",
                str(bad / "phrase"), "--no-passphrase")
    assert wrong.returncode == 1 and "error:" in wrong.stderr
    for unreadable, said in ((bad / "missing", "cannot read the recovery phrase file"), (bad, "cannot read"),
                             (bad / "binary", "is not text")):
        (bad / "binary").write_bytes(b"\xff\xfe\x00 words")
        failed = run("restore", "--env-file", str(write_env(bad)), "--mediator", "http://127.0.0.1:9",
                     "--phrase-file", str(unreadable), "--no-passphrase")
        assert failed.returncode == 1 and said in failed.stderr and "Traceback" not in failed.stderr, failed.stderr


def test_a_restore_run_again_keeps_the_same_key_and_refuses_another(tmp_path: Path) -> None:
    """The mediator did not answer the first restore, or its URL was mistyped: running it again with the same
    phrase must go through (the key file kept, the new URL written), while another account's phrase, the wrong
    passphrase or a local tree already there must not replace anything."""
    env = write_env(tmp_path)
    phrase = recovery_phrase(new_master_key())
    (tmp_path / "phrase").write_text(phrase)
    (tmp_path / "pass").write_text("correct horse battery\n")
    protected = ("--phrase-file", str(tmp_path / "phrase"), "--passphrase-file", str(tmp_path / "pass"))
    first = run("restore", "--env-file", str(env), "--mediator", "http://127.0.0.1:9", *protected)
    assert first.returncode == 0, first.stderr
    key = (tmp_path / "key").read_bytes()
    again = run("restore", "--env-file", str(env), "--mediator", "http://127.0.0.1:10", *protected)
    assert again.returncode == 0 and "kept it" in again.stdout, again.stderr
    assert (tmp_path / "key").read_bytes() == key
    assert "FINCRYPT_MEDIATOR_URL=http://127.0.0.1:10" in env.read_text()
    assert load_master_key(tmp_path / "key", tmp_path / "pass") == master_key_from_phrase(phrase)

    (tmp_path / "other").write_text(recovery_phrase(new_master_key()))
    (tmp_path / "wrong").write_text("wrong passphrase\n")
    refused = [run("restore", "--env-file", str(env), "--mediator", "http://127.0.0.1:9", *args) for args in (
        ("--phrase-file", str(tmp_path / "other"), "--passphrase-file", str(tmp_path / "pass")),
        ("--phrase-file", str(tmp_path / "phrase"), "--passphrase-file", str(tmp_path / "wrong")),
        ("--phrase-file", str(tmp_path / "phrase"), "--no-passphrase"))]
    assert all(r.returncode == 1 and "a key file already exists" in r.stderr for r in refused)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.db").write_bytes(b"")
    tree = run("restore", "--env-file", str(env), "--mediator", "http://127.0.0.1:9", *protected)
    assert tree.returncode == 1 and "a local tree already exists" in tree.stderr
    assert (tmp_path / "key").read_bytes() == key


def test_a_mediator_that_does_not_answer_the_restore_is_named_as_such(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A mediator that accepts the connection but never answers: the restore's message says so, not "()"."""
    monkeypatch.setattr(cli, "RESTORE_CHECK_TIMEOUT", 0.3)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        settings = ClientSettings.from_env({"FINCRYPT_MEDIATOR_URL": url}, home=tmp_path)
        said = trio.run(cli._tree_at_mediator, settings, new_master_key())
    assert "(no answer in 0.3 s)" in said and "run this again" in said, said


def test_unprotected_key_file_must_be_private(tmp_path: Path) -> None:
    env = write_env(tmp_path)
    assert run("init", "--env-file", str(env), "--no-passphrase").returncode == 0
    os.chmod(tmp_path / "key", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_master_key(tmp_path / "key")


def test_mount_checks_the_folder_before_the_key_and_before_going_to_the_background(tmp_path: Path) -> None:
    """With --daemon the background process's errors went to its log only; and a folder already mounted made
    ``mount --daemon`` report success at once (the folder was a mount point), while its process failed."""
    env = write_env(tmp_path)
    assert run("init", "--env-file", str(env), "--no-passphrase").returncode == 0
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("would be hidden by the mount")
    cases = [(tmp_path / "missing", "does not exist: create it first"), (tmp_path / "a-file", "is not a folder"),
             (tmp_path / "full", "is not empty: move its files away")]
    if os.path.ismount("/proc"):
        cases.append((Path("/proc"), "is already a mount point"))
    for folder, said in cases:
        for daemon in ((), ("--daemon",)):
            result = run("mount", str(folder), "--env-file", str(env), *daemon)
            assert result.returncode == 1 and said in result.stderr and "mounted" not in result.stdout, result
    assert not (tmp_path / "data" / "mount.log").exists()  # nothing was started


@pytest.mark.parametrize("error,said", [(KeyboardInterrupt(), "interrupted\n"),
                                        (ConfigError("the devnet needs 2 nodes"), "error: the devnet needs 2 nodes\n")])
def test_an_error_grouped_by_a_nursery_is_reported_in_words(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str],
                                                            error: BaseException, said: str) -> None:
    """A Ctrl-C before the mount's signal handler runs, or a devnet that cannot start, reached the CLI inside a
    trio exception group, and printed a traceback."""
    def failing(args: object) -> int:
        raise BaseExceptionGroup("Exceptions from Trio nursery", [BaseExceptionGroup("inner", [error])])

    monkeypatch.setattr(cli, "cmd_flush", failing)
    monkeypatch.setattr(cli.logs, "configure", lambda level: None)
    assert cli.main(["flush"]) == 1
    assert capsys.readouterr().err == said


def test_devnet_checks_its_arguments_before_starting_anything(tmp_path: Path) -> None:
    home = tmp_path / "net"
    for args, said in ((["--nodes", "0"], "--nodes: a devnet needs at least 2 storage nodes"),
                       (["--audit-period", "0"], "--audit-period: at least 0.5 seconds")):
        result = run("devnet", "--home", str(home), *args)
        assert result.returncode == 2 and said in result.stderr and "Traceback" not in result.stderr, result
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("x")
    result = run("devnet", "--home", str(home), "--mount", str(tmp_path / "full"))
    assert result.returncode == 1 and "is not empty" in result.stderr and "Traceback" not in result.stderr, result
    assert not home.exists()  # no network was started


def test_flush_and_status_without_a_tree_say_what_to_do(tmp_path: Path) -> None:
    env = write_env(tmp_path)
    for command in ("flush", "status"):
        result = run(command, "--env-file", str(env))
        assert result.returncode == 1
        assert "mount the filesystem first" in result.stderr


def test_flush_says_when_nothing_is_uploading_and_why(tmp_path: Path) -> None:
    """A pending upload with no mount (or with a mount whose worker is down) waited in silence: flush printed the
    count every second until its timeout, and status showed it, with no word that nothing was uploading."""
    import time

    from fincryptfs import meta
    from fincryptfs.lockfile import MOUNT_LOCK, UPLOAD_LOCK, held, holder, uploads_stalled
    env = write_env(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    db = meta.connect(data / "meta.db")
    node = meta.create(db, meta.ROOT_INO, b"report.pdf", meta.FILE, 0o644, 0, 0, None, dirty=True)
    meta.record_release(db, node.ino, 1000, time.time_ns())
    db.close()
    result = run("flush", "--env-file", str(env), "--timeout", "1")
    assert result.returncode == 1
    assert "nothing is uploading: this data folder is not mounted" in result.stderr, result.stderr
    assert uploads_stalled(data) is not None and holder(data / MOUNT_LOCK) is None
    with held(data / MOUNT_LOCK, "busy"):  # a mount whose upload worker is down, or restarting
        assert holder(data / MOUNT_LOCK) == os.getpid()
        assert "the mount's upload worker is not running just now" in (uploads_stalled(data) or "")
        with held(data / UPLOAD_LOCK, "busy"):
            assert uploads_stalled(data) is None


def test_bad_settings_name_the_variable(tmp_path: Path) -> None:
    env = tmp_path / "client.env"
    env.write_text("FINCRYPT_K=banana\n")
    result = run("status", "--env-file", str(env))
    assert result.returncode == 1 and "FINCRYPT_K" in result.stderr
    missing = run("status", "--env-file", str(tmp_path / "nope.env"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_a_leftover_temporary_key_file_does_not_lend_its_mode_to_the_key(tmp_path: Path) -> None:
    key_path = tmp_path / "keys" / "master.key"
    key_path.parent.mkdir()
    leftover = key_path.with_name("master.key.tmp")
    leftover.write_bytes(b"half a key from a crash")
    os.chmod(leftover, 0o644)
    save_key_file(key_path, bytes(range(32)), None)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600 and not leftover.exists()
    assert load_master_key(key_path) == bytes(range(32))


def test_the_devnet_account_secrets_are_never_readable_by_others(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The devnet's key file and recovery phrase (the master key in words) are created 0600, not written
    first and restricted after: under a permissive umask they were readable by anyone in between."""
    from fincryptfs import devnet

    seen: list[tuple[str, int]] = []
    real_chmod = Path.chmod

    def chmod(self: Path, mode: int, **kwargs: bool) -> None:
        if self.is_file():
            seen.append((self.name, stat.S_IMODE(self.stat().st_mode)))
        real_chmod(self, mode, **kwargs)

    monkeypatch.setattr(Path, "chmod", chmod)
    old_umask = os.umask(0)
    try:
        devnet._make_client(tmp_path, "http://127.0.0.1:1")
    finally:
        os.umask(old_umask)
    exposed = [(name, mode) for name, mode in seen if mode & 0o077 and name != "client.env"]
    assert not exposed
    for path in (tmp_path / "client" / "master.key", tmp_path / "recovery-phrase.txt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_bytes()


def test_the_devnet_hints_name_a_command_the_shell_finds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``make run`` prints commands to copy; without the virtual environment on the PATH a bare ``fincryptfs``
    was "command not found", so the hint names the command where it is."""
    script = Path(sys.executable).parent / "fincryptfs"
    assert script.exists(), "make setup installs the fincryptfs command next to the environment's Python"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)
    named = cli.command_name()
    assert Path(named).resolve() == script.resolve() and os.access(named, os.X_OK)
    monkeypatch.chdir(script.parents[2])  # the project's folder, holding .venv: a short relative path
    assert cli.command_name() == str(script.relative_to(script.parents[2]))
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")
    assert cli.command_name() == "fincryptfs"

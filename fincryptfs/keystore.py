"""The master key file on disk: written atomically with mode 0600, read with or without a passphrase.

The formats are ``core.crypto``'s; this module adds only the file handling and where a passphrase comes from
(a file named by ``FINCRYPT_PASSPHRASE_FILE`` or ``--passphrase-file``, else an interactive prompt).
"""

from __future__ import annotations

import getpass
import os
import stat
import sys
from pathlib import Path

from .core.crypto import decode_key_file, encode_key_file, key_file_needs_passphrase
from .core.errors import ConfigError, WrongKeyError
from .secretfile import write_secret_file


def save_key_file(path: Path, master_key: bytes, passphrase: str | None) -> None:
    """Write the key file (``write_secret_file``); refuses to overwrite an existing one."""
    if path.exists():
        raise ConfigError(f"{path} already exists; move it away first if you really mean to replace the key")
    write_secret_file(path, encode_key_file(master_key, passphrase))


def read_passphrase_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the passphrase file {path}: {exc.strerror}") from exc
    passphrase = text.rstrip("\r\n")
    if not passphrase:
        raise ConfigError(f"the passphrase file {path} is empty")
    return passphrase


def load_master_key(path: Path, passphrase_file: Path | None = None, *, interactive: bool | None = None) -> bytes:
    """The master key from ``path``; asks for the passphrase on the terminal if needed and none was given."""
    try:
        data = path.read_bytes()
        mode = os.stat(path).st_mode
    except FileNotFoundError as exc:
        raise ConfigError(f"no key file at {path}: run 'fincryptfs init' (new account) or 'fincryptfs restore' "
                          "(from your recovery phrase)") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read the key file {path}: {exc.strerror}") from exc
    if not key_file_needs_passphrase(data):
        if stat.S_IMODE(mode) & 0o077:
            raise ConfigError(f"the key file {path} is not protected by a passphrase and others can read it: "
                              f"run 'chmod 600 {path}'")
        return decode_key_file(data, None)
    if passphrase_file is not None:
        return decode_key_file(data, read_passphrase_file(passphrase_file))
    if interactive is None:
        interactive = sys.stdin.isatty()
    if not interactive:
        raise WrongKeyError(f"the key file {path} is protected by a passphrase: set FINCRYPT_PASSPHRASE_FILE or "
                            "run from a terminal")
    for _ in range(3):
        try:
            return decode_key_file(data, getpass.getpass(f"Passphrase for {path}: "))
        except WrongKeyError as exc:
            print(f"error: {exc}", file=sys.stderr)
    raise WrongKeyError("three wrong passphrases")


def ask_new_passphrase() -> str:
    """Prompt twice for a new passphrase on the terminal."""
    if not sys.stdin.isatty():
        raise ConfigError("no terminal to ask for a passphrase: use --passphrase-file F or --no-passphrase")
    for _ in range(3):
        first = getpass.getpass("New passphrase for the key file: ")
        if len(first) < 8:
            print("error: use at least 8 characters", file=sys.stderr)
            continue
        if getpass.getpass("Repeat it: ") == first:
            return first
        print("error: the two passphrases differ", file=sys.stderr)
    raise ConfigError("no passphrase chosen")

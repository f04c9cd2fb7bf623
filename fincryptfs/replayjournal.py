"""A replay guard's memory kept on disk, so that a restarted daemon still refuses the requests it already served.

A signed request stays acceptable for ``MAX_CLOCK_SKEW`` seconds and :class:`~fincryptfs.core.wire.ReplayGuard`
remembers its nonce for that long, but only in memory: a daemon restarted within that window (a crash, an
upgrade, a reboot) would take a captured request a second time, such as a mediator's DELETE of a share whose id
a repair has since given to a new copy. Each recorded nonce is therefore appended to a journal (one short line,
one ``write``, no fsync: it survives the process, which is what a restart needs; a power cut may lose the last
lines, and takes the machine down for longer than most of the window anyway). At start the journal is read back,
expired and torn lines dropped, and rewritten compacted; it is compacted again whenever it holds more dead lines
than live ones.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

from fincryptfs.core.wire import MAX_CLOCK_SKEW, ReplayGuard

log = logging.getLogger(__name__)

JOURNAL_FILE = "replay-nonces.log"
_LINE = re.compile(rb"([0-9]{1,12}) ([0-9a-f]{64}) ([0-9a-f]{32})")
MIN_COMPACT_LINES = 10_000  # below this, a journal is never worth rewriting


class ReplayJournal:
    """Appends what ``guard`` records to ``path`` and restores it on the next start. ``close`` when done."""

    def __init__(self, path: Path, guard: ReplayGuard, *, now: float | None = None) -> None:
        self.path = path
        self.guard = guard
        now = time.time() if now is None else now
        restored = 0
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        for line in data.splitlines():
            match = _LINE.fullmatch(line)
            if match is not None:  # anything else: a line torn by a crash
                restored += guard.restore(match[2].decode(), match[3].decode(), int(match[1]), now)
        if restored:
            log.info("replay guard: %d nonce(s) of requests received before the restart are refused again", restored)
        self._fd = -1
        self._lines = 0
        self._failed = False
        try:
            self._compact()
        except OSError as exc:  # a full or read-only disk must not keep the daemon from starting
            log.warning("cannot rewrite the replay journal %s (%s): appending to it as it is", path, exc)
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            except OSError:
                pass  # record() says so once
        guard.on_record = self.record

    def record(self, signer: str, nonce: str, expiry: float) -> None:
        """Append one nonce (the guard calls this). A failed write is logged once and otherwise ignored: the
        guard still refuses the replay while this process runs."""
        try:
            os.write(self._fd, b"%d %s %s\n" % (int(expiry), signer.encode(), nonce.encode()))
            self._lines += 1
            if self._lines >= max(MIN_COMPACT_LINES, 2 * len(self.guard)):
                self._compact()
        except OSError as exc:
            if not self._failed:
                log.warning("cannot write the replay journal %s (%s): a restart within %d s could accept a replayed "
                            "request again", self.path, exc, MAX_CLOCK_SKEW)
            self._failed = True
        else:
            self._failed = False

    def close(self) -> None:
        self.guard.on_record = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _compact(self) -> None:
        """Rewrite the journal with the guard's live nonces only (a new file renamed over the old one)."""
        entries = self.guard.entries()
        temp = self.path.with_name(self.path.name + ".tmp")
        temp.unlink(missing_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            data = b"".join(b"%d %s %s\n" % (int(e), s.encode(), n.encode()) for s, n, e in entries)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.replace(temp, self.path)
        except BaseException:
            os.close(fd)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._lines = fd, len(entries)

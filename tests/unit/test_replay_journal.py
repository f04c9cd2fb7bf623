"""The replay guard's journal: what one process recorded, the next refuses; torn and expired lines are dropped."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs import replayjournal
from fincryptfs.core.errors import ReplayError
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.wire import MAX_CLOCK_SKEW, ReplayGuard, SignedRequest
from fincryptfs.replayjournal import ReplayJournal

KEYS = [SigningKey.generate().public for _ in range(3)]
NOW = 1_800_000_000


def request(signer: int, nonce: int, timestamp: int = NOW) -> SignedRequest:
    return SignedRequest(KEYS[signer], timestamp, f"{nonce:032x}")


def refused(guard: ReplayGuard, req: SignedRequest, now: float) -> bool:
    try:
        guard.check(req, now)
    except ReplayError:
        return True
    return False


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 30), st.integers(-MAX_CLOCK_SKEW, MAX_CLOCK_SKEW)),
                max_size=40),
       st.integers(0, 2 * MAX_CLOCK_SKEW))
def test_a_restarted_guard_refuses_exactly_the_unexpired_nonces_recorded_before(
        tmp_path_factory: object, seen: list[tuple[int, int, int]], later: int) -> None:
    path = Path(tmp_path_factory.mktemp("j")) / replayjournal.JOURNAL_FILE  # type: ignore[attr-defined]
    guard = ReplayGuard()
    journal = ReplayJournal(path, guard, now=NOW)
    accepted = set()
    for signer, nonce, skew in seen:
        if not refused(guard, request(signer, nonce, NOW + skew), NOW):
            accepted.add((signer, nonce, NOW + skew + MAX_CLOCK_SKEW))
    journal.close()
    restarted = ReplayGuard()
    ReplayJournal(path, restarted, now=NOW + later).close()
    remembered = {(s, n) for s, n, expiry in accepted if expiry >= NOW + later}
    index = {key.id: i for i, key in enumerate(KEYS)}
    assert {(index[s], int(n, 16)) for s, n, _ in restarted.entries()} == remembered
    for signer, nonce in remembered:
        assert refused(restarted, request(signer, nonce, NOW + later), NOW + later)


def test_torn_and_foreign_lines_are_dropped_and_the_journal_is_rewritten(tmp_path: Path) -> None:
    path = tmp_path / replayjournal.JOURNAL_FILE
    good = f"{NOW + 100} {KEYS[0].id} {7:032x}\n"
    path.write_bytes(b"garbage\n" + good.encode() + f"{NOW + 100} {KEYS[1].id} 00ab".encode())  # torn last line
    guard = ReplayGuard()
    journal = ReplayJournal(path, guard, now=NOW)
    assert guard.entries() == [(KEYS[0].id, f"{7:032x}", NOW + 100)]
    assert path.read_text() == good and os.stat(path).st_mode & 0o777 == 0o600
    guard.check(request(1, 8), NOW)
    journal.close()
    assert path.read_text() == good + f"{NOW + MAX_CLOCK_SKEW} {KEYS[1].id} {8:032x}\n"


def test_the_journal_is_compacted_once_mostly_dead(tmp_path: Path, monkeypatch: object) -> None:
    monkeypatch.setattr(replayjournal, "MIN_COMPACT_LINES", 10)  # type: ignore[attr-defined]
    path = tmp_path / replayjournal.JOURNAL_FILE
    guard = ReplayGuard()
    journal = ReplayJournal(path, guard, now=NOW)
    for i in range(100):  # one live nonce at a time: each expires before the next arrives
        guard.check(request(0, i, NOW + 2 * i * MAX_CLOCK_SKEW), NOW + 2 * i * MAX_CLOCK_SKEW)
    journal.close()
    assert len(path.read_bytes().splitlines()) < 12


def test_a_journal_that_cannot_be_written_is_reported_once_and_the_guard_still_works(
        tmp_path: Path, caplog: object) -> None:
    path = tmp_path / replayjournal.JOURNAL_FILE
    guard = ReplayGuard()
    journal = ReplayJournal(path, guard, now=NOW)
    os.close(journal._fd)  # the disk went away under it
    with caplog.at_level(logging.WARNING):  # type: ignore[attr-defined]
        guard.check(request(0, 1), NOW)
        guard.check(request(0, 2), NOW)
    assert refused(guard, request(0, 1), NOW)
    warnings = [r for r in caplog.records if "replay journal" in r.getMessage()]  # type: ignore[attr-defined]
    assert len(warnings) == 1 and "could accept a replayed request again" in warnings[0].getMessage()
    journal._fd = -1
    journal.close()

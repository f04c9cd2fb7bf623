"""Real daemons on virtual time: trio's MockClock drives their loops, so days of hourly periods pass in seconds.

Every daemon (mediatord, storaged, the test's client) runs in the test's one trio run, so virtual time is shared.
Three things make that work with real sockets on 127.0.0.1:

* **Autojump threshold 0.** The clock jumps to the next deadline as soon as the run loop finds nothing to do.
  Everything talking over loopback lives in this process: a request written by one task is already in the
  kernel's receive buffer of the peer task when the loop next polls, so "idle" really means every task sleeps.
  A threshold above 0 costs that much real time per jump, and the mediator's housekeeping loop alone wakes
  every 5 virtual seconds (34,560 jumps in 48 hours): with 1 ms, test_virtual_time.py took 90 s instead of 15.
  This relies on every peer being a task of this run: a peer in a subprocess answers in real time, and the
  clock would jump while its answer is on the way.
* **No jumps while a worker thread runs.** The daemons do CPU and file work in ``trio.to_thread.run_sync``
  (proofs, zfec, share writes, the bitcoin wallet). While a thread runs the loop *is* idle, so a threshold-0
  clock races ahead and fires the HTTP timeouts (without the hold, the first upload fails with ReadTimeout).
  :func:`install` wraps ``trio.to_thread.run_sync`` so that a helper task sits in
  ``trio.testing.wait_all_tasks_blocked`` with an endless cushion while the thread runs: trio never autojumps
  while such a waiter exists.
* **One wall clock.** The daemons read ``time.time()`` (signatures, the replay guard, grants, ``last_seen``,
  billing periods) and two of them bind it as a default argument. :func:`install` points all of them at
  ``epoch + clock.current_time()``, so signer and verifier, mediator and nodes agree, and the wall clock moves
  with the loops' sleeps.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

AUTOJUMP_THRESHOLD = 0.0
HOUR = 3600.0
_NEVER_IDLE_LONG_ENOUGH = 1e9  # real seconds: above trio's longest I/O wait, so the waiter never wakes by itself


@dataclass(frozen=True)
class VirtualTime:
    clock: trio.testing.MockClock
    epoch: float  # wall-clock time at virtual time 0

    def now(self) -> float:
        """The virtual wall clock (safe from worker threads: MockClock.current_time only does arithmetic)."""
        return self.epoch + self.clock.current_time()

    async def sleep_until(self, wall: float) -> None:
        """Let the daemons run until the virtual wall clock reads ``wall``."""
        await trio.sleep_until(wall - self.epoch)


def new_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=AUTOJUMP_THRESHOLD)


def _holding_clock(run_sync: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(run_sync)
    async def run_sync_holding_clock(*args: Any, **kwargs: Any) -> Any:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.testing.wait_all_tasks_blocked, _NEVER_IDLE_LONG_ENOUGH)
            try:
                return await run_sync(*args, **kwargs)
            finally:
                nursery.cancel_scope.cancel()
    return run_sync_holding_clock


def install(monkeypatch: pytest.MonkeyPatch, clock: trio.testing.MockClock, epoch: float) -> VirtualTime:
    """Point every wall-clock read of the daemons at ``clock`` and hold it while worker threads run."""
    from mediatord.app import build_app
    from storaged.service import StorageService

    vt = VirtualTime(clock, epoch)
    monkeypatch.setattr(time, "time", vt.now)
    for fn in (build_app, StorageService.__init__):
        assert fn.__kwdefaults__ is not None and "clock" in fn.__kwdefaults__
        monkeypatch.setitem(fn.__kwdefaults__, "clock", vt.now)
    monkeypatch.setattr(trio.to_thread, "run_sync", _holding_clock(trio.to_thread.run_sync))
    return vt


def hour_epoch(offset: float = 0.0) -> float:
    """A wall-clock start on a whole hour (billing periods are aligned to them) plus ``offset`` seconds."""
    return (time.time() // HOUR) * HOUR + offset

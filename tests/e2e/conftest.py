"""Fixtures of the end-to-end fault suite (docs/e2e.md) and the table it prints at the end of a run.

One devnet (8 storage nodes, audits every 2 s, a FUSE mount) is shared by the scenarios of a module: each
scenario leaves every node running and the mount up (the ``healed`` fixture makes sure of it even when a
scenario fails), so state left behind is only more files, which no scenario minds.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_net import Devnet  # noqa: E402

AUDIT_PERIOD = 2.0
NODES = 8
OFFLINE_AFTER = 8.0  # devnet default is 30 s; nodes announce every 5 s, so 8 s never flags a live node

@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devnet]:
    devnet = Devnet.start(tmp_path_factory.mktemp("devnet"), nodes=NODES, audit_period=AUDIT_PERIOD)
    try:
        # The same mediator, restarted on its own port and database with a shorter offline timer, so that
        # "a node is gone" shows within seconds instead of the devnet's 30 s.
        devnet.kill_mediator(signal.SIGTERM)
        devnet.start_mediator({"MEDIATORD_NODE_OFFLINE_AFTER": str(OFFLINE_AFTER)})
        yield devnet
    finally:
        problems = devnet.stop()
        assert not problems, f"cleanup found leftovers (killed): {problems}"


@pytest.fixture
def healed(net: Devnet) -> Iterator[Devnet]:
    """The shared devnet, put back together after the scenario: every node running, the mount up."""
    try:
        yield net
    finally:
        if not net.node_running_all():
            for i in range(len(net.nodes)):
                if not net.node_running(i):
                    net.start_node(i)
        if net.mount_pid is None or not os.path.ismount(net.mount):
            net.kill_mount_if_alive()
            net.remount()


# --- the summary table --------------------------------------------------------------------------------------

_results: dict[str, list[object]] = {}  # nodeid → [outcome, seconds]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "e2e" not in report.keywords:
        return
    entry = _results.setdefault(report.nodeid, ["passed", 0.0])
    entry[1] = float(entry[1]) + report.duration  # type: ignore[arg-type]
    if hasattr(report, "wasxfail"):
        entry[0] = "xfail" if report.skipped else "XPASS"
    elif report.failed:
        entry[0] = "FAILED" if report.when == "call" else f"ERROR ({report.when})"
    elif report.skipped and entry[0] == "passed":
        entry[0] = "skipped"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _results:
        return
    terminalreporter.section("end-to-end scenarios")
    width = max(len(n.split("::")[-1]) for n in _results)
    terminalreporter.write_line(f"{'scenario':{width}}  {'result':14} {'seconds':>8}")
    total = 0.0
    for nodeid, (outcome, seconds) in _results.items():
        total += float(seconds)  # type: ignore[arg-type]
        name = nodeid.split("::")[-1]
        terminalreporter.write_line(f"{name:{width}}  {outcome!s:14} {float(seconds):8.1f}")  # type: ignore[arg-type]
    terminalreporter.write_line(f"{'total':{width}}  {'':14} {total:8.1f}")

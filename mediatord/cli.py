"""Command line of the mediator daemon: ``mediatord [--env-file F]`` runs it, ``mediatord status`` asks it.

SIGINT and SIGTERM stop the daemon cleanly: the nursery is cancelled, open requests end, the database closes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from fincryptfs import allocator, logs, run_daemon
from fincryptfs.asgi import dumps
from fincryptfs.core.errors import FincryptError
from fincryptfs.core.settings import MediatorSettings
from fincryptfs.run_daemon import run_until_signalled
from mediatord import __version__

if TYPE_CHECKING:
    from .db import MediatorDB


def load_settings(env_file: Path | None) -> MediatorSettings:
    return run_daemon.load_settings(MediatorSettings, env_file)


async def run(settings: MediatorSettings) -> None:
    from .daemon import serve
    await run_until_signalled(serve, settings, "mediatord")


def status(settings: MediatorSettings, as_json: bool) -> int:
    host, port = settings.listen
    base = settings.public_url or f"http://{f'[{host}]' if ':' in host else host}:{port}"  # [::1] for IPv6
    try:
        response = httpx.get(f"{base}/v1/status", timeout=10, trust_env=False)
        response.raise_for_status()
        data = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        print(f"mediatord status: cannot reach the mediator at {base}: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(dumps(data))
    else:
        for name, value in data.items():
            print(f"{name:22} {value}")
    return 0


def _open_db(settings: MediatorSettings) -> MediatorDB:
    from .daemon import DATABASE_FILE
    from .db import MediatorDB

    path = settings.data_dir / DATABASE_FILE
    if not path.exists():
        raise FincryptError(f"no mediator database at {path}: is MEDIATORD_DATA_DIR right?")
    return MediatorDB(path)


def ledger_command(settings: MediatorSettings, as_json: bool, account: str | None, limit: int) -> int:
    """Totals of the invariant, balances and history, read from the database (works with the daemon running)."""
    from .service import ledger_report, posting_json

    db = _open_db(settings)
    try:
        report = ledger_report(db, history=limit)
        if account is not None:
            report["recent"] = [posting_json(seq, p) for seq, p in db.postings(account, limit)]
    finally:
        db.close()
    if as_json:
        print(dumps(report))
        return 0
    for name in ("deposits", "client_balances", "node_balances", "fees", "payouts", "refunds"):
        print(f"{name:16} {report[name]:>20} msat")
    print(f"{'invariant':16} {'holds' if report['invariant_holds'] else 'BROKEN'}")
    for row in report["recent"]:
        print(f"{row['seq']:>8} {row['kind']:16} {row['amount_msat']:>16} {row['source'][:22]:22} → "
              f"{row['dest'][:22]:22} {row['memo']}")
    return 0


def payouts_command(settings: MediatorSettings, as_json: bool, limit: int) -> int:
    from . import billing

    db = _open_db(settings)
    try:
        batches: list[dict[str, Any]] = []
        for batch_id, state, created, fee, txid, sent_at, detail in db.payout_batches(limit):
            outputs = [{"node_id": n, "address": a, "debited_msat": d, "value_sat": v}
                       for n, a, d, v in db.payout_outputs(batch_id)]
            batches.append({"batch_id": batch_id, "state": state, "created_at": int(created), "fee_sat": fee,
                            "txid": txid, "sent_at": None if sent_at is None else int(sent_at), "detail": detail,
                            "outputs": outputs})
        owed: list[dict[str, Any]] = [
            {"node_id": a.split(":", 1)[1], **billing.node_earnings(db, settings, a.split(":", 1)[1])}
            for a, b in db.all_balances("node:") if b > 0]
    finally:
        db.close()
    report = {"threshold_sat": settings.payout_threshold_sat, "batches": batches, "nodes_owed": owed}
    if as_json:
        print(dumps(report))
        return 0
    for b in batches:
        print(f"batch {b['batch_id']:>5} {b['state']:9} fee {b['fee_sat']} sat, {len(b['outputs'])} outputs, "
              f"txid {b['txid'] or '-'} {b['detail']}")
    for node in owed:
        print(f"node {node['node_id'][:16]}… owed {node['pending_msat']} msat, paid {node['paid_msat']} msat")
    return 0


def fund_test_account(settings: MediatorSettings, account_id: str, amount_sat: int, confirmations: int | None
                      ) -> int:
    """bitcoinlib_test only: pay ``amount_sat`` to the account's deposit address (the devnet's funded client)."""
    from fincryptfs.core.ids import parse_node_id

    from .escrow import TEST_NETWORK
    from .payments import Payments
    from .policies import pricing_scheme

    if settings.bitcoin_network != TEST_NETWORK:
        print(f"mediatord fund-test-account: refused on {settings.bitcoin_network}: only {TEST_NETWORK} has "
              "coins from nowhere", file=sys.stderr)
        return 2
    if not 0 < amount_sat <= 21 * 10**14:
        print("mediatord fund-test-account: AMOUNT must be a positive number of sat", file=sys.stderr)
        return 2
    if confirmations is not None and not 0 <= confirmations <= 1_000_000:
        print("mediatord fund-test-account: --confirmations must be between 0 and 1000000", file=sys.stderr)
        return 2
    account_id = parse_node_id(account_id)
    from .daemon import DATABASE_FILE, prepare_data_dir
    from .db import MediatorDB

    prepare_data_dir(settings)  # it may make the wallet: not in a folder others can read

    db = MediatorDB(settings.data_dir / DATABASE_FILE)
    payments = Payments(settings, db, pricing_scheme(settings.pricing))
    try:
        address = payments.deposit_address_sync(account_id)
        conf = settings.deposit_confirmations if confirmations is None else confirmations
        txid = payments.wallet_sync(lambda e: e.fund_test_address(address, amount_sat, conf))
    finally:
        payments.close()
        db.close()
    print(dumps({"account_id": account_id, "deposit_address": address, "amount_sat": amount_sat,
                 "confirmations": conf, "txid": txid}))
    return 0


def test_addresses(settings: MediatorSettings, count: int) -> int:
    """bitcoinlib_test only: print fresh addresses this wallet does not own (payout addresses for a devnet's
    nodes), one per line."""
    from .escrow import TEST_NETWORK, random_test_address

    if settings.bitcoin_network != TEST_NETWORK:
        print(f"mediatord test-addresses: refused on {settings.bitcoin_network}: only for {TEST_NETWORK}",
              file=sys.stderr)
        return 2
    if not 0 < count <= 1000:
        print("mediatord test-addresses: COUNT must be between 1 and 1000", file=sys.stderr)
        return 2
    from .daemon import prepare_data_dir

    prepare_data_dir(settings)
    for _ in range(count):
        print(random_test_address(settings.data_dir))
    return 0


def _count(text: str) -> int:
    """A --limit: 1..100000 rows (SQLite reads LIMIT -1 as no limit: --limit -1 printed the whole ledger)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of rows from 1 to 100000")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mediatord",
        description="Fincrypt mediator: match clients with storage nodes, audit nodes, settle payments.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--env-file", type=Path, help="settings file (default: ./.env if present)")
    sub = parser.add_subparsers(dest="command")
    status_parser = sub.add_parser("status", help="show the running mediator's counters")
    status_parser.add_argument("--json", action="store_true", help="print JSON")
    ledger_parser = sub.add_parser("ledger", help="ledger totals (the invariant), balances and recent postings")
    ledger_parser.add_argument("--json", action="store_true", help="print JSON")
    ledger_parser.add_argument("--account", help="history of one ledger account, e.g. client:ID or node:ID")
    ledger_parser.add_argument("--limit", type=_count, default=20, help="postings to show (default 20)")
    payouts_parser = sub.add_parser("payouts", help="payout batches and nodes owed money")
    payouts_parser.add_argument("--json", action="store_true", help="print JSON")
    payouts_parser.add_argument("--limit", type=_count, default=20, help="batches to show (default 20)")
    fund_parser = sub.add_parser("fund-test-account", help="bitcoinlib_test only: fund a client account")
    fund_parser.add_argument("account_id")
    fund_parser.add_argument("amount_sat", type=int)
    fund_parser.add_argument("--confirmations", type=int, help="default: MEDIATORD_DEPOSIT_CONFIRMATIONS")
    addresses_parser = sub.add_parser("test-addresses",
                                      help="bitcoinlib_test only: print fresh payout addresses for test nodes")
    addresses_parser.add_argument("count", type=int)
    for extra in (status_parser, ledger_parser, payouts_parser, fund_parser, addresses_parser):
        extra.add_argument("--env-file", type=Path, default=argparse.SUPPRESS,
                           help="settings file (default: ./.env if present)")
    args = parser.parse_args(argv)
    logs.configure(logging.INFO)
    allocator.keep_freed_memory()
    try:
        settings = load_settings(args.env_file)
    except FincryptError as exc:
        print(f"mediatord: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "status":
            return status(settings, args.json)
        if args.command == "ledger":
            return ledger_command(settings, args.json, args.account, args.limit)
        if args.command == "payouts":
            return payouts_command(settings, args.json, args.limit)
        if args.command == "fund-test-account":
            return fund_test_account(settings, args.account_id, args.amount_sat, args.confirmations)
        if args.command == "test-addresses":
            return test_addresses(settings, args.count)
    except FincryptError as exc:
        print(f"mediatord {args.command}: {exc}", file=sys.stderr)
        return 1
    return run_daemon.exit_status("mediatord", lambda: trio.run(run, settings))  # a policy or a folder found wrong


if __name__ == "__main__":
    raise SystemExit(main())

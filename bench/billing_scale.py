"""One billing period at scale: charge 100,000 objects (1,000 accounts) and credit 1,000 nodes' passed rounds.

Builds the real mediator schema in a temporary SQLite file, funds every account with a deposit posting, records
one passed audit round per node, then times (CPU seconds) ``bill_due_periods`` and ``credit_passes``, the two
steps of an hourly payments pass that grow with the network. The ledger invariant is checked after every batch.
The last line is JSON.

Usage: python bench/billing_scale.py    (BILLING_BENCH_SCALE=0.01 for a quick run)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fincryptfs.core.layout import ObjectLayout  # noqa: E402
from fincryptfs.core.settings import MediatorSettings  # noqa: E402
from mediatord import billing  # noqa: E402
from mediatord.db import MediatorDB  # noqa: E402
from mediatord.ledger import WORLD_DEPOSITS, Posting, client_account  # noqa: E402
from mediatord.policies import pricing_scheme  # noqa: E402

HOUR = 3600.0


def main() -> None:
    scale = float(os.environ.get("BILLING_BENCH_SCALE", "1"))
    objects, nodes, accounts = int(100_000 * scale), max(10, int(1000 * scale)), max(10, int(1000 * scale))
    with tempfile.TemporaryDirectory() as tmp:
        settings = MediatorSettings.from_env({"MEDIATORD_DATA_DIR": tmp, "MEDIATORD_PRICING": "fixed:1000"},
                                             home=Path(tmp))
        db = MediatorDB(Path(tmp) / "mediator.sqlite3")
        base = 1_800_000_000 // 3600 * 3600.0
        with db.transaction() as conn:
            for i in range(nodes):
                db.upsert_node(node_id=f"{i:064x}", public_key=b"k" * 32, url=f"http://10.0.{i // 250}.{i % 250}:1",
                               price=900, capacity=1 << 40, free=1 << 39, operator="", payout_address=None, now=base)
            layouts = [ObjectLayout(size, 1 << 20, 3, 6) for size in (1 << 20, 5 << 20, 64 << 20)]
            from fincryptfs.core.messages import layout_to_json
            conn.executemany("INSERT INTO objects (object_id, account_id, layout, state, created_at, stored_bytes)"
                             " VALUES (?,?,?,?,?,?)", [
                (f"{i:064x}", f"{i % accounts:064x}", json.dumps(layout_to_json(layouts[i % 3])), "healthy", base,
                 layouts[i % 3].share_size * layouts[i % 3].n) for i in range(objects)])
            db.post([Posting(f"deposit:bench:{a}", "deposit", WORLD_DEPOSITS, client_account(f"{a:064x}"),
                             10**12, base) for a in range(accounts)])
            conn.executemany("INSERT INTO audit_passes (round_id, node_id, shares_proven, bytes_proven, passed_at)"
                             " VALUES (?,?,?,?,?)",
                             [(1, f"{i:064x}", 600, 600 * (8 << 20), base + HOUR - 60) for i in range(nodes)])
        pricing = pricing_scheme(settings.pricing)
        cpu = time.process_time()
        period = billing.bill_due_periods(db, pricing, settings.billing_period, base + 2 * HOUR)
        charge_cpu = time.process_time() - cpu
        cpu = time.process_time()
        credits = billing.credit_passes(db, pricing, settings, base + 2 * HOUR)
        credit_cpu = time.process_time() - cpu
        totals = db.ledger_totals(check=True)
        db.close()
    assert period is not None and credits.credited == nodes
    result = {"objects": objects, "accounts": accounts, "nodes": nodes, "charge_cpu_s": round(charge_cpu, 3),
              "credit_cpu_s": round(credit_cpu, 3), "total_cpu_s": round(charge_cpu + credit_cpu, 3),
              "charged_msat": period.charged, "credited_msat": credits.amount, "invariant_holds": totals.holds}
    print(f"charged {objects} objects of {accounts} accounts in {charge_cpu:.2f} CPU-s; credited {nodes} nodes in "
          f"{credit_cpu:.2f} CPU-s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

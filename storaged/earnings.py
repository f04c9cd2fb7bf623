"""What each mediator says this node has earned: the ``earnings`` object of the announce answer.

The mediator is the only one who knows (its ledger, docs/payments.md); the node keeps the latest answer per
mediator so that ``storaged status`` and ``/metrics`` can show it without asking. Amounts are msat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fincryptfs.core.errors import RemoteProtocolError

MAX_MSAT = 21 * 10**17  # 21 million BTC


@dataclass(frozen=True)
class Earnings:
    mediator_id: str
    url: str
    earned_msat: int  # credited for passed audits, ever
    pending_msat: int  # owed, not paid yet
    paid_msat: int  # sent on chain
    payout_threshold_msat: int
    updated_at: int

    @classmethod
    def from_answer(cls, mediator_id: str, url: str, obj: object, now: int) -> Earnings:
        """Parse a mediator's ``earnings`` object; RemoteProtocolError if it is not one."""
        if not isinstance(obj, dict):
            raise RemoteProtocolError(f"mediator {url} sent earnings that are not an object")
        values: dict[str, int] = {}
        for name in ("earned_msat", "pending_msat", "paid_msat", "payout_threshold_msat"):
            value = obj.get(name)
            if type(value) is not int or not 0 <= value <= MAX_MSAT:
                raise RemoteProtocolError(f"mediator {url} sent earnings with a bad {name}: {value!r:.40}")
            values[name] = value
        return cls(mediator_id, url, updated_at=now, **values)

    def to_json(self) -> dict[str, Any]:
        return {"mediator_id": self.mediator_id, "url": self.url, "earned_msat": self.earned_msat,
                "pending_msat": self.pending_msat, "paid_msat": self.paid_msat,
                "payout_threshold_msat": self.payout_threshold_msat, "updated_at": self.updated_at}


def render_metrics(earnings: list[Earnings]) -> list[str]:
    """Prometheus gauges, one sample per mediator."""
    lines = []
    for name, field in (("earned", "earned_msat"), ("pending", "pending_msat"), ("paid", "paid_msat")):
        lines.append(f"# TYPE storaged_{name}_msat gauge")
        lines += [f'storaged_{name}_msat{{mediator="{e.mediator_id}"}} {getattr(e, field)}' for e in earnings]
    return lines

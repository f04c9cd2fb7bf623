"""Pluggable policies, each a small class behind one interface, chosen by name in ``.env``.

* Pricing (``MEDIATORD_PRICING``): ``fixed:PRICE``, ``lowest_ask``, ``floating``; see :mod:`.pricing`.
* Acceptance (``MEDIATORD_ACCEPT_CLIENTS``, ``MEDIATORD_ACCEPT_NODES``): ``open``, ``allow:ID,ID``,
  ``deny:ID,ID``, ``min_reputation:0.3``, ``capacity_cap:BYTES``; see :mod:`.acceptance`.
"""

from .acceptance import AcceptanceRule, acceptance_rule
from .pricing import MarketView, PricingScheme, pricing_scheme

__all__ = ["AcceptanceRule", "MarketView", "PricingScheme", "acceptance_rule", "pricing_scheme"]

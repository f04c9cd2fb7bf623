"""Pricing schemes: what a node is paid and what a client is charged, in msat per GiB-hour.

One interface: ``node_price(ask, market)`` is the price the mediator pays a node whose announced ask is
``ask`` (None = "float": the node takes the mediator's bid), and ``client_price(market)`` the price it quotes
clients (``/v1/info``). Placement sorts candidates by ``node_price``: cheapest first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fincryptfs.core.errors import ConfigError

DEFAULT_PRICE = 1000  # msat per GiB-hour when no node states an ask
MAX_PRICE = 10**15  # the highest ask an announcement may carry (messages.NodeAnnouncement)


@dataclass(frozen=True)
class MarketView:
    """What the schemes may look at: the online nodes' asks and the network's fill level."""

    asks: tuple[int, ...]
    capacity_bytes: int
    free_bytes: int

    @property
    def utilization(self) -> float:
        return 0.0 if self.capacity_bytes <= 0 else 1.0 - self.free_bytes / self.capacity_bytes

    @property
    def median_ask(self) -> int:
        if not self.asks:
            return DEFAULT_PRICE
        ordered = sorted(self.asks)
        return ordered[len(ordered) // 2]


class PricingScheme(Protocol):
    @property
    def name(self) -> str: ...

    def node_price(self, ask: int | None, market: MarketView) -> int: ...

    def client_price(self, market: MarketView) -> int: ...


@dataclass(frozen=True)
class FixedPrice:
    """The mediator sets one price for everybody; a node asking more is used only when nothing cheaper is left."""

    price: int
    name: str = "fixed"

    def node_price(self, ask: int | None, market: MarketView) -> int:
        return self.price if ask is None or ask <= self.price else ask

    def client_price(self, market: MarketView) -> int:
        return self.price


@dataclass(frozen=True)
class LowestAsk:
    """Nodes are paid their own ask (floating nodes the median ask); clients pay the median ask."""

    name: str = "lowest_ask"

    def node_price(self, ask: int | None, market: MarketView) -> int:
        return market.median_ask if ask is None else ask

    def client_price(self, market: MarketView) -> int:
        return market.median_ask


@dataclass(frozen=True)
class FloatingPrice:
    """Supply and demand: the bid rises with the network's fill level (x1 empty, x3 full)."""

    name: str = "floating"

    def bid(self, market: MarketView) -> int:
        return int(market.median_ask * (1.0 + 2.0 * market.utilization))

    def node_price(self, ask: int | None, market: MarketView) -> int:
        return self.bid(market) if ask is None else ask

    def client_price(self, market: MarketView) -> int:
        return self.bid(market)


def pricing_scheme(spec: str) -> PricingScheme:
    """The scheme named by ``MEDIATORD_PRICING`` (``fixed:1000``, ``lowest_ask``, ``floating``)."""
    name, _, arg = spec.partition(":")
    if name == "fixed":
        if not arg.isdigit() or len(arg) > 16 or int(arg) > MAX_PRICE:  # more cannot be sent: /v1/info failed (500)
            raise ConfigError(f"MEDIATORD_PRICING={spec!r}: fixed pricing needs a price in 0..{MAX_PRICE} msat per "
                              "GiB-hour, e.g. fixed:1000")
        return FixedPrice(int(arg))
    if arg:
        raise ConfigError(f"MEDIATORD_PRICING={spec!r}: {name} takes no argument")
    if name == "lowest_ask":
        return LowestAsk()
    if name == "floating":
        return FloatingPrice()
    raise ConfigError(f"MEDIATORD_PRICING={spec!r} is unknown: use fixed:PRICE, lowest_ask or floating")

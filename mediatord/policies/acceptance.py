"""Acceptance rules for clients and storage nodes: who may use this mediator.

One interface: ``admit(subject_id, capacity_bytes)`` raises ForbiddenError (403) with a reason, and
``min_reputation`` is the lowest reputation a node may have to receive new shares (placement reads it).
For clients ``capacity_bytes`` is the bytes the account would store; for nodes, the capacity announced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fincryptfs.core.errors import ConfigError, ForbiddenError, RemoteProtocolError
from fincryptfs.core.ids import parse_node_id

DEFAULT_MIN_REPUTATION = 0.2


class AcceptanceRule(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def min_reputation(self) -> float: ...

    def admit(self, subject_id: str, capacity_bytes: int) -> None: ...


@dataclass(frozen=True)
class Open:
    name: str = "open"
    min_reputation: float = DEFAULT_MIN_REPUTATION

    def admit(self, subject_id: str, capacity_bytes: int) -> None:
        return None


@dataclass(frozen=True)
class AllowList:
    ids: frozenset[str]
    name: str = "allow"
    min_reputation: float = DEFAULT_MIN_REPUTATION

    def admit(self, subject_id: str, capacity_bytes: int) -> None:
        if subject_id not in self.ids:
            raise ForbiddenError(f"{subject_id[:16]}… is not on this mediator's allow list")


@dataclass(frozen=True)
class DenyList:
    ids: frozenset[str]
    name: str = "deny"
    min_reputation: float = DEFAULT_MIN_REPUTATION

    def admit(self, subject_id: str, capacity_bytes: int) -> None:
        if subject_id in self.ids:
            raise ForbiddenError(f"{subject_id[:16]}… is refused by this mediator (deny list)")


@dataclass(frozen=True)
class MinReputation:
    """Open to all, but nodes below this reputation get no new shares."""

    min_reputation: float
    name: str = "min_reputation"

    def admit(self, subject_id: str, capacity_bytes: int) -> None:
        return None


@dataclass(frozen=True)
class CapacityCap:
    """Refuses subjects above a size: nodes announcing more capacity, clients storing more bytes."""

    cap_bytes: int
    name: str = "capacity_cap"
    min_reputation: float = DEFAULT_MIN_REPUTATION

    def admit(self, subject_id: str, capacity_bytes: int) -> None:
        if capacity_bytes > self.cap_bytes:
            raise ForbiddenError(f"{capacity_bytes} bytes exceed this mediator's cap of {self.cap_bytes} bytes")


def _id_set(spec: str, arg: str, variable: str) -> frozenset[str]:
    """The ids of an allow or deny list. An empty allow list would refuse everybody (a value left out by a
    template, say), so a list names at least one id."""
    try:
        ids = frozenset(parse_node_id(item) for item in arg.split(",") if item)
    except RemoteProtocolError as exc:
        raise ConfigError(f"{variable}={spec!r}: the list must hold 64-hex ids separated by commas, e.g. "
                          f"{spec.partition(':')[0]}:{'0' * 64}") from exc
    if not ids:
        raise ConfigError(f"{variable}={spec!r} names no id: list the 64-hex ids separated by commas, or use open")
    return ids


def acceptance_rule(spec: str, variable: str = "MEDIATORD_ACCEPT_*") -> AcceptanceRule:
    """The rule named by an acceptance setting, e.g. ``open``, ``allow:ID,ID``, ``min_reputation:0.5``."""
    name, _, arg = spec.partition(":")
    if name == "open" and not arg:
        return Open()
    if name == "allow":
        return AllowList(_id_set(spec, arg, variable))
    if name == "deny":
        return DenyList(_id_set(spec, arg, variable))
    if name == "min_reputation":
        try:
            value = float(arg)
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{variable}={spec!r}: min_reputation needs a number in 0..1")
        return MinReputation(value)
    if name == "capacity_cap":
        if not arg.isdigit() or len(arg) > 30:  # int() refuses thousands of digits with a ValueError
            raise ConfigError(f"{variable}={spec!r}: capacity_cap needs a number of bytes, e.g. "
                              "capacity_cap:1099511627776")
        return CapacityCap(int(arg))
    raise ConfigError(f"{variable}={spec!r} is unknown: use open, allow:IDS, deny:IDS, min_reputation:X "
                      "or capacity_cap:BYTES")

"""A DHT contact (node id + UDP address) and XOR distance over 256-bit ids."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..core.errors import RemoteProtocolError

ID_BYTES = 32
ID_BITS = 8 * ID_BYTES


def distance(a: bytes, b: bytes) -> int:
    """Kademlia's metric: the XOR of two ids read as a big-endian integer."""
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def parse_host(value: object) -> str:
    """A canonical dotted IPv4 address (the DHT speaks IPv4 only, like BEP 5)."""
    if not isinstance(value, str) or len(value) > 15:
        raise RemoteProtocolError("contact host must be a dotted IPv4 address")
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError as exc:
        raise RemoteProtocolError("contact host must be a dotted IPv4 address") from exc
    if str(address) != value:
        raise RemoteProtocolError("contact host is not in canonical form")
    return value


@dataclass(frozen=True)
class Contact:
    """Where a node with id ``id`` (32 bytes: SHA-256 of its identity key, see core.identity) listens."""

    id: bytes
    host: str
    port: int

    def __post_init__(self) -> None:
        if len(self.id) != ID_BYTES:
            raise RemoteProtocolError(f"node id must be {ID_BYTES} bytes")
        if not 1 <= self.port <= 65535:
            raise RemoteProtocolError("contact port must be in 1..65535")

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def to_json(self) -> list[object]:
        return [self.id.hex(), self.host, self.port]

    @classmethod
    def from_json(cls, value: object) -> Contact:
        if not isinstance(value, list) or len(value) != 3:
            raise RemoteProtocolError("a contact is [id hex, host, port]")
        node_id, host, port = value
        if not isinstance(node_id, str) or len(node_id) != 2 * ID_BYTES or node_id != node_id.lower():
            raise RemoteProtocolError("contact id must be 64 lowercase hex characters")
        try:
            raw = bytes.fromhex(node_id)
        except ValueError as exc:
            raise RemoteProtocolError("contact id must be 64 lowercase hex characters") from exc
        if not isinstance(port, int) or isinstance(port, bool):
            raise RemoteProtocolError("contact port must be an integer")
        return cls(raw, parse_host(host), port)

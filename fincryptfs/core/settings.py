"""Settings: one frozen object per role, parsed once from a ``.env`` file at the edge.

Variables in the process environment override the file (so tests and ``devnet`` can set a few). A variable
with a role's prefix that this module does not know is an error, not silently ignored: a typo such as
``STORAGED_RESERV_BYTES`` would otherwise leave a node without the reserve its operator asked for.
Every error names the variable and says what a valid value looks like.
"""

from __future__ import annotations

import io
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

from dotenv import dotenv_values

from .address import checksum_ok
from .erasure import ErasureParams
from .errors import ConfigError, ErasureError, RemoteProtocolError
from .layout import DEFAULT_SEGMENT_SIZE, MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE
from .messages import check_url

T = TypeVar("T")
_URL_RE = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~/\-]*)?")


def read_env_file(path: Path | None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables of ``path`` (if given and present) overlaid with ``environ`` (default: os.environ)."""
    values: dict[str, str] = {}
    if path is not None:
        if not path.exists():
            raise ConfigError(f"settings file {path} does not exist")
        try:  # read here: dotenv_values would take a folder for an empty file
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read the settings file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError:
            raise ConfigError(f"the settings file {path} is not text: it should hold NAME=VALUE lines") from None
        values.update({k: v for k, v in dotenv_values(stream=io.StringIO(text)).items() if v is not None})
    env = os.environ if environ is None else environ
    values.update({k: v for k, v in env.items() if k.startswith(("FINCRYPT_", "STORAGED_", "MEDIATORD_"))})
    return values


# The strict readers below are named after the types they return (f.int, f.str, ...), which shadows the
# builtins inside their class; these aliases let the signatures name the builtin types.
_Str: TypeAlias = str
_Int: TypeAlias = int
_Bool: TypeAlias = bool
_Bytes: TypeAlias = bytes


class _Reader:
    """Reads one role's variables, remembering which were consumed so leftovers can be reported."""

    def __init__(self, env: Mapping[_Str, _Str], prefix: _Str) -> None:
        self.env = {k: v.strip() for k, v in env.items() if k.startswith(prefix)}
        self.prefix = prefix
        self.used: set[str] = set()

    def raw(self, name: _Str) -> _Str | None:
        key = self.prefix + name
        self.used.add(key)
        value = self.env.get(key)
        return value if value else None

    def get(self, name: _Str, default: T, parse: Callable[[_Str], T], what: _Str) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return parse(value)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"{self.prefix}{name}={value!r} is invalid: expected {what}") from exc

    def int(self, name: _Str, default: _Int, lo: _Int = 0, hi: _Int = 2**62) -> _Int:
        def parse(text: _Str) -> _Int:
            number = int(text.replace("_", ""))
            if not lo <= number <= hi:
                raise ValueError(text)
            return number
        return self.get(name, default, parse, f"an integer in {lo}..{hi}")

    def seconds(self, name: _Str, default: float, lo: float = 0.001) -> float:
        def parse(text: _Str) -> float:
            number = float(text)
            if not lo <= number < 10**9:
                raise ValueError(text)
            return number
        return self.get(name, default, parse, f"a number of seconds >= {lo}")

    def path(self, name: _Str, default: Path) -> Path:
        return self.get(name, default, lambda t: Path(t).expanduser(), "a path")

    def url(self, name: _Str, default: _Str | None) -> _Str | None:
        return self.get(name, default, _parse_url, f"an http:// or https:// URL ({_URL_WHAT})")

    def urls(self, name: _Str) -> tuple[_Str, ...]:
        return self.get(name, (), lambda t: tuple(_parse_url(u) for u in t.split(",") if u.strip()),
                        f"an http:// or https:// URL, or several separated by commas ({_URL_WHAT})")

    def choice(self, name: _Str, default: _Str, options: tuple[_Str, ...]) -> _Str:
        def parse(text: _Str) -> _Str:
            if text not in options:
                raise ValueError(text)
            return text
        return self.get(name, default, parse, "one of " + ", ".join(options))

    def text(self, name: _Str, default: _Str, pattern: _Str = r"[A-Za-z0-9._@:-]*", what: _Str | None = None
             ) -> _Str:
        def parse(text: _Str) -> _Str:
            if re.fullmatch(pattern, text) is None:
                raise ValueError(text)
            return text
        return self.get(name, default, parse, what or f"text matching {pattern}")

    def listen(self, name: _Str, default: tuple[_Str, _Int]) -> tuple[_Str, _Int]:
        def parse(text: _Str) -> tuple[_Str, _Int]:
            host, _, port = text.rpartition(":")
            if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ValueError(text)
            return host.strip("[]"), int(port)
        return self.get(name, default, parse, "HOST:PORT (port 0 picks a free one)")

    def finish(self) -> None:
        unknown = sorted(set(self.env) - self.used)
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]} (known {self.prefix}* settings are documented in "
                              ".env.example)")


_URL_WHAT = ("a host name, an IPv4 address or an [IPv6] address, an optional port in 1..65535 and a plain path, "
             "e.g. https://node.example.org:8701")


def _parse_url(text: str) -> str:
    """The URL if every peer would take it: the check of announcements and every other message (a node whose
    STORAGED_PUBLIC_URL has port 99999 would otherwise see every announcement refused, for ever)."""
    text = text.strip()
    if _URL_RE.fullmatch(text) is None:
        raise ValueError(text)
    try:
        check_url(text, "URL")
    except RemoteProtocolError as exc:
        raise ValueError(text) from exc
    return text.rstrip("/")


def _bytes_size(text: str) -> int:
    """Bytes with an optional binary suffix: 500G, 10GiB, 1048576."""
    match = re.fullmatch(r"(\d+)\s*([KMGTP]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if match is None:
        raise ValueError(text)
    return int(match.group(1)) * 1024 ** " KMGTP".index(match.group(2).upper() or " ")


def _check_happy(k: int, n: int, happy: int) -> None:
    if not k <= happy <= n:
        raise ConfigError(f"FINCRYPT_HAPPY={happy} must lie between FINCRYPT_K={k} and FINCRYPT_N={n}")


def _summary(settings: Any) -> dict[str, str]:
    return {f.name: str(getattr(settings, f.name)) for f in fields(settings)}


# --- discovery (DHT) ----------------------------------------------------------------------------------------

_DHT_LISTEN_WHAT = "IPV4:PORT of the DHT's UDP socket, e.g. 0.0.0.0:8711 (port 0 picks a free one)"
_DHT_PEERS_WHAT = "comma-separated HOST:PORT of DHT peers, e.g. 203.0.113.5:8711,dht.example.org:8711"


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(text)
    return host, int(port)


def _dht_listen(text: str) -> tuple[str, int]:
    """The DHT speaks IPv4 only (docs/dht.md), so the socket address must be a dotted IPv4 address."""
    host, port = _host_port(text)
    if str(ipaddress.IPv4Address(host)) != host:
        raise ValueError(text)
    return host, port


def _dht_peers(text: str) -> tuple[tuple[str, int], ...]:
    peers = tuple(_host_port(item) for item in text.split(",") if item.strip())
    if any(port == 0 or re.fullmatch(r"[A-Za-z0-9.\-]{1,253}", host) is None for host, port in peers):
        raise ValueError(text)
    return peers


def _dht_region(text: str) -> str:
    if re.fullmatch(r"[a-z0-9-]{1,32}", text) is None:
        raise ValueError(text)
    return text


# --- client -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSettings:
    mediator_url: str | None
    data_dir: Path
    key_file: Path
    cache_dir: Path
    cache_limit_bytes: int
    k: int
    n: int
    happy: int
    segment_size: int
    passphrase_file: Path | None = None
    upload_workers: int = 2
    publish_delay: float = 2.0
    dht_bootstrap: tuple[tuple[str, int], ...] = ()  # finds a mediator when mediator_url is unset (docs/dht.md)
    pack_threshold: int = 2**20  # files up to this size are uploaded packed together (docs/client.md)
    pack_size: int = 16 * 2**20
    pack_max_files: int = 1000
    prefetch_packs: int = 8  # packs read ahead when a folder is listed (docs/client.md); 0: none

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, home: Path) -> ClientSettings:
        r = _Reader(env, "FINCRYPT_")
        data_dir = r.path("DATA_DIR", home / ".local/share/fincrypt")
        k, n = r.int("K", 3, 1, 255), r.int("N", 6, 2, 256)
        try:
            ErasureParams(k, n)
        except ErasureError as exc:
            raise ConfigError(f"FINCRYPT_K={k}, FINCRYPT_N={n}: {exc}") from exc
        settings = cls(
            mediator_url=r.url("MEDIATOR_URL", None),
            data_dir=data_dir,
            key_file=r.path("KEY_FILE", data_dir / "master.key"),
            cache_dir=r.path("CACHE_DIR", data_dir / "cache"),
            cache_limit_bytes=r.get("CACHE_LIMIT_BYTES", 2**30, _bytes_size, "a size in bytes (e.g. 10G)"),
            k=k, n=n, happy=r.int("HAPPY", n - 1, 1, 256),
            segment_size=r.int("SEGMENT_SIZE", DEFAULT_SEGMENT_SIZE, MIN_SEGMENT_SIZE, MAX_SEGMENT_SIZE),
            passphrase_file=r.get("PASSPHRASE_FILE", None, lambda t: Path(t).expanduser(), "a path"),
            upload_workers=r.int("UPLOAD_WORKERS", 2, 1, 64),
            publish_delay=r.seconds("PUBLISH_DELAY", 2.0, 0.0),
            dht_bootstrap=r.get("DHT_BOOTSTRAP", (), _dht_peers, _DHT_PEERS_WHAT),
            pack_threshold=r.get("PACK_THRESHOLD", 2**20, _bytes_size, "a size in bytes (e.g. 1M; 0: no packing)"),
            pack_size=r.get("PACK_SIZE", 16 * 2**20, _bytes_size, "a size in bytes (e.g. 16M)"),
            pack_max_files=r.int("PACK_MAX_FILES", 1000, 1, 100_000),
            prefetch_packs=r.int("PREFETCH_PACKS", 8, 0, 1000),
        )
        _check_happy(settings.k, settings.n, settings.happy)
        r.finish()
        return settings


# --- storage node -------------------------------------------------------------------------------------------


MAX_CAPACITY_BYTES = 2**60  # 1024P: the most a node's announcement may offer (messages.NodeAnnouncement)


@dataclass(frozen=True)
class ShareDir:
    path: Path
    capacity_bytes: int


def _share_dirs(text: str) -> tuple[ShareDir, ...]:
    dirs = []
    for item in text.split(","):
        if not item.strip():
            continue
        path, sep, capacity = item.strip().rpartition(":")
        if not sep or not path:
            raise ValueError(item)
        dirs.append(ShareDir(Path(path).expanduser(), _bytes_size(capacity)))
    if not dirs or len({d.path for d in dirs}) != len(dirs):
        raise ValueError(text)
    if sum(d.capacity_bytes for d in dirs) > MAX_CAPACITY_BYTES:  # what an announcement may carry
        raise ValueError(text)
    return tuple(dirs)


def _price(text: str) -> int | None:
    if text == "float":
        return None
    value = int(text)
    if not 0 <= value <= 10**15:
        raise ValueError(text)
    return value


@dataclass(frozen=True)
class StorageSettings:
    listen: tuple[str, int]
    public_url: str | None
    data_dir: Path
    share_dirs: tuple[ShareDir, ...]
    reserve_bytes: int
    price: int | None
    mediators: tuple[str, ...]
    payout_address: str | None
    operator: str
    announce_interval: float
    scrub_interval: float
    max_concurrent_uploads: int
    scrub_rate: int = 32 << 20  # bytes per second a scrub may read, so it never competes with clients
    dht_listen: tuple[str, int] | None = None  # None: no DHT node (docs/dht.md)
    dht_bootstrap: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, home: Path) -> StorageSettings:
        r = _Reader(env, "STORAGED_")
        data_dir = r.path("DATA_DIR", home / ".local/share/fincrypt-storaged")
        settings = cls(
            listen=r.listen("LISTEN", ("127.0.0.1", 8701)),
            public_url=r.url("PUBLIC_URL", None),
            data_dir=data_dir,
            share_dirs=r.get("SHARE_DIRS", (ShareDir(data_dir / "shares", 100 * 2**30),), _share_dirs,
                             "comma-separated PATH:CAPACITY entries, e.g. /srv/a:500G,/srv/b:250G, of 1024P "
                             "at most in all"),
            reserve_bytes=r.get("RESERVE_BYTES", 2**30, _bytes_size, "a size in bytes (e.g. 1G)"),
            price=r.get("PRICE", None, _price, "an integer (millisatoshi per GiB-hour) or 'float'"),
            mediators=r.urls("MEDIATORS"),
            payout_address=r.get("PAYOUT_ADDRESS", None, _address,
                                 "a Bitcoin address of the mediators' network, copied whole from your wallet "
                                 "(its checksum does not match: a character is wrong, missing or extra)"),
            operator=r.text("OPERATOR", "", r"[A-Za-z0-9._@-]{0,64}"),  # as NodeAnnouncement accepts
            announce_interval=r.seconds("ANNOUNCE_INTERVAL", 300.0, 0.1),
            scrub_interval=r.seconds("SCRUB_INTERVAL", 86400.0, 0.1),
            max_concurrent_uploads=r.int("MAX_CONCURRENT_UPLOADS", 64, 1, 10_000),
            scrub_rate=r.get("SCRUB_RATE", 32 << 20, _positive_size, "a size in bytes per second (e.g. 32M)"),
            dht_listen=r.get("DHT_LISTEN", None, _dht_listen, _DHT_LISTEN_WHAT),
            dht_bootstrap=r.get("DHT_BOOTSTRAP", (), _dht_peers, _DHT_PEERS_WHAT),
        )
        r.finish()
        _check_reachable("STORAGED", settings.listen, settings.public_url, "the mediators and clients", 8701)
        _check_dht_used("STORAGED", "node", settings.dht_listen, {"DHT_BOOTSTRAP": settings.dht_bootstrap})
        return settings


def _check_reachable(prefix: str, listen: tuple[str, int], public_url: str | None, who: str, port: int) -> None:
    """A daemon listening on every address (0.0.0.0, [::]) needs its PUBLIC_URL: by default it would announce
    http://0.0.0.0:PORT, which reaches nobody on another machine."""
    if public_url is None and _unspecified(listen[0]):
        raise ConfigError(f"{prefix}_LISTEN={_host_text(listen)} listens on every address of this machine, which is "
                          f"no address {who} can reach it at: set {prefix}_PUBLIC_URL to the URL they use (e.g. "
                          f"http://203.0.113.5:{port})")


def _check_dht_used(prefix: str, who: str, dht_listen: object, needing_it: dict[str, object]) -> None:
    """DHT settings that only a DHT node uses, set without ``{prefix}_DHT_LISTEN``: the daemon would run no DHT
    node and stay out of the DHT without a word."""
    unused = [f"{prefix}_{name}" for name, value in needing_it.items() if value]
    if dht_listen is None and unused:
        raise ConfigError(f"{unused[0]} is set but {prefix}_DHT_LISTEN is not, so the {who} runs no DHT node and "
                          f"announces itself nowhere: set {prefix}_DHT_LISTEN (e.g. 0.0.0.0:8711), or leave "
                          f"{unused[0]} empty")


def _unspecified(host: str) -> bool:
    """Whether ``host`` is the any-address (0.0.0.0, ::): fine to bind, meaningless to announce."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _host_text(listen: tuple[str, int]) -> str:
    """HOST:PORT as written in a setting ([::]:8700 for an IPv6 host)."""
    host, port = listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _positive_size(text: str) -> int:
    value = _bytes_size(text)
    if value < 1:
        raise ValueError(text)
    return value


def _address(text: str) -> str:
    """A Bitcoin address whose checksum holds: a mistyped one was announced, credited and never paid (only the
    mediator's log said why)."""
    if re.fullmatch(r"[A-Za-z0-9]{14,90}", text) is None or not checksum_ok(text):
        raise ValueError(text)
    return text


# --- mediator -----------------------------------------------------------------------------------------------


# the policies' own parsers (mediatord.policies) judge the arguments when the mediator starts
_PRICING_WHAT = "fixed:PRICE (msat per GiB-hour, e.g. fixed:1000), lowest_ask or floating"
_ACCEPT_WHAT = ("open, allow:ID,ID, deny:ID,ID (64-hex ids, no spaces), min_reputation:X (e.g. min_reputation:0.3) "
                "or capacity_cap:BYTES (e.g. capacity_cap:1099511627776)")


@dataclass(frozen=True)
class MediatorSettings:
    listen: tuple[str, int]
    public_url: str | None
    data_dir: Path
    audit_period: float
    audit_leaves_per_share: int
    audit_retries: int
    disqualify_after: int
    node_offline_after: float
    min_expansion: float
    pricing: str
    accept_clients: str
    accept_nodes: str
    bitcoin_network: str
    # payments (docs/payments.md); amounts in sat or msat as named, durations in seconds
    billing_period: float = 3600.0
    fee_bps: int = 1000
    deposit_confirmations: int = 3
    deposit_scan_interval: float = 60.0
    payout_threshold_sat: int = 100_000
    payout_fee_rate: int = 10
    low_balance_warning: float = 7 * 86400.0
    grace_period: float = 7 * 86400.0
    low_balance_webhook: str | None = None
    # discovery (docs/dht.md): None disables the DHT node
    dht_listen: tuple[str, int] | None = None
    dht_bootstrap: tuple[tuple[str, int], ...] = ()
    dht_region: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, home: Path) -> MediatorSettings:
        r = _Reader(env, "MEDIATORD_")
        settings = cls(
            listen=r.listen("LISTEN", ("127.0.0.1", 8700)),
            public_url=r.url("PUBLIC_URL", None),
            data_dir=r.path("DATA_DIR", home / ".local/share/fincrypt-mediatord"),
            audit_period=r.seconds("AUDIT_PERIOD", 3600.0, 0.5),
            audit_leaves_per_share=r.int("AUDIT_LEAVES_PER_SHARE", 1, 1, 64),
            audit_retries=r.int("AUDIT_RETRIES", 3, 0, 10),
            disqualify_after=r.int("DISQUALIFY_AFTER", 3, 1, 1000),
            node_offline_after=r.seconds("NODE_OFFLINE_AFTER", 3 * 3600.0, 1.0),
            min_expansion=r.get("MIN_EXPANSION", 2.0, _min_expansion, "a number >= 2"),
            pricing=r.text("PRICING", "lowest_ask", r"[a-z_]+(:[0-9]+)?", _PRICING_WHAT),
            accept_clients=r.text("ACCEPT_CLIENTS", "open", r"[a-z_]+(:[A-Za-z0-9._,/-]*)?", _ACCEPT_WHAT),
            accept_nodes=r.text("ACCEPT_NODES", "open", r"[a-z_]+(:[A-Za-z0-9._,/-]*)?", _ACCEPT_WHAT),
            bitcoin_network=r.choice("BITCOIN_NETWORK", "bitcoinlib_test", ("bitcoinlib_test", "testnet",
                                                                             "bitcoin")),
            billing_period=r.seconds("BILLING_PERIOD", 3600.0, 0.5),
            fee_bps=r.int("FEE_BPS", 1000, 0, 5000),
            deposit_confirmations=r.int("DEPOSIT_CONFIRMATIONS", 3, 0, 100),
            deposit_scan_interval=r.seconds("DEPOSIT_SCAN_INTERVAL", 60.0, 0.1),
            payout_threshold_sat=r.int("PAYOUT_THRESHOLD", 100_000, 1_000, 21 * 10**14),
            payout_fee_rate=r.int("PAYOUT_FEE_RATE", 10, 1, 10_000),
            low_balance_warning=r.seconds("LOW_BALANCE_WARNING", 7 * 86400.0, 0.0),
            grace_period=r.seconds("GRACE_PERIOD", 7 * 86400.0, 0.0),
            low_balance_webhook=r.url("LOW_BALANCE_WEBHOOK", None),
            dht_listen=r.get("DHT_LISTEN", None, _dht_listen, _DHT_LISTEN_WHAT),
            dht_bootstrap=r.get("DHT_BOOTSTRAP", (), _dht_peers, _DHT_PEERS_WHAT),
            dht_region=r.get("DHT_REGION", None, _dht_region, "a region name of 1-32 characters [a-z0-9-]"),
        )
        r.finish()
        _check_reachable("MEDIATORD", settings.listen, settings.public_url, "the clients and nodes", 8700)
        _check_dht_used("MEDIATORD", "mediator", settings.dht_listen,
                        {"DHT_BOOTSTRAP": settings.dht_bootstrap, "DHT_REGION": settings.dht_region})
        return settings


def _min_expansion(text: str) -> float:
    value = float(text)
    if not 2.0 <= value <= 256:
        raise ValueError(text)
    return value

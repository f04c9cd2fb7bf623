"""fincryptfs.core.settings: defaults, strict values, unknown variables."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from fincryptfs.core import settings as settings_module
from fincryptfs.core.errors import ConfigError
from fincryptfs.core.settings import (
    ClientSettings,
    MediatorSettings,
    ShareDir,
    StorageSettings,
    read_env_file,
)

HOME = Path("/home/u")


def test_client_defaults() -> None:
    s = ClientSettings.from_env({}, home=HOME)
    data = HOME / ".local/share/fincrypt"
    assert (s.mediator_url, s.data_dir, s.key_file, s.cache_dir) == (None, data, data / "master.key",
                                                                     data / "cache")
    assert (s.cache_limit_bytes, s.k, s.n, s.happy, s.segment_size) == (2**30, 3, 6, 5, 2 * 2**20)


def test_client_values() -> None:
    s = ClientSettings.from_env({"FINCRYPT_MEDIATOR_URL": "http://m:8700/", "FINCRYPT_K": "4", "FINCRYPT_N": "10",
                                 "FINCRYPT_HAPPY": "8", "FINCRYPT_CACHE_LIMIT_BYTES": "10G",
                                 "FINCRYPT_SEGMENT_SIZE": "65_536", "FINCRYPT_DATA_DIR": "/d",
                                 "FINCRYPT_KEY_FILE": ""}, home=HOME)
    assert (s.mediator_url, s.k, s.n, s.happy, s.cache_limit_bytes, s.segment_size) == (
        "http://m:8700", 4, 10, 8, 10 * 2**30, 65536)
    assert s.key_file == Path("/d/master.key")  # empty means default


def test_storage_defaults() -> None:
    s = StorageSettings.from_env({}, home=HOME)
    data = HOME / ".local/share/fincrypt-storaged"
    assert s.listen == ("127.0.0.1", 8701)
    assert s.share_dirs == (ShareDir(data / "shares", 100 * 2**30),)
    assert (s.public_url, s.price, s.mediators, s.payout_address, s.operator) == (None, None, (), None, "")
    assert (s.reserve_bytes, s.announce_interval, s.scrub_interval, s.max_concurrent_uploads) == (
        2**30, 300.0, 86400.0, 64)


def test_storage_values() -> None:
    s = StorageSettings.from_env({"STORAGED_LISTEN": "[::1]:0", "STORAGED_SHARE_DIRS": "/a:500G, /b:1024",
                                  "STORAGED_PRICE": "1200", "STORAGED_MEDIATORS": "http://m:1,https://n/x/",
                                  "STORAGED_PAYOUT_ADDRESS": "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4"},
                               home=HOME)
    assert s.listen == ("::1", 0)
    assert s.share_dirs == (ShareDir(Path("/a"), 500 * 2**30), ShareDir(Path("/b"), 1024))
    assert s.price == 1200 and s.mediators == ("http://m:1", "https://n/x")
    assert StorageSettings.from_env({"STORAGED_PRICE": "float"}, home=HOME).price is None


def test_mediator_defaults() -> None:
    s = MediatorSettings.from_env({}, home=HOME)
    assert s.listen == ("127.0.0.1", 8700)
    assert (s.audit_period, s.audit_leaves_per_share, s.audit_retries, s.node_offline_after) == (3600.0, 1, 3,
                                                                                                  10800.0)
    assert (s.min_expansion, s.pricing, s.accept_clients, s.accept_nodes, s.bitcoin_network) == (
        2.0, "lowest_ask", "open", "open", "bitcoinlib_test")


INVALID = [
    (ClientSettings, "FINCRYPT_K", "three"), (ClientSettings, "FINCRYPT_K", "0"), (ClientSettings, "FINCRYPT_N", "257"),
    (ClientSettings, "FINCRYPT_N", "1"), (ClientSettings, "FINCRYPT_HAPPY", "x"),
    (ClientSettings, "FINCRYPT_SEGMENT_SIZE", "4095"), (ClientSettings, "FINCRYPT_SEGMENT_SIZE", str(2**26 + 1)),
    (ClientSettings, "FINCRYPT_CACHE_LIMIT_BYTES", "lots"), (ClientSettings, "FINCRYPT_CACHE_LIMIT_BYTES", "-1"),
    (ClientSettings, "FINCRYPT_MEDIATOR_URL", "ftp://x"), (ClientSettings, "FINCRYPT_MEDIATOR_URL", "m:8700"),
    (StorageSettings, "STORAGED_LISTEN", "8701"), (StorageSettings, "STORAGED_LISTEN", "h:70000"),
    (StorageSettings, "STORAGED_LISTEN", ":80"), (StorageSettings, "STORAGED_SHARE_DIRS", "/a"),
    (StorageSettings, "STORAGED_SHARE_DIRS", "/a:1G,/a:2G"), (StorageSettings, "STORAGED_SHARE_DIRS", "/a:big"),
    (StorageSettings, "STORAGED_RESERVE_BYTES", "1X"), (StorageSettings, "STORAGED_PRICE", "-5"),
    (StorageSettings, "STORAGED_PRICE", "cheap"), (StorageSettings, "STORAGED_MEDIATORS", "http://a,nope"),
    (StorageSettings, "STORAGED_PAYOUT_ADDRESS", "short"), (StorageSettings, "STORAGED_PAYOUT_ADDRESS", "bc1 q" * 4),
    (StorageSettings, "STORAGED_OPERATOR", "me and you"), (StorageSettings, "STORAGED_OPERATOR", "a:b"),
    (StorageSettings, "STORAGED_OPERATOR", "x" * 65),
    (StorageSettings, "STORAGED_ANNOUNCE_INTERVAL", "0"), (StorageSettings, "STORAGED_ANNOUNCE_INTERVAL", "nan"),
    (StorageSettings, "STORAGED_SCRUB_INTERVAL", "inf"), (StorageSettings, "STORAGED_MAX_CONCURRENT_UPLOADS", "0"),
    (MediatorSettings, "MEDIATORD_AUDIT_PERIOD", "0.1"), (MediatorSettings, "MEDIATORD_AUDIT_LEAVES_PER_SHARE", "65"),
    (MediatorSettings, "MEDIATORD_AUDIT_RETRIES", "11"), (MediatorSettings, "MEDIATORD_MIN_EXPANSION", "1.5"),
    (MediatorSettings, "MEDIATORD_MIN_EXPANSION", "two"), (MediatorSettings, "MEDIATORD_PRICING", "Lowest"),
    (MediatorSettings, "MEDIATORD_BITCOIN_NETWORK", "mainnet"), (MediatorSettings, "MEDIATORD_LISTEN", "x"),
    (MediatorSettings, "MEDIATORD_ACCEPT_CLIENTS", "list:a b"), (MediatorSettings, "MEDIATORD_PUBLIC_URL", "x"),
    (MediatorSettings, "MEDIATORD_NODE_OFFLINE_AFTER", "0.5"),
]


@pytest.mark.parametrize("cls,name,value", INVALID, ids=[f"{n}={v[:12]}" for _, n, v in INVALID])
def test_invalid_value_names_the_variable(cls: type, name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        cls.from_env({name: value}, home=HOME)  # type: ignore[attr-defined]


def test_erasure_and_happy_consistency() -> None:
    with pytest.raises(ConfigError, match="FINCRYPT_K=6, FINCRYPT_N=6"):
        ClientSettings.from_env({"FINCRYPT_K": "6"}, home=HOME)
    with pytest.raises(ConfigError, match="FINCRYPT_HAPPY=2 must lie between FINCRYPT_K=3 and FINCRYPT_N=6"):
        ClientSettings.from_env({"FINCRYPT_HAPPY": "2"}, home=HOME)
    with pytest.raises(ConfigError, match="FINCRYPT_HAPPY=7"):
        ClientSettings.from_env({"FINCRYPT_HAPPY": "7"}, home=HOME)


@pytest.mark.parametrize("cls,name", [(ClientSettings, "FINCRYPT_SEGMENT_SIZ"), (StorageSettings,
                                                                                 "STORAGED_RESERV_BYTES"),
                                      (MediatorSettings, "MEDIATORD_AUDIT_PERIODS")])
def test_unknown_prefixed_variable_is_an_error(cls: type, name: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown setting {name}"):
        cls.from_env({name: "1"}, home=HOME)  # type: ignore[attr-defined]


def test_other_roles_variables_are_ignored() -> None:
    env = {"STORAGED_LISTEN": "x", "MEDIATORD_PRICING": "BAD", "PATH": "/bin"}
    ClientSettings.from_env(env, home=HOME)


def test_read_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("FINCRYPT_K=2\nFINCRYPT_N=4\nOTHER=1\n# comment\nFINCRYPT_HAPPY=\n")
    values = read_env_file(env_file, {"FINCRYPT_N": "5", "HOME": "/x"})
    assert values == {"FINCRYPT_K": "2", "FINCRYPT_N": "5", "OTHER": "1", "FINCRYPT_HAPPY": ""}
    s = ClientSettings.from_env(values, home=HOME)
    assert (s.k, s.n, s.happy) == (2, 5, 4)
    assert read_env_file(None, {"STORAGED_X": "1", "PATH": "/"}) == {"STORAGED_X": "1"}
    with pytest.raises(ConfigError, match="does not exist"):
        read_env_file(tmp_path / "missing.env", {})


def test_a_settings_file_that_cannot_be_read_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot read the settings file {tmp_path}: Is a directory"):
        read_env_file(tmp_path, {})  # not taken for an empty file, which would leave every setting at its default
    binary = tmp_path / "binary.env"
    binary.write_bytes(b"\xff\xfeFINCRYPT_K=2\n")
    with pytest.raises(ConfigError, match="is not text"):
        read_env_file(binary, {})


Role = type[ClientSettings] | type[StorageSettings] | type[MediatorSettings]
ROLES: dict[str, Role] = {"FINCRYPT": ClientSettings, "STORAGED": StorageSettings, "MEDIATORD": MediatorSettings}
DEFAULT_SET_AT_RUN_TIME = {"MEDIATORD_PUBLIC_URL"}  # "http://$MEDIATORD_LISTEN": the daemon fills it in


def _env_example() -> dict[str, tuple[str, str]]:
    """Each variable of .env.example: (its value there, the comment above its group of variables)."""
    entries: dict[str, tuple[str, str]] = {}
    comment: list[str] = []
    group: list[str] = []
    for line in (Path(__file__).resolve().parents[2] / ".env.example").read_text().splitlines():
        if line.startswith("#"):
            if group:
                comment, group = [], []
            comment.append(line.lstrip("# "))
        elif "=" in line:
            name, _, value = line.partition("=")
            group.append(name)
            entries[name] = (value, " ".join(comment))
        else:
            comment, group = [], []
    return entries


def test_env_example_documents_every_setting_read_and_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every variable the programs read is in .env.example, which says its default; a value shown there and a
    default stated as a value are the code's default (after $NAME and ~ are replaced as the comments mean)."""
    read: set[str] = set()
    raw = settings_module._Reader.raw

    def recording_raw(self: Any, name: str) -> str | None:
        read.add(self.prefix + name)
        return raw(self, name)

    monkeypatch.setattr(settings_module._Reader, "raw", recording_raw)
    home = Path.home()  # "~" in a value is the real home folder
    defaults: dict[Role, object] = {cls: cls.from_env({}, home=home) for cls in ROLES.values()}
    example = _env_example()
    assert sorted(read - set(example)) == [], "read by the code but not in .env.example"
    assert sorted(set(example) - read) == [], "in .env.example but read by no program"

    stated: dict[str, str] = {}
    for name, (value, comment) in example.items():
        cls = ROLES[name.split("_")[0]]
        assert re.search(r"Defaults?: ", comment), f"{name}: the comment does not say its default"
        if value:
            assert cls.from_env({name: value}, home=home) == defaults[cls] or "Default: none" in comment, (
                f"{name}={value} in .env.example is not the default")
        found = re.search(r"Default: (\S+?)[.,;]?(?:\s|$)", comment)
        if found is not None and sum(1 for other in example.values() if other[1] == comment) == 1:
            stated[name] = found.group(1)
    for name, text in stated.items():
        cls = ROLES[name.split("_")[0]]
        value = re.sub(r"\$([A-Z_]+)", lambda m: stated[m.group(1)], text)
        if value in ("none", "empty") or name in DEFAULT_SET_AT_RUN_TIME:
            continue
        try:
            parsed = cls.from_env({name: value}, home=home)
        except ConfigError:
            continue  # words, not a value ("the bound listen address")
        assert parsed == defaults[cls], f"{name}: .env.example says the default is {text}"


NODE_VALUES_MEDIATORS_REFUSE = [
    ("STORAGED_PUBLIC_URL", "http://node.example.org:99999"), ("STORAGED_PUBLIC_URL", "http://node.example.org:0"),
    ("STORAGED_PUBLIC_URL", "http://node..example.org"), ("STORAGED_PUBLIC_URL", "http://-node-:8701"),
    ("STORAGED_PUBLIC_URL", "http://node:80:80"), ("STORAGED_PUBLIC_URL", "http://300.1.2.3:8701"),
    ("STORAGED_MEDIATORS", "http://m.example.org:8700,http://m.example.org:70000"),
]


@pytest.mark.parametrize("name,value", NODE_VALUES_MEDIATORS_REFUSE)
def test_a_node_url_every_mediator_would_refuse_is_refused_at_start(name: str, value: str) -> None:
    """Accepted at start, such a URL made every announcement fail (or every connection), for ever, while the node
    looked healthy; the check is the one announcements pass (messages.check_url)."""
    with pytest.raises(ConfigError, match=f"{name}=.* is invalid: expected an http:// or https:// URL"):
        StorageSettings.from_env({name: value}, home=HOME)


@pytest.mark.parametrize("dirs", ["/a:1025P", "/a:600P,/b:600P"])
def test_a_capacity_an_announcement_cannot_carry_is_refused_at_start(dirs: str) -> None:
    """Announcements carry at most 2^60 bytes of capacity (1 EiB): more, and every mediator refused every one."""
    with pytest.raises(ConfigError, match="STORAGED_SHARE_DIRS=.*1024P"):
        StorageSettings.from_env({"STORAGED_SHARE_DIRS": dirs}, home=HOME)
    assert StorageSettings.from_env({"STORAGED_SHARE_DIRS": "/a:512P,/b:512P"}, home=HOME).share_dirs


@pytest.mark.parametrize("listen", ["0.0.0.0:8701", "[::]:8701", "0.0.0.0:0"])
def test_listening_on_every_address_needs_a_public_url(listen: str) -> None:
    """Without STORAGED_PUBLIC_URL the node announces the bound address: http://0.0.0.0:8701 reaches no node
    from a mediator's machine, so the node would get no shares and fail every audit, without a word."""
    with pytest.raises(ConfigError, match="STORAGED_LISTEN=.* set STORAGED_PUBLIC_URL"):
        StorageSettings.from_env({"STORAGED_LISTEN": listen}, home=HOME)
    s = StorageSettings.from_env({"STORAGED_LISTEN": listen, "STORAGED_PUBLIC_URL": "https://n.example.org"},
                                 home=HOME)
    assert s.public_url == "https://n.example.org"


@pytest.mark.parametrize("address", [
    "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4", "BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4",  # BIP 173
    "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0",  # BIP 350 (bech32m, taproot)
    "tb1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3q0sl5k7",  # testnet P2WSH
    "1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2", "3J98t1WpEZ73CNmQviecrnyiWrnqRhWNLy",  # base58check: P2PKH, P2SH
    "mipcBbFg9gMiCh81Kj8tqqdgoZub1ZJRfn", "blt1q8q4j8m25ekursjxx8aaadzr0pdaea0m5rvfgh0",
])
def test_a_payout_address_with_a_valid_checksum_is_taken(address: str) -> None:
    assert StorageSettings.from_env({"STORAGED_PAYOUT_ADDRESS": address}, home=HOME).payout_address == address


@pytest.mark.parametrize("address", [
    "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t5", "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t",  # a typo, one short
    "bc1qxyz0123456789abc", "Bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4",  # no checksum; mixed case
    "1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN3", "1BvBMSEYstWetqTFn5Au4m4GFg7xJaNV", "3J98t1WpEZ73CNmQviecrnyiWrnqRhWNLY",
])
def test_a_mistyped_payout_address_is_refused_at_start(address: str) -> None:
    """Taken as it was, a mistyped address was announced and credited but never paid: the node earned for nothing,
    and only the mediator's log said why."""
    with pytest.raises(ConfigError, match="STORAGED_PAYOUT_ADDRESS=.* copied whole from your wallet"):
        StorageSettings.from_env({"STORAGED_PAYOUT_ADDRESS": address}, home=HOME)


@pytest.mark.parametrize("listen", ["0.0.0.0:8700", "[::]:8700", "0.0.0.0:0"])
def test_a_mediator_listening_on_every_address_needs_a_public_url(listen: str) -> None:
    """Without MEDIATORD_PUBLIC_URL the mediator took http://0.0.0.0:8700 as its address: it announced that in the
    DHT, and refused every signed request (nodes' announcements, clients' uploads) as addressed to another peer."""
    with pytest.raises(ConfigError, match=r"MEDIATORD_LISTEN=(0\.0\.0\.0|\[::\]):\d+ .* set MEDIATORD_PUBLIC_URL"):
        MediatorSettings.from_env({"MEDIATORD_LISTEN": listen}, home=HOME)
    s = MediatorSettings.from_env({"MEDIATORD_LISTEN": listen, "MEDIATORD_PUBLIC_URL": "https://m.example.org"},
                                  home=HOME)
    assert s.public_url == "https://m.example.org"


@pytest.mark.parametrize("name,value,example", [
    ("MEDIATORD_PRICING", "Fixed:1000", "fixed:1000"), ("MEDIATORD_PRICING", "fixed:1.5", "fixed:1000"),
    ("MEDIATORD_ACCEPT_NODES", "min_reputation: 0.3", "min_reputation:0.3"),
    ("MEDIATORD_ACCEPT_CLIENTS", "allow:ID1, ID2", "allow:ID,ID")])
def test_a_mistyped_policy_is_refused_with_what_would_do(name: str, value: str, example: str) -> None:
    """The error named a regular expression, which tells an operator neither the policies nor their form."""
    with pytest.raises(ConfigError) as info:
        MediatorSettings.from_env({name: value}, home=HOME)
    assert str(info.value).startswith(f"{name}=") and example in str(info.value) and "[a-z_]" not in str(info.value)


@pytest.mark.parametrize("kind,name,value", [(MediatorSettings, "MEDIATORD_DHT_BOOTSTRAP", "203.0.113.5:8711"),
                                             (MediatorSettings, "MEDIATORD_DHT_REGION", "eu"),
                                             (StorageSettings, "STORAGED_DHT_BOOTSTRAP", "203.0.113.5:8711")])
def test_a_dht_setting_without_a_dht_node_is_refused(kind: type[MediatorSettings] | type[StorageSettings],
                                                     name: str, value: str) -> None:
    """Without ..._DHT_LISTEN there is no DHT node: the peers and region were ignored, and the daemon, which its
    operator meant to be found through the DHT, was found by nobody."""
    prefix = name.split("_", 1)[0]
    with pytest.raises(ConfigError, match=f"{name} is set but {prefix}_DHT_LISTEN is not.*e.g. 0.0.0.0:8711"):
        kind.from_env({name: value}, home=HOME)
    s = kind.from_env({name: value, f"{prefix}_DHT_LISTEN": "0.0.0.0:8711"}, home=HOME)
    assert s.dht_listen == ("0.0.0.0", 8711)

"""fincryptfs.core.ids: one strict parser per id kind."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs.core import ids
from fincryptfs.core.errors import RemoteProtocolError

PARSERS = [ids.parse_share_id, ids.parse_object_id, ids.parse_node_id, ids.parse_account_id]
VALID = re.compile(r"[0-9a-f]{64}")

BAD = [
    "../x", "..%2f", "%2e%2e", "/etc/passwd", "a" * 63 + "\x00", "\x00" * 64, "A" * 64, "a" * 63 + "F",
    "a" * 63, "a" * 65, "", "a" * 64 + "\n", "\n" + "a" * 63, " " + "a" * 63, "g" * 64,
    "../" + "a" * 61, "a" * 32 + "/" + "a" * 31, "%2e%2e%2f" + "a" * 55, "０" * 64, "a" * 63 + "٣",
]


@pytest.mark.parametrize("parse", PARSERS)
@pytest.mark.parametrize("value", BAD)
def test_bad_ids_are_refused(parse: object, value: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse(value)  # type: ignore[operator]
    assert info.value.status == 400
    assert "64 lowercase hex" in str(info.value)


@pytest.mark.parametrize("parse", PARSERS)
@pytest.mark.parametrize("value", [None, 5, b"a" * 64, ["a" * 64], bytearray(b"a" * 64)])
def test_non_strings_are_refused(parse: object, value: object) -> None:
    with pytest.raises(RemoteProtocolError, match="must be a string"):
        parse(value)  # type: ignore[operator]


def _one_character_changed(raw: bytes, at: int, to: str) -> str:
    text = raw.hex()
    return text[:at] + to + text[at + 1:]


# Random text is practically never 64 lowercase hex digits: ids with one character replaced (by another hex
# digit, or by a near miss) give the test both answers to check.
near_ids = st.builds(_one_character_changed, st.binary(min_size=32, max_size=32), st.integers(0, 63),
                     st.sampled_from(list("0123456789abcdefABCDEFg./%\x00\n")))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), st.text(alphabet="0123456789abcdefABCDEF./%\x00\n", min_size=62,
                                                max_size=66), near_ids))
def test_parsers_accept_exactly_64_lowercase_hex(value: str) -> None:
    for parse in PARSERS:
        if VALID.fullmatch(value):
            assert parse(value) == value
        else:
            with pytest.raises(RemoteProtocolError):
                parse(value)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_hex_of_32_bytes_is_accepted(raw: bytes) -> None:
    for parse in PARSERS:
        assert parse(raw.hex()) == raw.hex()


def test_new_ids_are_valid_and_fresh() -> None:
    assert ids.parse_share_id(ids.new_share_id())
    assert ids.parse_object_id(ids.new_object_id())
    assert ids.new_share_id() != ids.new_share_id()


def test_error_message_escapes_control_characters() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        ids.parse_share_id("\x00\n../x")
    assert "\n" not in str(info.value) and "\\x00" in str(info.value)

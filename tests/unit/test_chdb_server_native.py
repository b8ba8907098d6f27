"""The embedded server's Native walker: how it finds column boundaries, adds BlockInfo and puts
time zones back into column headers (pure functions, hand-built blocks)."""

from __future__ import annotations

import struct

import pytest

from sinks.chdb_server import _BLOCK_INFO, _NotNative, _rewrite_blocks, _skip_column, _type_args


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    assert len(raw) < 128
    return bytes([len(raw)]) + raw


def _column(name: str, type_name: str, data: bytes) -> bytes:
    return _s(name) + _s(type_name) + data


def _block(rows: int, *columns: bytes) -> bytes:
    return bytes([len(columns), rows]) + b"".join(columns)


STRINGS = _s("ab") + _s("") + _s("cde")
ARRAY = struct.pack("<3Q", 1, 1, 3) + struct.pack("<3B", 7, 8, 9)  # [7], [], [8, 9]
NULLABLE = b"\x00\x01\x00" + struct.pack("<3I", 1, 0, 3)
LOW_CARD = (
    struct.pack("<Q", 1)  # key version
    + struct.pack("<Q", (1 << 9) | 0)  # UInt8 indexes, a dictionary follows
    + struct.pack("<Q", 2)
    + _s("x")
    + _s("y")
    + struct.pack("<Q", 3)
    + bytes([0, 1, 0])
)
TIMES = struct.pack("<3I", 0, 60, 120)


@pytest.mark.parametrize(
    ("type_name", "data"),
    [
        ("String", STRINGS),
        ("Array(UInt8)", ARRAY),
        ("Nullable(UInt32)", NULLABLE),
        ("LowCardinality(String)", LOW_CARD),
        ("Tuple(a UInt8, b String)", bytes([1, 2, 3]) + STRINGS),
        ("Map(String, UInt8)", struct.pack("<3Q", 1, 1, 3) + STRINGS + bytes([1, 2, 3])),
        ("Decimal(20, 4)", bytes(48)),
        ("FixedString(2)", b"aabbcc"),
        ("DateTime('Asia/Tokyo')", TIMES),
        ("Point", bytes(48)),
    ],
)
def test_each_type_is_skipped_to_its_exact_end(type_name: str, data: bytes) -> None:
    assert _skip_column(data + b"tail", 0, type_name, 3) == len(data)


def test_an_unknown_type_or_truncated_data_cannot_be_walked() -> None:
    with pytest.raises(_NotNative):
        _skip_column(b"\x00" * 64, 0, "Dynamic", 3)
    with pytest.raises(_NotNative):
        _skip_column(STRINGS[:-1], 0, "String", 3)


def test_type_arguments_split_at_top_level_commas_outside_quotes() -> None:
    assert _type_args("Map(String, Array(Tuple(UInt8, String)))") == ("Map", ["String", "Array(Tuple(UInt8, String))"])
    assert _type_args("Enum8('a,b' = 1, 'c' = 2)") == ("Enum8", ["'a,b' = 1", "'c' = 2"])


def test_block_info_goes_before_every_block_and_zones_into_bare_datetime_headers() -> None:
    first = _block(3, _column("s", "String", STRINGS), _column("t", "DateTime", TIMES), _column("u", "DateTime", TIMES))
    data = first + first
    types = ["String", "DateTime('Asia/Tokyo')", "DateTime"]
    out = _rewrite_blocks(data, types, block_info=True)
    zoned = _block(3, _column("s", "String", STRINGS), _column("t", types[1], TIMES), _column("u", "DateTime", TIMES))
    assert out == (_BLOCK_INFO + zoned) * 2
    assert _rewrite_blocks(data, None, block_info=True) == (_BLOCK_INFO + first) * 2


def test_one_block_is_walked_only_up_to_its_last_zoned_column() -> None:
    # the column after the zoned one is of a type the walker does not know: never walked
    block = _block(3, _column("t", "DateTime", TIMES), _column("d", "Dynamic", b"\xff" * 9))
    out = _rewrite_blocks(block, ["DateTime('UTC')", "Dynamic"], block_info=False)
    assert out == _block(3, _column("t", "DateTime('UTC')", TIMES), _column("d", "Dynamic", b"\xff" * 9))
    assert _rewrite_blocks(block, ["DateTime", "Dynamic"], block_info=False) is block

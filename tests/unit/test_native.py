"""The event sink's Native blocks: the C converter writes exactly the bytes of the pure-Python
reference (built from the rows the Python path inserts), and gives up on anything else."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import AvroSerde, FeedbackEvent, load_schema
from schemas import serde as serde_module
from sinks.clickhouse import EVENT_COLUMNS, event_row, native_statement
from sinks.native import EVENT_NATIVE_TYPES, NativeEncoder, encode_native, event_plan
from tests.unit.test_fast_encode import events

SCHEMA = load_schema("feedback_event_v1")
SERDE = AvroSerde()


class Msg:
    """What the converter reads of a confluent-kafka Message."""

    def __init__(self, value: bytes | None, offset: int) -> None:
        self._value, self._offset = value, offset

    def value(self) -> bytes | None:
        return self._value

    def offset(self) -> int:
        return self._offset


def encoder(prefix: bytes = b"") -> NativeEncoder:
    assert serde_module._speedups is not None, "schemas._speedups is not built: `make setup` builds it"
    plan = event_plan(SCHEMA, EVENT_COLUMNS)
    assert plan is not None
    return NativeEncoder(plan, SERDE.header, prefix)


def reference(bodies: list[bytes], first: int, partition: int) -> bytes:
    rows = [event_row(SERDE.decode(body), partition, first + i) for i, body in enumerate(bodies)]
    return encode_native(EVENT_COLUMNS, EVENT_NATIVE_TYPES, rows)


def test_the_shipped_schema_has_a_plan_for_every_column() -> None:
    plan = event_plan(SCHEMA, EVENT_COLUMNS)
    assert plan is not None
    columns, ops = plan
    assert [c[0].decode() for c in columns] == list(EVENT_COLUMNS)
    filled = {col for _, col, _ in ops if col >= 0}
    assert filled == set(range(len(EVENT_COLUMNS))) - {
        EVENT_COLUMNS.index("kafka_partition"),
        EVENT_COLUMNS.index("kafka_offset"),
    }


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(events, min_size=1, max_size=12), first=st.integers(0, 2**40), partition=st.integers(0, 2**31))
def test_c_blocks_equal_the_python_reference(batch: list[FeedbackEvent], first: int, partition: int) -> None:
    bodies = [SERDE.encode(e.to_avro()) for e in batch]
    msgs = [Msg(b, first + i) for i, b in enumerate(bodies)]
    assert encoder().encode(msgs, first, partition) == reference(bodies, first, partition)


def test_every_payload_value_kind_is_stored_as_the_python_path_stores_it() -> None:
    extra = {"b": True, "f": False, "n": None, "i": -(2**63), "j": 2**63 - 1, "x": 0.1, "y": 1e300, "z": -0.0, "s": "t"}
    record = next(iter(_records(1)))
    record["payload"]["extra"] = extra
    body = SERDE.encode(record)
    block = encoder().encode([Msg(body, 7)], 7, 1)
    assert block == reference([body], 7, 1)
    for text in (
        b"\x04true",
        b"\x05false",
        b"\x04null",
        b"\x14-9223372036854775808",
        b"\x030.1",
        b"\x061e+300",
        b"\x04-0.0",
    ):
        assert text in block


def _records(n: int) -> list[dict[str, Any]]:
    from producers.synthetic import generate_events
    from stream_processors.normalize import normalize

    return [normalize(e.to_avro()) for e in generate_events(n, seed=5)]


def test_the_prefix_heads_the_block() -> None:
    body = SERDE.encode(_records(1)[0])
    statement = native_statement("db")
    assert statement.startswith(b"INSERT INTO `db`.feedback_events (event_id, ts,") and statement.endswith(
        b"FORMAT Native\n"
    )
    block = encoder(statement).encode([Msg(body, 0)], 0, 0)
    assert block == statement + reference([body], 0, 0)


@pytest.mark.parametrize(
    "case",
    [
        "gap",
        "first",
        "other_header",
        "no_value",
        "truncated",
        "trailing",
        "enum",
        "union",
        "map_branch",
        "negative_length",
    ],
)
def test_anything_off_leaves_the_run_to_the_python_path(case: str) -> None:
    bodies = [SERDE.encode(r) for r in _records(3)]
    offsets = [10, 11, 12]
    header = len(SERDE.header)
    first = 10
    if case == "gap":
        offsets = [10, 11, 13]
    elif case == "first":
        first = 9
    elif case == "other_header":
        bodies[1] = b"\xc3\x01" + b"\x00" * 8 + bodies[1][header:]
    elif case == "no_value":
        bodies[2] = None  # type: ignore[call-overload]
    elif case == "truncated":
        bodies[1] = bodies[1][:-1]
    elif case == "trailing":
        bodies[1] = bodies[1] + b"\x00"
    else:
        record = _records(1)[0]
        base = SERDE.encode(record)
        body = bytearray(base)
        # event_id, ts, source and type come first: the enum index follows them.
        pos = _after_string(body, header)
        pos = _long(body, pos)[1]
        pos = _after_string(body, _after_string(body, pos))
        assert body[pos] in (0, 2, 4, 6, 8)  # the severity index, zigzag-encoded
        if case == "enum":
            body[pos] = 2 * 9  # index 9 of 5 symbols
        elif case == "negative_length":
            body[header] = 0x01  # event_id's length: zigzag -1
        else:
            changed = copy.deepcopy(record)
            changed["payload"]["extra"] = {"k": "v"}
            body = bytearray(SERDE.encode(changed))
            at = body.index(b"\x02k\x08\x02v") + 2  # the map value's union branch (4: string)
            body[at] = 2 * (9 if case == "map_branch" else 4)  # branch 9 (none), or 4 with a bad string length
            if case == "union":
                body[at + 1] = 0x7F  # a length far past the end
        bodies[1] = bytes(body)
    msgs = [Msg(b, o) for b, o in zip(bodies, offsets, strict=True)]
    assert encoder().encode(msgs, first, 0) is None


def _long(body: bytearray, pos: int) -> tuple[int, int]:
    """The Avro long at ``pos`` and the position after it."""
    n, shift = 0, 0
    while True:
        b = body[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return (n >> 1) ^ -(n & 1), pos


def _after_string(body: bytearray, pos: int) -> int:
    length, pos = _long(body, pos)
    return pos + length


def test_a_schema_with_a_field_it_does_not_convert_has_no_plan() -> None:
    schema = copy.deepcopy(SCHEMA)
    schema["fields"].append({"name": "count", "type": "int"})
    assert event_plan(schema, EVENT_COLUMNS) is None
    dropped = copy.deepcopy(SCHEMA)
    dropped["fields"] = [f for f in dropped["fields"] if f["name"] != "hash"]
    assert event_plan(dropped, EVENT_COLUMNS) is None  # a column nothing fills


@pytest.mark.parametrize("part", ["enum_symbol", "json_kind", "column", "op_column"])
def test_a_malformed_plan_is_a_type_error_not_a_crash(part: str) -> None:
    plan = event_plan(SCHEMA, EVENT_COLUMNS)
    assert plan is not None and serde_module._speedups is not None
    columns, ops = list(plan[0]), list(plan[1])
    if part in ("enum_symbol", "json_kind"):
        i = next(
            k
            for k, op in enumerate(ops)
            if isinstance(op[2], tuple) and isinstance(op[2][0], bytes) == (part == "enum_symbol")
        )
        ops[i] = (ops[i][0], ops[i][1], tuple(str(x) for x in ops[i][2]))
    elif part == "column":
        columns[0] = ("event_id", b"String", columns[0][2])
    else:
        ops[0] = (ops[0][0], len(columns), None)
    body = SERDE.encode(_records(1)[0])
    with pytest.raises(TypeError):
        serde_module._speedups.native_block((tuple(columns), tuple(ops)), SERDE.header, [Msg(body, 0)], 0, 0, b"")

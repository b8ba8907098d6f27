"""validate()'s plain-Python check gives exactly the model's verdict: the same InvalidEvent
(field, rule), the same other exception, or acceptance, on generated Avro-form records."""

from __future__ import annotations

import copy
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline.errors import InvalidEvent
from schemas import AvroSerde, FeedbackEvent
from schemas.avro_binary import micros as _micros
from schemas.models import _TS_MAX, _TS_MIN, Severity
from stream_processors import validate as validate_module
from stream_processors.validate import Limits, ValidatedEvent, _validate_reference, validate

NOW = datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=UTC)
LIMITS = Limits()
SMALL = Limits(max_payload_bytes=120, max_text_chars=12, max_future=timedelta(seconds=1), max_age=timedelta(hours=1))
FIELDS = tuple(FeedbackEvent.model_fields)
US = timedelta(microseconds=1)


def _typical(i: int = 0) -> dict[str, Any]:
    event = FeedbackEvent(
        source="dream_ui",
        type="thumbs",
        ts=NOW - timedelta(seconds=i),
        user_id=f"user-{i}",
        interaction_id=f"int-{i}",
        payload={"direction": "up", "comment": "nice answer, thanks"},
    )
    serde = AvroSerde()
    return serde.decode(serde.encode(event.to_avro()))


def outcome(check: Any, record: Any, limits: Limits) -> tuple[Any, ...]:
    try:
        check(record, NOW, limits)
    except InvalidEvent as exc:
        return ("invalid", exc.field, exc.rule)
    except Exception as exc:  # any other error must be the same one too
        return ("error", type(exc), str(exc))
    return ("ok",)


# --- strategies ---------------------------------------------------------------------------


def mostly(strategy: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``strategy`` three times in four, else ``other`` (``|`` would flatten both into one
    uniform choice among all their branches, drowning the edge cases)."""
    return st.sampled_from([True, True, True, False]).flatmap(lambda first: strategy if first else other)


anything = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["0.5", "1e400", "info", "2026-11-23T10:00:00Z", "", " x ", "\ud800", "a\udfffb"])
    | st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
    | st.just(Severity.warn)
)
# Strings of the lengths around each limit, in 1-, 2- and 4-byte characters, and with surrogates.
lengths = st.sampled_from([0, 1, 2, 63, 64, 65, 127, 128, 129, 255, 256, 257])
chars = st.sampled_from(["a", "é", "€", "😀"])
edge_strings = mostly(
    st.builds(lambda n, c: c * n, lengths, chars),
    st.builds(lambda n, s: "x" * n + s, lengths, st.sampled_from(["\ud800", "\udc00x", "é\udfff"])),
)
identifiers = st.text(min_size=1, max_size=24)
hexes = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


def floats_in(low: float, high: float) -> st.SearchStrategy[Any]:
    edges = [
        low,
        high,
        math.nextafter(low, -math.inf),
        math.nextafter(high, math.inf),
        math.nextafter(low, math.inf),
        -0.0,
        0.0,
        5e-324,
        -5e-324,
        0,
        1,
        -1,
        True,
        False,
        math.nan,
        math.inf,
        -math.inf,
    ]
    return mostly(st.sampled_from(edges), st.floats(low - 1, high + 1) | anything)


scalars = mostly(
    st.sampled_from([-(2**63), 2**63 - 1, 2**63, -(2**63) - 1, math.nan, math.inf, -math.inf, -0.0, True, None, ""]),
    st.none()
    | st.booleans()
    | st.integers(-(2**63) - 2, 2**63 + 1)
    | st.floats()
    | st.text(max_size=20)
    | edge_strings
    | anything,
)
extra_keys = st.sampled_from(
    [
        "direction",
        "rating",
        "interaction_",
        "interaction_status",
        "interactio",
        "xinteraction_",
        "text",
        "extra",
        "",
        "\ud800",
        "k\udfff",
        0,
        None,
    ]
) | st.text(max_size=8)
texts = mostly(
    st.sampled_from([None, "", "\ud800", "é\udfff", *("t" * n for n in (12, 13, 32 * 1024, 32 * 1024 + 1, 65 * 1024))]),
    st.text(max_size=30) | edge_strings | anything,
)
valid_extra = st.dictionaries(
    st.sampled_from(["direction", "rating", "stars", "note"]) | st.text(max_size=6),
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    max_size=4,
)
payload_changes = st.sampled_from(
    [
        "none",
        "texts",
        "extra",
        "extra",
        "blob",
        "drop a key",
        "add a key",
        "flat form",
        "not a dict",
        "extra not a dict",
    ]
)


@st.composite
def payloads(draw: st.DrawFn, valid: bool) -> Any:
    out: dict[str, Any] = {
        "text": draw(st.none() | st.text(max_size=20)),
        "comment": draw(st.none() | st.text(max_size=20)),
        "corrected_response": draw(st.none() | st.text(max_size=20)),
        "extra": draw(valid_extra),
    }
    change = "none" if valid else draw(payload_changes)
    if change == "texts":
        for name in draw(st.lists(st.sampled_from(["text", "comment", "corrected_response"]), unique=True, min_size=1)):
            out[name] = draw(texts)
    elif change == "extra":
        out["extra"] = {**out["extra"], **draw(st.dictionaries(extra_keys, scalars, min_size=1, max_size=3))}
    elif change == "blob":
        out["extra"]["blob"] = "b" * draw(st.sampled_from([60, 64 * 1024 - 80, 64 * 1024, 65 * 1024]))
    elif change == "drop a key":
        del out[draw(st.sampled_from(sorted(out)))]
    elif change == "add a key":
        out[draw(st.sampled_from(["rating", "extra2", "interaction_id"]))] = draw(scalars)
    elif change == "flat form":  # which the model also reads
        return {k: v for k, v in out.items() if k != "extra"} | out["extra"] | draw(valid_extra)
    elif change == "not a dict":
        return draw(anything)
    elif change == "extra not a dict":
        out["extra"] = draw(anything | st.just([("k", 1)]))
    return out


def _aware(low: datetime, high: datetime) -> st.SearchStrategy[datetime]:
    return st.datetimes(min_value=low.replace(tzinfo=None), max_value=high.replace(tzinfo=None), timezones=st.just(UTC))


window = (NOW - LIMITS.max_age, NOW + LIMITS.max_future)
ts_edges = [
    window[0],
    window[0] - US,
    window[0] + US,
    window[1],
    window[1] + US,
    window[1] - US,
    NOW - SMALL.max_age,
    NOW - SMALL.max_age - US,
    NOW + SMALL.max_future,
    NOW + SMALL.max_future + US,
    _TS_MIN,
    _TS_MIN - US,
    _TS_MAX,
    _TS_MAX + US,
    NOW,
]
valid_times = _aware(*window) | st.sampled_from(ts_edges[:1] + ts_edges[3:4] + ts_edges[-1:])
times = mostly(
    st.sampled_from(ts_edges)
    | st.sampled_from(ts_edges).map(_micros)
    | st.sampled_from([0, -1, _micros(_TS_MAX), _micros(_TS_MAX) + 1, 2**63 - 1, 2**63, -(2**63), 10**30, True]),
    _aware(datetime(1960, 1, 1), datetime(2300, 1, 1))
    | st.datetimes(timezones=st.sampled_from([timezone(timedelta(hours=5)), timezone(timedelta(minutes=-1))]))
    | st.datetimes(min_value=datetime(2026, 8, 1), max_value=datetime(2027, 1, 1))  # naive: taken as UTC
    | anything,
)
ids = st.none() | identifiers
valid_fields: dict[str, st.SearchStrategy[Any]] = {
    "event_id": identifiers,
    "ts": valid_times | valid_times.map(_micros),
    "source": st.sampled_from(["dream_ui", "oracle"]) | identifiers,
    "type": st.sampled_from(["thumbs", "rating", "correction"]) | identifiers,
    "severity": st.sampled_from([s.value for s in Severity]),
    "payload": payloads(valid=True),
    "user_id": ids,
    "session_id": ids,
    "interaction_id": ids,
    "model_version": ids,
    "prompt_version": ids,
    "value": st.none() | st.floats(-1, 1),
    "confidence": st.none() | st.floats(0, 1),
    "tags": st.lists(st.text(max_size=10), max_size=3),
    "idempotency_key": ids,
    "client_ip": st.none() | st.text(max_size=15),
    "sample_rate": st.none() | st.floats(0, 1, exclude_min=True),
    "text_dropped": st.booleans(),
    "propagation_weight": st.none() | st.floats(0, 1),
    "hash": hexes,
}
edge_ids = mostly(edge_strings, ids | anything)
edge_fields: dict[str, st.SearchStrategy[Any]] = {
    "event_id": edge_ids,
    "ts": times,
    "source": edge_ids,
    "type": edge_ids,
    "severity": mostly(st.sampled_from(["fatal", "INFO", "Info", " info", *Severity]), anything),
    "payload": payloads(valid=False),
    "user_id": edge_ids,
    "session_id": edge_ids,
    "interaction_id": edge_ids,
    "model_version": edge_ids,
    "prompt_version": edge_ids,
    "idempotency_key": edge_ids,
    "client_ip": edge_ids,
    "value": floats_in(-1.0, 1.0),
    "confidence": floats_in(0.0, 1.0),
    "sample_rate": floats_in(0.0, 1.0),
    "propagation_weight": floats_in(0.0, 1.0),
    "tags": mostly(
        st.lists(mostly(edge_strings, st.text(max_size=3) | anything), min_size=1, max_size=3)
        | st.builds(lambda n: ["t"] * n, st.sampled_from([63, 64, 65])),
        st.tuples(st.just("t")) | anything,
    ),
    "text_dropped": mostly(st.sampled_from([0, 1, "true", None]), anything),
    "hash": mostly(st.sampled_from(["", "h", "é", "\ud800", "x" * 500]), anything),
}
EDGY = (*FIELDS, *["payload"] * 6, *["ts"] * 2)  # the payload has the most rules, ts the most edges
record_changes = st.sampled_from(["none"] * 16 + ["drop a field", "add a field", "swap a field", "not a dict"])


@st.composite
def records(draw: st.DrawFn) -> Any:
    record = {name: draw(valid_fields[name]) for name in FIELDS}
    for name in draw(
        st.sampled_from([0, 1, 1, 1, 2, 3]).flatmap(
            lambda n: st.lists(st.sampled_from(EDGY), unique=True, min_size=n, max_size=n)
        )
    ):
        record[name] = draw(edge_fields[name])
    change = draw(record_changes)
    if change == "drop a field":
        del record[draw(st.sampled_from(FIELDS))]
    elif change == "add a field":
        record[draw(st.sampled_from(["unknown", "", "Source", "payload_"]))] = draw(scalars)
    elif change == "swap a field":  # as many fields as the model has, one of them not its own
        record.pop(draw(st.sampled_from(FIELDS)))
        record["unknown"] = 1
    elif change == "not a dict":
        record = draw(st.sampled_from([[], None, "record", ()]))
    return record


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(record=records(), limits=st.sampled_from([LIMITS, SMALL]))
def test_validate_gives_the_models_verdict_for_any_record(record: Any, limits: Limits) -> None:
    before = copy.deepcopy(record)
    expected = outcome(_validate_reference, record, limits)
    got = outcome(validate, record, limits)
    assert got == expected
    fast = validate_module._certainly_valid(record) is not None
    event(f"{'fast' if fast else 'model'}: {got[0]} {got[1] if got[0] == 'invalid' else ''}".rstrip())
    assert record == before  # validate changes nothing
    if got == ("ok",):
        # The event built on demand is the model's (fields the record lacks get fresh defaults).
        fresh = {"event_id", "ts"} - set(record)
        built = validate(record, NOW, limits).event.to_avro()
        reference = _validate_reference(record, NOW, limits).to_avro()
        assert {k: v for k, v in built.items() if k not in fresh} == {
            k: v for k, v in reference.items() if k not in fresh
        }


_STRING_EDGES = [
    None,
    "",
    "a",
    "\ud800",
    "a\udfffb",
    *(c * n for c in "aé😀" for n in (63, 64, 65, 127, 128, 129, 255, 256, 257)),
]
_FLOAT_EDGES = [
    None,
    -1.0,
    -0.0,
    0.0,
    1.0,
    5e-324,
    -5e-324,
    math.nextafter(1.0, 2),
    math.nextafter(-1.0, -2),
    math.nextafter(0.0, -1),
    math.nan,
    math.inf,
    -math.inf,
    0,
    1,
    True,
    "0.5",
]
_TS_EDGES = [
    *ts_edges,
    *map(_micros, ts_edges),
    0,
    -1,
    _micros(_TS_MAX) + 1,
    2**63,
    10**30,
    True,
    None,
    "now",
    NOW.replace(tzinfo=None),
    NOW.astimezone(timezone(timedelta(hours=5))),
    NOW.replace(tzinfo=timezone(timedelta(0))),
]
_EXTRA_EDGES = [
    {"interaction_": 1},
    {"a": 1, "interaction_status": "x"},
    {"interactio": 1},
    {"k": 2**63 - 1},
    {"k": 2**63},
    {"k": -(2**63)},
    {"k": -(2**63) - 1},
    {"k": math.nan},
    {"k": math.inf},
    {"k": [1]},
    {"k": {"a": 1}},
    {1: "x"},
    {"\ud800": 1},
    {"k": "\ud800"},
    {"blob": "b" * (64 * 1024)},
    {"blob": "b" * (64 * 1024 - 40)},
    {"k": None, "b": False, "f": -0.0, "s": ""},
]
_TEXT_EDGES = ["t" * 32 * 1024, "t" * (32 * 1024 + 1), "é" * (32 * 1024 + 1), "\ud800", 1, b"x", ""]
EDGES: list[tuple[str, Any]] = [
    *((name, v) for name, *_ in validate_module._RULES.strings for v in _STRING_EDGES),  # type: ignore[union-attr]
    *((name, v) for name, *_ in validate_module._RULES.floats for v in _FLOAT_EDGES),  # type: ignore[union-attr]
    *(("ts", v) for v in _TS_EDGES),
    *(("severity", v) for v in ["info", "INFO", "fatal", "", Severity.critical, None, 1]),
    *(("text_dropped", v) for v in [True, False, 0, 1, None, "false"]),
    *(
        ("tags", v)
        for v in [[], ["t"] * 64, ["t"] * 65, ["x" * 128], ["x" * 129], ["é" * 128], ["\ud800"], [1], ("t",), None, "t"]
    ),
    *(("payload.extra", v) for v in _EXTRA_EDGES),
    *((f"payload.{name}", v) for name in ("text", "comment", "corrected_response") for v in _TEXT_EDGES),
    *(("payload", v) for v in [None, {}, {"text": None}, {"direction": "up"}, {"text": "x", "extra": {}, "k": 1}]),
]


@pytest.mark.parametrize("limits", [LIMITS, SMALL], ids=["default-limits", "small-limits"])
@pytest.mark.parametrize("micros", [False, True], ids=["ts-datetime", "ts-micros"])
def test_every_edge_value_gives_the_models_verdict(limits: Limits, micros: bool) -> None:
    """Each value on an edge of a rule (and past it), in an otherwise typical record."""
    for name, value in EDGES:
        record = _typical()
        if micros:
            record["ts"] = _micros(record["ts"])
        if name.startswith("payload."):
            record["payload"] = dict(record["payload"])
            key = name.removeprefix("payload.")
            record["payload"][key] = {**record["payload"]["extra"], **value} if key == "extra" else value
        else:
            record[name] = value
        assert outcome(validate, record, limits) == outcome(_validate_reference, record, limits), (name, value)


@settings(max_examples=500, deadline=None)
@given(record=st.fixed_dictionaries(valid_fields))
def test_valid_avro_records_take_the_fast_way(record: dict[str, Any]) -> None:
    """Not vacuous: every record of the valid strategies passes without the model."""
    ts = validate_module._certainly_valid(record)
    assert ts is not None
    assert ts == (record["ts"] if isinstance(record["ts"], datetime) else FeedbackEvent.from_avro(record).ts)


def test_the_fast_check_knows_every_field_of_the_model() -> None:
    rules = validate_module._RULES
    assert rules is not None, "the fast check switched itself off: the model has a rule it does not know"
    assert rules.names == set(FeedbackEvent.model_fields)
    assert ("source", False, 1, 128) in rules.strings
    assert ("client_ip", True, 0, 64) in rules.strings
    assert ("sample_rate", True, 0.0, True, 1.0, False) in rules.floats  # 0 < rate <= 1
    assert rules.str_lists == (("tags", 64, 128),)


def test_an_unknown_validator_or_setting_switches_the_fast_check_off(monkeypatch: pytest.MonkeyPatch) -> None:
    known = dict(validate_module._KNOWN_VALIDATORS)
    known[FeedbackEvent] = ({"_ts_utc": ("ts",)}, set())
    monkeypatch.setattr(validate_module, "_KNOWN_VALIDATORS", known)
    assert validate_module._compile() is None
    monkeypatch.undo()
    config = dict(validate_module._KNOWN_CONFIG)
    config[FeedbackEvent] = {**config[FeedbackEvent], "str_strip_whitespace": True}
    monkeypatch.setattr(validate_module, "_KNOWN_CONFIG", config)
    assert validate_module._compile() is None


def test_a_typical_decoded_record_never_builds_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: Any) -> None:
        raise AssertionError("went through the model")

    monkeypatch.setattr(validate_module, "_validate_reference", fail)
    for i in range(3):
        result = validate(_typical(i), NOW, LIMITS)
        assert isinstance(result, ValidatedEvent) and result._event is None
    monkeypatch.undo()
    assert result.type == "thumbs" and result.event.payload.comment == "nice answer, thanks"


def test_errors_on_the_fast_way_name_field_and_rule() -> None:
    cases = [
        ({"comment": "y" * 40_000}, "payload.comment", "longer than 32768 characters"),
        ({"extra": {"interaction_status": "joined"}}, "payload.interaction_status", "set by the stream"),
        ({"extra": {"blob": "x" * (65 * 1024)}}, "payload", "-byte limit"),
    ]
    for change, field, rule in cases:
        record = _typical()
        record["payload"] = {**record["payload"], **change}
        assert validate_module._certainly_valid(record) is not None
        with pytest.raises(InvalidEvent) as info:
            validate(record, NOW, LIMITS)
        assert info.value.field == field and rule in info.value.rule
    with pytest.raises(InvalidEvent) as info:
        validate({**_typical(), "ts": NOW + timedelta(minutes=6)}, NOW, LIMITS)
    assert (info.value.field, info.value.rule) == ("ts", "more than 300s in the future")

"""BulkEncoder accepts and refuses exactly what FeedbackEvent.model_validate does, with the same
hash, key and Avro bytes."""

from __future__ import annotations

import gc
import math
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from producers.producer import subject_key
from schemas import AvroSerde, FeedbackEvent
from schemas import bulk as bulk_module
from schemas.bulk import Accepted, BulkEncoder, Refused, new_event_ids

SERDE = AvroSerde()
# The C loop (schemas/_speedups.c) and the Python loop beside it: every test runs both.
BULKS = {"c": BulkEncoder(SERDE), "python": BulkEncoder(SERDE, native=False)}
paths = pytest.mark.parametrize("path", sorted(BULKS))


def test_the_c_loop_is_built_and_used() -> None:
    assert bulk_module._speedups is not None, "schemas._speedups is not built: `make setup` builds it"
    assert BULKS["c"]._native and not BULKS["python"]._native


def test_the_c_precheck_knows_every_field_of_the_model() -> None:
    """The pre-check stands in for pydantic only with rules read from the model; a field type
    or constraint it does not know switches it off (None) rather than guessing."""
    rules = bulk_module._precheck_rules()
    assert rules is not None
    assert set(rules) - {None} == set(FeedbackEvent.model_fields)
    assert rules[None] == ("source", "type")
    assert rules["source"][1:5] == (True, False, 1, 128)  # required, not nullable, 1..128 characters
    assert rules["sample_rate"][3:] == (0.0, True, 1.0, False)  # 0 < rate <= 1
NOW = datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=UTC)

# Values valid for some fields, invalid for others: the two paths must agree on every one.
anything = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["0.5", "1e400", "info", "2026-11-23T10:00:00Z", "", " x "])
    | st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)
scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63) - 2, 2**63 + 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
keys = st.sampled_from(["text", "comment", "corrected_response", "direction", "extra", "rating", "x"])
payloads = st.dictionaries(keys | st.text(max_size=6), scalar | anything, max_size=5)
ids = st.none() | st.text(max_size=300) | st.sampled_from(["u-1", "i-9", "m-1"]) | anything
times = (
    st.datetimes(min_value=datetime(1960, 1, 1), max_value=datetime(2300, 1, 1))
    | st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=5))]))
    | anything
)
fields = {
    "source": st.sampled_from(["dream_ui", "", "x" * 129]) | anything,
    "type": st.sampled_from(["thumbs", "rating"]) | anything,
    "severity": st.sampled_from(["debug", "info", "warn", "error", "critical", "fatal", "INFO"]) | anything,
    "payload": payloads | anything,
    "user_id": ids,
    "session_id": ids,
    "interaction_id": ids,
    "model_version": ids,
    "prompt_version": ids,
    "value": st.floats(-1.5, 1.5) | anything,
    "confidence": st.floats(-0.5, 1.5) | anything,
    "tags": st.lists(st.text(max_size=130), max_size=3) | st.lists(st.just("t"), min_size=64, max_size=66) | anything,
    "idempotency_key": ids,
    "client_ip": ids,
    "sample_rate": st.floats(0, 1) | anything,
    "text_dropped": st.booleans() | anything,
    "propagation_weight": st.floats(0, 1) | anything,
    "hash": st.sampled_from(["", "given-hash"]) | anything,
    "ts": times,
    "event_id": st.sampled_from(["e-1", ""]) | anything,
    "unknown_field": st.integers(),
    "": st.integers(),  # an empty key: unknown to the model like any other
}
likely_valid = st.fixed_dictionaries(
    {"source": st.sampled_from(["dream_ui", "api"]), "type": st.sampled_from(["thumbs", "rating", "bad_output"])},
    optional={
        "payload": st.dictionaries(keys, scalar, max_size=4),
        "user_id": st.text(min_size=1, max_size=20),
        "interaction_id": st.text(min_size=1, max_size=20),
        "value": st.floats(-1, 1),
        "severity": st.sampled_from(["warn", "critical"]),
        "tags": st.lists(st.text(max_size=10), max_size=3),
        "ts": st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1)),
    },
)  # fmt: skip
items = likely_valid | st.fixed_dictionaries({"source": fields["source"], "type": fields["type"]}, optional={
    k: v for k, v in fields.items() if k not in ("source", "type")})  # fmt: skip


def reference(item: dict[str, Any], event_id: str) -> FeedbackEvent:
    """What the model makes of the item, given the id and the time the encoder chose."""
    return FeedbackEvent.model_validate({"event_id": event_id, "ts": NOW, **item})


@paths
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(item=items)
def test_the_bulk_result_is_the_models_for_any_item(path: str, item: dict[str, Any]) -> None:
    [result] = BULKS[path].encode([item], now=NOW)
    event_id = result.event_id if isinstance(result, Accepted) else "e-fixed"
    try:
        event = reference(item, event_id)
    except ValidationError as exc:
        assert isinstance(result, Refused), f"accepted what the model refuses: {exc.errors()[0]['msg']}"
        assert result.error is not None
        plain = {"include_url": False, "include_context": False}
        assert result.error.errors(**plain) == exc.errors(**plain)
        return
    assert isinstance(result, Accepted), f"refused what the model accepts: {result.error}"
    assert result.event_id == event.event_id
    assert result.hash == event.hash
    assert result.key == subject_key(event)
    assert result.value == SERDE.encode_model(event)
    assert SERDE.decode(result.value) == SERDE.decode(SERDE.encode(event.to_avro()))


defaults = st.fixed_dictionaries({}, optional={
    "source": st.sampled_from(["dream_ui", ""]) | anything, "model_version": ids, "prompt_version": ids,
    "type": st.sampled_from(["thumbs"]), "payload": payloads, "severity": fields["severity"]})  # fmt: skip
partial_items = st.fixed_dictionaries({}, optional=fields)


@paths
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(item=partial_items | items, given_defaults=defaults)
def test_with_defaults_the_result_is_the_models_for_the_merged_item(
    path: str, item: dict[str, Any], given_defaults: dict[str, Any]
) -> None:
    """``defaults`` fill what an item lacks or holds as null: the C loop reads the two without
    merging them, the Python loop merges; both must give the model's answer for the merge."""
    [result] = BULKS[path].encode([item], defaults=given_defaults, now=NOW)
    merged = {**given_defaults, **{k: v for k, v in item.items() if v is not None}} if given_defaults else item
    event_id = result.event_id if isinstance(result, Accepted) else "e-fixed"
    try:
        event = reference(merged, event_id)
    except ValidationError as exc:
        assert isinstance(result, Refused) and result.error is not None
        # (a missing field's "input" is the whole item, which holds the reference's own id and time)
        assert [(e["type"], e["loc"], e["msg"]) for e in result.error.errors()] == [
            (e["type"], e["loc"], e["msg"]) for e in exc.errors()
        ]
        return
    assert isinstance(result, Accepted), f"refused what the model accepts: {result.error}"
    assert (result.event_id, result.hash, result.key) == (event.event_id, event.hash, subject_key(event))
    assert result.value == SERDE.encode_model(event)


@paths
def test_defaults_fill_missing_and_null_fields_only(path: str) -> None:
    [a, b] = BULKS[path].encode(
        [{"type": "thumbs", "model_version": None}, {"type": "thumbs", "source": "own", "model_version": "m-2"}],
        defaults={"source": "dream_ui", "model_version": "m-1"},
        now=NOW,
    )
    assert isinstance(a, Accepted) and isinstance(b, Accepted)
    first, second = SERDE.decode(a.value), SERDE.decode(b.value)
    assert (first["source"], first["model_version"]) == ("dream_ui", "m-1")
    assert (second["source"], second["model_version"]) == ("own", "m-2")


@paths
def test_missing_ids_and_times_are_filled_fresh(path: str) -> None:
    before = datetime.now(UTC)
    results = BULKS[path].encode([{"source": "s", "type": "t"}] * 50)
    assert all(isinstance(r, Accepted) for r in results)
    ids_seen = {r.event_id for r in results}
    assert len(ids_seen) == 50
    for event_id in ids_seen:
        assert uuid.UUID(event_id).version == 4 and str(uuid.UUID(event_id)) == event_id
    ts = SERDE.decode(results[0].value)["ts"]
    assert before <= ts <= datetime.now(UTC)


def test_new_event_ids_are_uuid4_text() -> None:
    batch = new_event_ids(200)
    assert len(set(batch)) == 200
    for text in batch:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text
    assert new_event_ids(0) == []


@paths
def test_refused_batches_are_freed(path: str) -> None:
    """A refusal from a model validator (here the time range) must not keep its batch alive:
    pydantic holds the validator's exception out of the garbage collector's sight, and its
    traceback reached back to the frame holding the results."""
    item = {"source": "s", "type": "t", "ts": datetime(3000, 1, 1, tzinfo=UTC), "payload": {"n": 1}}

    def live() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, ValidationError))

    before = live()
    for _ in range(3):
        results = BULKS[path].encode([item] * 20, now=NOW)
        assert all(isinstance(r, Refused) and "ts" in str(r.error) for r in results)
        del results
    assert live() == before


@paths
def test_not_an_object_is_refused_without_an_error(path: str) -> None:
    results = BULKS[path].encode([["a list"], "text", 3, None, {"source": "s", "type": "t"}], now=NOW)
    assert [type(r) for r in results] == [Refused, Refused, Refused, Refused, Accepted]
    assert all(r.error is None for r in results[:4])


@paths
def test_redaction_changes_the_bytes_not_the_hash(path: str) -> None:
    def redact(payload: dict[str, Any]) -> dict[str, Any]:
        return {**payload, "comment": "[redacted]"}

    item = {"source": "s", "type": "t", "event_id": "e-1", "payload": {"comment": "call 555-0100"}}
    native = path == "c"
    [plain] = BulkEncoder(SERDE, native=native).encode([item], now=NOW)
    [redacted] = BulkEncoder(SERDE, redact=redact, native=native).encode([item], now=NOW)
    assert isinstance(plain, Accepted) and isinstance(redacted, Accepted)
    assert plain.hash == redacted.hash == reference(item, "e-1").hash
    assert SERDE.decode(redacted.value)["payload"]["comment"] == "[redacted]"
    assert SERDE.decode(plain.value)["payload"]["comment"] == "call 555-0100"


@paths
@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"n": 2**64}, "payload.n"),
        ({"n": math.nan}, "payload.n"),
        ({"n": {"nested": 1}}, "payload.n"),
        ({"comment": 5}, "payload.comment"),
    ],
)
def test_payload_errors_name_the_key(path: str, payload: dict[str, Any], field: str) -> None:
    [result] = BULKS[path].encode([{"source": "s", "type": "t", "payload": payload}], now=NOW)
    assert isinstance(result, Refused) and result.error is not None
    assert field in str(result.error)

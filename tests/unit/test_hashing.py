"""compute_hash against the fixed vectors checked into the repo."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from importlib import resources

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import FeedbackEvent, canonical_json, compute_hash
from schemas.hashing import canonical_content

VECTORS = json.loads(resources.files("schemas").joinpath("vectors/hash_vectors.json").read_text("utf-8"))


@pytest.mark.parametrize("case", VECTORS, ids=[c["name"] for c in VECTORS])
def test_vector_canonical_form_and_hash(case: dict) -> None:
    event = FeedbackEvent.model_validate(case["event"])
    assert canonical_json(event).decode("utf-8") == case["canonical"]
    assert compute_hash(event) == case["sha256"]
    assert event.hash == case["sha256"]
    # The canonical form is plain sorted, compact JSON: the stdlib writes the same bytes.
    stdlib = json.dumps(canonical_content(event), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert stdlib == case["canonical"]
    assert hashlib.sha256(case["canonical"].encode("utf-8")).hexdigest() == case["sha256"]


def test_event_id_and_client_ip_do_not_change_the_hash() -> None:
    by_name = {c["name"]: c for c in VECTORS}
    assert by_name["minimal"]["sha256"] == by_name["client_ip_and_event_id_do_not_count"]["sha256"]


def test_every_content_field_changes_the_hash() -> None:
    base = FeedbackEvent.model_validate(VECTORS[1]["event"])
    changes = {
        "source": "other",
        "type": "thumbs",
        "severity": "error",
        "user_id": "u-43",
        "session_id": "s-8",
        "interaction_id": "i-10",
        "model_version": "m2",
        "prompt_version": "p4",
        "value": 0.25,
        "confidence": 0.5,
        "tags": ["a", "b"],
        "idempotency_key": "k-2",
        "payload": {"stars": 5},
        "ts": "2026-06-30T23:59:59.123457Z",
    }
    for field, value in changes.items():
        changed = {**base.to_json_dict(), field: value, "hash": ""}
        assert compute_hash(FeedbackEvent.model_validate(changed)) != base.hash, field


def test_offset_timestamps_hash_as_the_same_utc_instant() -> None:
    a = FeedbackEvent(source="s", type="t", ts="2026-03-01T01:30:00+02:00")
    b = FeedbackEvent(source="s", type="t", ts="2026-02-28T23:30:00Z")
    c = FeedbackEvent(source="s", type="t", ts="2026-02-28T23:30:00")  # naive: taken as UTC
    assert a.hash == b.hash == c.hash


def test_same_hash_in_a_fresh_process_with_another_hash_seed() -> None:
    code = (
        "import json,sys; from schemas import FeedbackEvent; "
        "cases=json.load(sys.stdin); print(json.dumps([FeedbackEvent.model_validate(c['event']).hash for c in cases]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(VECTORS),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        timeout=60,
    )
    assert json.loads(out.stdout) == [c["sha256"] for c in VECTORS]


def test_gate_annotations_do_not_change_the_hash() -> None:
    base = FeedbackEvent.model_validate(VECTORS[0]["event"])
    annotated = FeedbackEvent.model_validate(
        {**base.to_json_dict(), "hash": "", "sample_rate": 0.5, "text_dropped": True}
    )
    assert annotated.hash == base.hash


def _hash_as_first_written(event: FeedbackEvent) -> str:
    """compute_hash as first written (before it was tuned for speed): the tuned one must agree."""
    content = {
        "ts": event.ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "source": event.source,
        "type": event.type,
        "severity": event.severity.value,
        "payload": event.payload.flat(),
        "user_id": event.user_id,
        "session_id": event.session_id,
        "interaction_id": event.interaction_id,
        "model_version": event.model_version,
        "prompt_version": event.prompt_version,
        "value": event.value,
        "confidence": event.confidence,
        "tags": event.tags,
        "idempotency_key": event.idempotency_key,
    }
    data = orjson.dumps({k: v for k, v in content.items() if v is not None}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(data).hexdigest()


_ids = st.none() | st.text(min_size=1, max_size=20)


@settings(max_examples=300, deadline=None)
@given(
    ts=st.datetimes(datetime(1970, 1, 2), datetime(2261, 12, 31), timezones=st.none() | st.timezones()),
    payload=st.dictionaries(
        st.text(min_size=1, max_size=10).filter(lambda k: k != "extra"),
        st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20),
        max_size=5,
    ).filter(lambda p: all(isinstance(p.get(k), str | None) for k in ("text", "comment", "corrected_response"))),
    fields=st.fixed_dictionaries({}, optional={
        "user_id": _ids, "session_id": _ids, "interaction_id": _ids, "model_version": _ids, "prompt_version": _ids,
        "idempotency_key": _ids, "value": st.none() | st.floats(-1, 1), "confidence": st.none() | st.floats(0, 1),
        "tags": st.lists(st.text(max_size=10), max_size=3), "severity": st.sampled_from(["info", "error"]),
        "client_ip": st.none() | st.text(max_size=10)}),
)  # fmt: skip
def test_hash_equals_the_first_written_formula(ts: datetime, payload: dict, fields: dict) -> None:
    event = FeedbackEvent.model_validate({"source": "s", "type": "t", "ts": ts, "payload": payload, **fields})
    assert event.hash == compute_hash(event) == _hash_as_first_written(event)

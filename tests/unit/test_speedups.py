"""The C hot path (schemas/_speedups.c) against its Python reference: SHA-256 against hashlib,
canonical JSON against orjson, the content hash against content_of + orjson + hashlib.
(The C Avro encoder is compared with fastavro in test_fast_encode.py.)"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import FeedbackEvent, hashing
from schemas.hashing import content_hash, content_of, hash_content

speedups = hashing._speedups


def test_the_extension_is_built() -> None:
    assert speedups is not None, "schemas._speedups is not built: `make setup` builds it (needs a C compiler)"


# Both compressions: the CPU's SHA extensions (used when present, SHA_NI says so) and portable C.
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_sha256_equals_hashlib(data: bytes) -> None:
    expected = hashlib.sha256(data).hexdigest()
    assert speedups.sha256_hex(data) == speedups.sha256_hex(data, True) == expected


@pytest.mark.parametrize("n", [0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 128, 1000, 100_000])
def test_sha256_at_the_padding_edges(n: int) -> None:
    data = bytes(range(256)) * (n // 256 + 1)
    expected = hashlib.sha256(data[:n]).hexdigest()
    assert speedups.sha256_hex(data[:n]) == speedups.sha256_hex(data[:n], True) == expected


# Every character class orjson escapes differently: quotes, backslash, the short escapes,
# other control characters, DEL, non-ASCII, astral planes.
_text = st.text(alphabet=st.sampled_from('"\\/\b\f\n\r\t\x00\x01\x1f\x7f aZé\u2028\U0001f600'), max_size=12) | st.text(
    max_size=12
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(value=_json)
def test_canonical_json_equals_orjson_with_sorted_keys(value: Any) -> None:
    assert speedups.canonical_json(value) == orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


class _Kind(StrEnum):
    a = "a"


@pytest.mark.parametrize("odd", [2**63, -(2**63) - 1, _Kind.a, ("a", "b"), b"bytes", "\ud800"])
def test_values_it_does_not_handle_are_refused_not_written(odd: Any) -> None:
    """The C writer gives up (a ValueError) rather than write anything orjson might write otherwise."""
    with pytest.raises(ValueError):
        speedups.canonical_json({"k": odd})


@settings(max_examples=300, deadline=None)
@given(
    payload=st.dictionaries(st.text(min_size=1, max_size=8), _json, max_size=4),
    fields=st.fixed_dictionaries({}, optional={
        "user_id": st.none() | _text, "value": st.none() | st.floats(-1, 1), "confidence": st.none() | st.floats(0, 1),
        "idempotency_key": st.none() | _text, "tags": st.lists(_text, max_size=3)}),
    ts_text=st.none() | st.just("2026-11-23T06:00:00.000001Z"),
)  # fmt: skip
def test_content_hash_equals_content_of_then_hash_content(payload: dict, fields: dict, ts_text: str | None) -> None:
    event = {"ts": datetime(2026, 11, 23, 6, tzinfo=UTC), "source": "s", "type": "t",
             "severity": FeedbackEvent.model_fields["severity"].default, "tags": [], **fields}  # fmt: skip
    expected = hash_content(content_of(event, payload, ts_text))
    assert speedups.content_hash(event, payload, ts_text or "2026-11-23T06:00:00.000000Z", hashing._LAYOUT) == expected
    assert content_hash(event, payload, ts_text) == expected


def test_content_hash_falls_back_for_values_it_leaves_to_orjson() -> None:
    event = {"ts": datetime(2026, 11, 23, 6, tzinfo=UTC), "source": "s", "type": "t",
             "severity": FeedbackEvent.model_fields["severity"].default, "tags": []}  # fmt: skip
    payload = {"big": 2**64 - 1}  # orjson writes an unsigned 64-bit int; the C writer leaves it
    with pytest.raises(ValueError):
        speedups.content_hash(event, payload, "2026-11-23T06:00:00.000000Z", hashing._LAYOUT)
    assert content_hash(event, payload) == hash_content(content_of(event, payload))

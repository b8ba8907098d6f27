"""Routing, pure: where each decision goes, and how a batch's records are grouped."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from schemas.envelope import position, unpack
from stream_processors.gate_step import GateConfig, GateResult, gate_step
from stream_processors.outputs import partition_for
from stream_processors.routing import (
    GROUP_MAX,
    decode_list,
    group_by_partition,
    group_increments,
    group_outcomes,
    route_gate,
)
from stream_processors.state_steps import BiasIncrement, Outcome
from stream_processors.triage import TriageRules

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)
RULES = TriageRules()


def _record(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "event_id": "e-1", "ts": NOW - timedelta(seconds=5), "source": "dream_ui", "type": "thumbs",
        "severity": "info", "payload": {"text": None, "comment": None, "corrected_response": None,
                                        "extra": {"direction": "up"}},
        "user_id": "alice", "session_id": None, "interaction_id": None, "model_version": "m-1",
        "prompt_version": None, "value": None, "confidence": None, "tags": [], "idempotency_key": None,
        "client_ip": None, "sample_rate": None, "text_dropped": False, "propagation_weight": None, "hash": "h",
    }  # fmt: skip
    base.update(kw)
    return base


def _route(record: dict[str, object], result: GateResult, *, envelope: bool = False, enrich: bool = True):  # type: ignore[no-untyped-def]
    return route_gate(record, result, topic="raw", partition=3, offset=7, position=position(7, 2),
                      envelope=envelope, now=NOW, rules=RULES, enrich=enrich)  # fmt: skip


def _decide(record: dict[str, object]) -> GateResult:
    return gate_step(dict(record), offset=position(7, 2), now=NOW, config=GateConfig(pseudonym_key=b"k" * 16),
                     subject_state=None, seen=None)  # fmt: skip


def test_kept_events_go_clean_or_through_the_join_with_their_outcome() -> None:
    plain = _route(_record(), _decide(_record()))
    assert plain.target == "clean" and plain.key.startswith(b"u_") and plain.triage is None
    ts_s = (NOW - timedelta(seconds=5)).timestamp()
    assert plain.outcome == Outcome("dream_ui", "thumbs", "info", "accepted", True, ts_s, "m-1", 3, position(7, 2))
    tracked = _record(interaction_id="i-9")
    joined = _route(tracked, _decide(tracked))
    assert joined.target == "enrich" and joined.key == b"i-9" and joined.event is not None
    assert _route(tracked, _decide(tracked), enrich=False).target == "clean"
    veto = _record(type="veto", severity="critical", source="guardian", user_id=None, payload={
        "text": None, "comment": None, "corrected_response": None, "extra": {}})  # fmt: skip
    routed = _route(veto, _decide(veto))
    assert routed.key == b"guardian" and routed.triage is not None and routed.triage.reason == "type veto"


def test_refusals_become_rejection_rows_naming_the_event_position_in_envelopes() -> None:
    future = _record(ts=NOW + timedelta(hours=1))
    single = _route(future, _decide(future))
    assert single.target == "rejected" and single.reason == "invalid" and single.key == b"dream_ui"
    assert single.rejection is not None and single.rejection["offset"] == 7 and single.rejection["field"] == "ts"
    assert single.outcome is not None and single.outcome.outcome == "invalid" and not single.outcome.kept
    enveloped = _route(future, _decide(future), envelope=True)
    assert enveloped.rejection is not None and enveloped.rejection["offset"] == position(7, 2)
    dup = _route(_record(), GateResult("duplicate"))
    assert dup.reason == "duplicate" and dup.outcome is not None and dup.outcome.outcome == "duplicate"
    assert _route(_record(), GateResult("sampled_out")).target == "sampled_out"


def test_outcomes_and_increments_are_one_message_per_key_in_order() -> None:
    outcomes = [Outcome(src, "thumbs", "info", "accepted", True, 1.0, None, 0, i) for i, src in enumerate("abab")]
    grouped = dict(group_outcomes(outcomes))
    assert list(grouped) == [b"a", b"b"]
    assert [o.offset for o in decode_list(grouped[b"b"], lambda d: Outcome(**d))] == [1, 3]
    many = group_outcomes([outcomes[0]] * (2 * GROUP_MAX + 1))  # a busy source: several messages, none too big
    assert [len(orjson.loads(v)) for _, v in many] == [GROUP_MAX, GROUP_MAX, 1]
    incs = [BiasIncrement(k, "s", "warn", 1.0, 0.0, 0, i) for i, k in enumerate(["x", "y", "x"])]
    assert {k: [i["offset"] for i in orjson.loads(v)] for k, v in group_increments(incs)} == {b"x": [0, 2], b"y": [1]}


def test_group_by_partition_keeps_each_partitions_order_and_the_partitioner() -> None:
    messages = [(f"i-{i % 7}".encode(), f"v{i}".encode()) for i in range(3000)]
    groups = group_by_partition(messages, 5, partition_for)
    got: dict[int, list[bytes]] = {}
    for p, key, envelope in groups:
        items = unpack(envelope)
        assert partition_for(key, 5) == p and len(items) <= 1000
        got.setdefault(p, []).extend(items)
    want: dict[int, list[bytes]] = {}
    for key, value in messages:
        want.setdefault(partition_for(key, 5), []).append(value)
    assert got == want


# Kafka's own test vectors (UtilsTest.testMurmur2): the Java client's signed 32-bit hashes.
JAVA_MURMUR2 = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
                b"a-little-bit-longer-string": -1486304829, b"abc": 479470107,
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971}  # fmt: skip


@pytest.mark.parametrize("key,java_hash", JAVA_MURMUR2.items())
def test_partition_for_is_kafkas_java_partitioner(key: bytes, java_hash: int) -> None:
    for partitions in (1, 6, 12, 1000):  # toPositive(murmur2(key)) % n, as the Java client and librdkafka
        assert partition_for(key, partitions) == (java_hash & 0x7FFFFFFF) % partitions


@pytest.mark.parametrize("value", [b"[]", b"3", b"[1]", b"not json"])
def test_decode_list_refuses_anything_but_objects(value: bytes) -> None:
    with pytest.raises(ValueError):
        decode_list(value, dict)


def test_the_c_murmur2_is_aiokafkas() -> None:
    speedups = pytest.importorskip("schemas._speedups")  # built by `make setup` (a C compiler is there)
    from aiokafka.partitioner import murmur2

    rng = random.Random(5)
    keys = [b"", b"a", b"ab", b"abc", b"abcd"] + [rng.randbytes(rng.randrange(0, 64)) for _ in range(5000)]
    assert [speedups.murmur2(k) for k in keys] == [murmur2(k) for k in keys]
    assert speedups.murmur2(bytearray(b"foobar")) == murmur2(b"foobar")

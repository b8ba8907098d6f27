"""A batch replayed after a crash, on the new output path: envelopes in, grouped messages out.

The agents' batch steps are driven directly (``FeedbackApp.handlers``) with captured outputs,
so a crash can be placed exactly: after the outputs were flushed but before the tables' local
stores were written, or after both. Either way the replay makes the same decisions and no
table counts anything twice.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from pipeline.settings import Settings
from schemas.bulk import Accepted, BulkEncoder
from schemas.envelope import pack_many, unpack
from schemas.serde import AvroSerde
from stream_processors.app import FeedbackApp, create_app
from stream_processors.outputs import CapturedOutputs

EVENTS = AvroSerde()
RAW = "feedback.raw.v1"
NOW = float(int(time.time()))  # message time: the gate's "now", the same on a replay


class Crash(Exception):
    pass


class CrashingOutputs(CapturedOutputs):
    """Captured outputs whose next flush can be made to fail after the messages were 'sent'."""

    crash_next_flush = False

    def flush(self) -> None:
        super().flush()
        if self.crash_next_flush:
            self.crash_next_flush = False
            raise Crash


def _app(
    tmp_path: Path, store: str = "rocksdb", **overrides: Any
) -> tuple[FeedbackApp, CrashingOutputs, list[BaseException]]:
    base: dict[str, Any] = {
        "table_store": store, "state_dir": tmp_path, "pseudonym_key": "replay-test-key-0123",
        "worker_metrics_port": 0, "rate_limit_per_minute": 3, "bias_publish_interval_s": 0.0,
    }  # fmt: skip
    settings = Settings(**{**base, **overrides})
    outputs = CrashingOutputs(partition_count=3)
    fatal: list[BaseException] = []
    fa = create_app(settings, outputs=outputs, on_fatal=fatal.append)
    fa.app.finalize()
    return fa, outputs, fatal


@functools.cache  # one batch (one set of event ids) for every run of the module
def _raw_batch(now: float) -> list[SimpleNamespace]:
    """Two envelopes and one single-event message on partition 1: kept, rate-limited, duplicate,
    directive-feeding and triaged events, some naming an interaction."""
    items: list[dict[str, Any]] = []
    for i in range(60):
        kind = ("thumbs", "bad_output", "veto", "latency", "rating")[i % 5]
        payload = {"thumbs": {"direction": "down"}, "rating": {"stars": 2}}.get(kind, {})
        items.append({"source": ("oracle", "mesh")[i % 2], "type": kind, "user_id": f"u{i % 7}", "payload": payload,
                      "severity": "error" if kind == "bad_output" else "info",
                      "interaction_id": f"i-{i % 11}" if i % 3 == 0 else None})  # fmt: skip
    items.append(dict(items[1]))  # a duplicate of a content-hashed event (same id-less content, same ts)
    sent_at = datetime.fromtimestamp(now - 1, UTC)
    encoded = [r for r in BulkEncoder(EVENTS).encode(items, now=sent_at) if isinstance(r, Accepted)]
    values = [a.value for a in encoded]
    messages = [(env, None) for env, _ in pack_many(values[:30])] + [(values[30], None)]
    messages += [(env, None) for env, _ in pack_many(values[31:])]

    def message(offset: int, value: bytes) -> SimpleNamespace:
        return SimpleNamespace(topic=RAW, partition=1, offset=offset, key=b"k", value=value, timestamp=now)

    return [SimpleNamespace(message=message(100 + k, v)) for k, (v, _) in enumerate(messages)]


def _state(fa: FeedbackApp) -> dict[str, Any]:
    return {name: dict(t.items()) for name, t in fa.tables.items()}


def _decided(outputs: CapturedOutputs, topics: Any) -> Counter[str]:
    """Each raw position's decision, from the grouped outcomes messages."""
    out: Counter[str] = Counter()
    for _, value, _ in outputs.sent.get(topics.outcomes, []):
        for o in orjson.loads(value):
            out[f"{o['partition']}:{o['offset']}:{o['outcome']}"] += 1
    return out


def _cascade(fa: FeedbackApp, outputs: CapturedOutputs, start: dict[str, int]) -> dict[str, int]:
    """Feed what the gate produced (since ``start``) to reputation, then bias; returns the new marks."""
    marks = {}
    for agent, topic in (("reputation", fa.topics.outcomes), ("bias", fa.topics.bias_input)):
        sent = outputs.sent.get(topic, [])
        events = [
            SimpleNamespace(message=SimpleNamespace(topic=topic, partition=0, offset=i, key=k, value=v, timestamp=None))
            for i, (k, v, _) in enumerate(sent)
        ][start.get(topic, 0) :]  # fmt: skip
        fa.handlers[agent](events)
        marks[topic] = len(sent)
    return marks


@pytest.mark.parametrize("crash", ["after_flush_before_store", "after_everything"])
def test_a_replayed_batch_changes_no_table_twice(tmp_path: Path, crash: str) -> None:
    calm, calm_out, _ = _app(tmp_path / "calm")
    calm.handlers["gate"](_raw_batch(NOW))
    marks = _cascade(calm, calm_out, {})
    assert not any(t.startswith("feedback.dlq") for t in calm_out.sent)

    fa, outputs, fatal = _app(tmp_path / "crashed")
    if crash == "after_flush_before_store":
        outputs.crash_next_flush = True  # every output of the batch is out, the local stores are not written
        with pytest.raises(Crash):
            fa.handlers["gate"](_raw_batch(NOW))
    else:
        fa.handlers["gate"](_raw_batch(NOW))
    fa.handlers["gate"](_raw_batch(NOW))  # the restarted worker reads the batch again
    first = _cascade(fa, outputs, {})
    _cascade(fa, outputs, first)  # and the state agents see their input replayed too

    assert _state(fa)["subjects"] == _state(calm)["subjects"]
    assert _state(fa)["seen"] == _state(calm)["seen"]
    assert _state(fa)["reputation"] == _state(calm)["reputation"]
    assert _state(fa)["bias"] == _state(calm)["bias"]
    # Every decision was made twice, and made the same both times.
    once, twice = _decided(calm_out, calm.topics), _decided(outputs, fa.topics)
    assert set(twice) == set(once) and all(n == 2 for n in twice.values()) and sum(once.values()) == 61
    # 7 subjects with a burst of 3 each (same arrival time: no refill); the copy is a duplicate first.
    assert Counter(o.split(":")[2] for o in once) == {"accepted": 7 * 3, "rate_limited": 60 - 7 * 3, "duplicate": 1}
    rep = _state(calm)["reputation"]
    assert sum(v["observations"] for v in rep.values()) == 61  # once per event, whatever the replays
    assert sum(v["events"] for v in _state(fa)["bias"].values()) == sum(
        v["events"] for v in _state(calm)["bias"].values()
    )

    # Outputs: the same clean events each time; enrich events went as envelopes per partition.
    def clean_ids(out: CapturedOutputs) -> list[str]:
        direct = [EVENTS.decode(v)["event_id"] for _, v, _ in out.sent.get(calm.topics.clean, [])]
        joined = [EVENTS.decode(b)["event_id"] for _, v, _ in out.sent.get(calm.topics.enrich, []) for b in unpack(v)]
        return sorted(direct + joined)

    assert clean_ids(outputs) == sorted(clean_ids(calm_out) * 2)
    assert all(p is not None for _, _, p in outputs.sent[calm.topics.enrich])
    assert marks and not fatal

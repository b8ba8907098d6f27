"""Erasure (``feedback forget``) in the worker's agents, with Faust's test context (no broker):
the gate drops a subject's rate-limit entry on a null-valued marker, the interactions agent
drops a tombstoned interaction, the triage agent erases an item and tombstones it."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from schemas.triage_records import TriageCommand, decode_command
from stream_processors.redact import pseudonymize
from tests.unit.test_agents import KEY, T0, TOPICS, Harness, _event, _interaction


def test_the_rate_limit_table_is_keyed_by_pseudonym_and_a_marker_erases_the_entry(tmp_path: Path) -> None:
    h = Harness(tmp_path, rate_limit_per_minute=1000)
    alice, bob = (pseudonymize(u, KEY.encode()) for u in ("alice", "bob"))
    msgs = [_event(0, user_id="alice"), _event(1, user_id="bob"), _event(2, user_id="alice", payload={})]
    asyncio.run(h.feed("gate", msgs, lambda: len(h.sent[TOPICS.outcomes]) >= len(msgs)))
    assert set(h.table("subjects")) == {alice, bob}  # never the id in clear
    assert all("partition" in v for v in h.table("subjects").values())

    # The marker names the user as sent (or the pseudonym); it reaches every partition.
    markers = [(b"alice", None, 0.0), (bob.encode(), None, 0.0)]
    asyncio.run(h.feed("gate", markers, lambda: not h.table("subjects")))
    assert h.table("subjects") == {}
    assert h.metric("feedback_erased_total", table="subjects") == 2
    assert not h.sent[TOPICS.dlq]  # a marker is not poison
    assert len(h.sent[TOPICS.outcomes]) == len(msgs)  # and not an event


def test_an_interaction_tombstone_drops_the_context(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    t0 = T0 - timedelta(hours=1)
    tracked = [_interaction("i-1", t0, model_version="m-1"), _interaction("i-2", t0, model_version="m-2")]

    async def run() -> None:
        await h.feed("interactions", tracked, lambda: len(h.table("interactions")) == 2)
        await h.feed("interactions", [(b"i-1", None, t0.timestamp())], lambda: "i-1" not in h.table("interactions"))

    asyncio.run(run())
    assert list(h.table("interactions")) == ["i-2"]
    assert h.metric("feedback_erased_total", table="interactions") == 1
    assert not h.sent[TOPICS.dlq]


def test_an_erase_command_removes_the_triage_item_and_tombstones_it(tmp_path: Path) -> None:
    h = Harness(tmp_path, rate_limit_per_minute=1000)
    msgs = [
        _event(0, source="guardian", type="veto", severity="critical", user_id="g1"),
        _event(1, source="oracle", type="bad_output", severity="error", user_id="o1"),
    ]
    asyncio.run(h.feed("gate", msgs, lambda: len(h.sent[TOPICS.outcomes]) >= len(msgs)))
    enqueued = [decode_command(v) for _, v in h.sent[TOPICS.triage_commands]]
    gone = enqueued[0].triage_id
    erase = TriageCommand("erase", gone, T0.timestamp() + 60, by="forget")
    late_label = TriageCommand("label", gone, T0.timestamp() + 61, tag="bug", by="ana")  # after the erasure
    commands = [(c.triage_id.encode(), c.to_bytes(), 0.0) for c in [*enqueued, erase, late_label]]
    asyncio.run(h.feed("triage", commands, lambda: gone not in h.table("triage") and len(h.table("triage")) == 1))

    assert list(h.table("triage")) == [enqueued[1].triage_id]
    latest = {k: v for k, v in h.sent[TOPICS.triage]}  # the compacted view: latest value per key
    assert latest[gone.encode()] is None and latest[enqueued[1].triage_id.encode()] is not None
    assert h.metric("feedback_erased_total", table="triage") == 1
    assert h.metric("feedback_triage_total", op="label") == 0  # a label for an erased item changes nothing

"""The triage queue's pure steps: what needs a human, and how commands change an item."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.triage_records import TriageCommand, decode_command, decode_item
from stream_processors.triage import TriageRules, enqueue_command, needs_triage, triage_apply

RULES = TriageRules()


def _rec(**kw: Any) -> dict[str, Any]:
    return {"event_id": "e-1", "source": "oracle", "type": "thumbs", "severity": "info", "value": -1.0, **kw}


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (_rec(type="veto"), "type veto"),
        (_rec(type="correction"), "type correction"),
        (_rec(severity="warn"), "severity warn"),
        (_rec(severity="critical"), "severity critical"),
        (_rec(), None),
        (_rec(severity="debug"), None),
    ],
)
def test_rules_pick_types_and_severities(record: dict[str, Any], why: str | None) -> None:
    assert needs_triage(record, RULES) == why


def test_rules_are_configurable() -> None:
    by_type_only = TriageRules(types=frozenset({"rating"}), min_severity=None)
    assert needs_triage(_rec(severity="critical"), by_type_only) is None
    assert needs_triage(_rec(type="rating"), by_type_only) == "type rating"
    assert needs_triage(_rec(severity="error"), TriageRules(min_severity="error")) == "severity error"


def _run(commands: list[TriageCommand], start: int = 0) -> tuple[dict[str, Any] | None, list[str]]:
    item, noisy = None, []
    for offset, command in enumerate(commands, start):
        new, source = triage_apply(item, command, offset, RULES)
        item = new or item
        if source:
            noisy.append(source)
    return item, noisy


def test_enqueue_label_resolve_keeps_the_history_and_order() -> None:
    enqueue = enqueue_command(_rec(type="veto"), "type veto", arrived_s=100.0)
    label = TriageCommand("label", "e-1", 200.0, tag="noise", note="spam from +1 415 555 0100", by="ana")
    resolve = TriageCommand("resolve", "e-1", 300.0, by="ana")
    item, noisy = _run([enqueue, label, resolve])
    assert item is not None
    assert (item["status"], item["label"], item["version"], item["created_s"], item["updated_s"]) == (
        "resolved", "noise", 3, 100.0, 300.0,
    )  # fmt: skip
    assert item["note"] == "spam from [PHONE]"  # notes are redacted like payloads
    assert [h["op"] for h in item["history"]] == ["enqueue", "label", "resolve"]
    assert noisy == ["oracle"]  # the noise label counts against the source


def test_replays_change_nothing_twice_but_report_noise_again() -> None:
    enqueue = enqueue_command(_rec(type="veto"), "type veto", arrived_s=100.0)
    label = TriageCommand("label", "e-1", 200.0, tag="noise")
    item, _ = _run([enqueue, label])
    assert item is not None
    new, source = triage_apply(item, label, 1, RULES)  # the same command at the same offset
    assert new is None and source == "oracle"  # reputation drops it by its origin offset
    # The gate replayed: the same event enqueued again (a later offset) does not reset the item.
    assert triage_apply(item, enqueue, 5, RULES) == (None, None)


def test_commands_for_unknown_items_change_nothing() -> None:
    assert triage_apply(None, TriageCommand("resolve", "nope", 1.0), 0, RULES) == (None, None)
    assert triage_apply(None, TriageCommand("label", "nope", 1.0, tag="noise"), 0, RULES) == (None, None)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"{not json", "not JSON"),
        (b'{"op": "delete", "triage_id": "x", "at_s": 1}', "op"),
        (b'{"op": "label", "triage_id": "x", "at_s": 1, "tag": "Bad Tag!"}', "tag"),
        (b'{"op": "label", "triage_id": "", "at_s": 1, "tag": "ok"}', "triage_id"),
        (b'{"op": "resolve", "triage_id": "x", "at_s": 1, "colour": "red"}', "unexpected"),
    ],
)
def test_bad_commands_are_refused_naming_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        decode_command(raw)


def test_records_round_trip() -> None:
    item, _ = _run([enqueue_command(_rec(type="veto"), "type veto", arrived_s=1.0)])
    assert item is not None
    from schemas.triage_records import TriageItem

    state = TriageItem(**{k: v for k, v in item.items() if k != "offset"})
    assert decode_item(state.to_bytes()) == state
    command = TriageCommand("label", "e-1", 2.0, tag="bug", by="ana")
    assert decode_command(command.to_bytes()) == command

"""The triage queue as pure steps: which events need a human, and how commands change an item.

The agent keeps items in a Faust table keyed by triage id (the event id). Commands for one
id share a partition, so the item remembers the offset of the last command it applied and a
replayed command changes nothing twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from schemas.triage_records import TriageCommand, TriageItem
from stream_processors.redact import redact_text

__all__ = ["SEVERITY_ORDER", "TriageRules", "enqueue_command", "needs_triage", "triage_apply"]

SEVERITY_ORDER = ("debug", "info", "warn", "error", "critical")


@dataclass(frozen=True)
class TriageRules:
    types: frozenset[str] = frozenset({"veto", "safety", "bad_output", "correction"})
    min_severity: str | None = "warn"  # None: severity alone never triages
    noise_labels: frozenset[str] = frozenset({"noise"})


def needs_triage(record: Mapping[str, Any], rules: TriageRules) -> str | None:
    """Why a clean event needs a human (``"type veto"``, ``"severity error"``), or None."""
    if record["type"] in rules.types:
        return f"type {record['type']}"
    severity = str(record.get("severity") or "info")
    if rules.min_severity is not None and SEVERITY_ORDER.index(severity) >= SEVERITY_ORDER.index(rules.min_severity):
        return f"severity {severity}"
    return None


def enqueue_command(record: Mapping[str, Any], reason: str, arrived_s: float) -> TriageCommand:
    return TriageCommand(
        op="enqueue", triage_id=str(record["event_id"]), at_s=arrived_s, event_id=str(record["event_id"]),
        source=str(record["source"]), type=str(record["type"]), severity=str(record.get("severity") or "info"),
        value=record.get("value"), reason=reason,
    )  # fmt: skip


def triage_apply(
    stored: Mapping[str, Any] | None, command: TriageCommand, offset: int, rules: TriageRules
) -> tuple[dict[str, Any] | None, str | None]:
    """(the item's new table value or None if unchanged, the source to report as noise or None).

    The noise report is returned for a replayed noise label too: reputation drops it if it
    already counted that command, and a crash between the two writes loses nothing.
    """
    item = TriageItem(**{k: v for k, v in stored.items() if k != "offset"}) if stored else None
    noisy = command.op == "label" and command.tag in rules.noise_labels and item is not None
    noise_source = item.source if noisy and item is not None else None
    if stored is not None and offset <= stored["offset"]:
        return None, noise_source  # replayed
    if command.op == "enqueue":
        if item is not None:
            return None, None  # the same event enqueued again (a replayed gate): already queued
        item = TriageItem(
            triage_id=command.triage_id, event_id=command.event_id, source=command.source, type=command.type,
            severity=command.severity, value=command.value, reason=command.reason, status="open", label="", note="",
            created_s=command.at_s, updated_s=command.at_s, version=1,
            history=[{"op": "enqueue", "at_s": command.at_s, "by": "worker"}],
        )  # fmt: skip
    elif item is None:
        return None, None  # a label or resolve for an id that was never enqueued: nothing to change
    else:
        note = redact_text(command.note) if command.note else item.note
        change = {"op": command.op, "at_s": command.at_s, "by": command.by or "unknown"}
        if command.op == "label":
            change["tag"] = command.tag
            item = dataclasses.replace(item, status="labeled", label=command.tag)
        else:
            item = dataclasses.replace(item, status="resolved")
        item = dataclasses.replace(
            item, note=note, updated_s=command.at_s, version=item.version + 1, history=[*item.history, change]
        )
    # A shallow copy (asdict deep-copies the history): the item is frozen and its history list is
    # never changed in place (a change builds a new one above).
    return {**item.__dict__, "history": list(item.history), "offset": offset}, noise_source

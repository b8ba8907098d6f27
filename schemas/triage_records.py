"""The triage queue's records: commands (the audit log) and items (the current state).

``feedback.triage-commands.v1`` — key: triage id; value: JSON :class:`TriageCommand`, or a
JSON list of commands whose ids share the message's partition (the worker's enqueues).
Every change to the queue is one command: ``enqueue`` (the worker, for an event that
needs a human), ``label`` and ``resolve`` (people, with ``feedback label`` / ``feedback
resolve``) and ``erase`` (``feedback forget``: the item is deleted and tombstoned).
The topic is kept for a year, so who changed what and when stays auditable.

``feedback.triage.v1`` — compacted; key: triage id; value: JSON :class:`TriageItem`,
the item's state after the latest command. The triage id is the event's id.

No payload text and no user id: an item names the event, its source and type, why it
was triaged, and the label/note people gave it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

__all__ = ["TAG_PATTERN", "TriageCommand", "TriageItem", "decode_command", "decode_commands", "decode_item"]

Op = Literal["enqueue", "label", "resolve", "erase"]
Status = Literal["open", "labeled", "resolved"]
TAG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
MAX_NOTE_CHARS = 500


@dataclass(frozen=True)
class TriageCommand:
    op: Op
    triage_id: str
    at_s: float  # when the command was given (enqueue: the event's arrival at the gate)
    tag: str = ""  # label
    note: str = ""  # label / resolve: a short free-text note (redacted by the worker)
    by: str = ""  # who gave it (an operator handle, not a user id)
    # enqueue only: what the item is about
    event_id: str = ""
    source: str = ""
    type: str = ""
    severity: str = ""
    value: float | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        if self.op not in ("enqueue", "label", "resolve", "erase"):
            raise ValueError(f"op: must be enqueue, label, resolve or erase, not {self.op!r}")
        if not self.triage_id or len(self.triage_id) > 200:
            raise ValueError("triage_id: required, at most 200 characters")
        if self.op == "label" and not TAG_PATTERN.match(self.tag):
            raise ValueError("tag: 1-64 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit")
        if len(self.note) > MAX_NOTE_CHARS:
            raise ValueError(f"note: at most {MAX_NOTE_CHARS} characters")

    def to_bytes(self) -> bytes:
        return orjson.dumps(self)  # orjson writes a dataclass as asdict would, without the copy


def decode_command(value: bytes) -> TriageCommand:
    """Raises ``ValueError`` naming the field for anything that is not a valid command."""
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        raise ValueError("not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    try:
        return TriageCommand(**data)
    except TypeError as exc:
        raise ValueError(f"unexpected or missing field ({exc})") from None


def decode_commands(value: bytes) -> list[TriageCommand]:
    """One command, or a JSON list of them (the worker groups the commands it enqueues per
    partition). Raises ``ValueError`` as :func:`decode_command` does, naming the item."""
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        raise ValueError("not JSON") from None
    if not isinstance(data, list):
        return [decode_command(value)]
    if not data:
        raise ValueError("an empty list of commands")
    commands = []
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise ValueError(f"item {index}: not a JSON object")
        try:
            commands.append(TriageCommand(**item))
        except TypeError as exc:
            raise ValueError(f"item {index}: unexpected or missing field ({exc})") from None
        except ValueError as exc:
            raise ValueError(f"item {index}: {exc}") from None
    return commands


@dataclass(frozen=True)
class TriageItem:
    triage_id: str
    event_id: str
    source: str
    type: str
    severity: str
    value: float | None
    reason: str  # why it needs a human, e.g. "type veto" or "severity error"
    status: Status
    label: str
    note: str
    created_s: float  # arrival of the event: the queue's order
    updated_s: float
    version: int  # 1 on enqueue, +1 per command applied
    history: list[dict[str, Any]] = field(default_factory=list)  # op, tag, by, at_s of each change

    def to_bytes(self) -> bytes:
        return orjson.dumps(self)  # orjson writes a dataclass as asdict would, without the copy


def decode_item(value: bytes) -> TriageItem:
    """Raises ``ValueError`` for anything that is not a triage item."""
    data = orjson.loads(value)  # JSONDecodeError is a ValueError
    try:
        return TriageItem(**data)
    except TypeError as exc:
        raise ValueError(f"not a triage item ({exc})") from None

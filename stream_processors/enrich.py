"""Delayed feedback: join clean events to the context ``track()`` published for their interaction.

Two pure steps, kept in a Faust table keyed by ``interaction_id`` by the agents:

* :func:`context_of` turns an ``interaction_v1`` record into the stored context:
  validated, free text redacted with the gate's redaction, and the prompt/response
  snapshots dropped unless text is allowed (ALLOW_TEXT), like ``payload.text``.
* :func:`enrich` adds that context to a clean event and marks how the join went.

The event carries the result in ``payload`` under keys starting with ``interaction_``
(a prefix reserved for the stream: the gate refuses events that set such keys):

``interaction_status``
    ``joined`` (context found and fresh), ``expired`` (found, but the feedback came more
    than ``FEEDBACK_INTERACTION_TTL_S`` after the interaction) or ``unknown`` (never
    tracked, or forgotten). Events without an ``interaction_id`` get no status.
``interaction_tracked_at``, ``interaction_latency_ms``, ``interaction_cost``,
``interaction_source``, ``interaction_prompt``, ``interaction_response``
    The context, when joined. ``model_version`` and ``prompt_version`` are filled from
    the context when the event has none (an explicit value on the event wins).

The content hash is not recomputed: like redaction, enrichment happens after the
hash, which identifies the event as emitted.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import ValidationError

from pipeline.errors import InvalidEvent
from schemas.interaction import Interaction
from stream_processors.redact import redact_text

__all__ = ["RESERVED_PREFIX", "Status", "context_of", "enrich", "newer"]

RESERVED_PREFIX = "interaction_"
Status = Literal["joined", "expired", "unknown"]


def context_of(record: dict[str, Any], *, allow_text: bool, counts: Counter[str] | None = None) -> dict[str, Any]:
    """The table value for one decoded ``interaction_v1`` record (JSON-ready).

    Raises :class:`InvalidEvent` naming the field and the rule for a record that breaks the schema's rules.
    """
    try:
        interaction = Interaction.from_avro(record)
    except ValidationError as exc:
        raise InvalidEvent.first(exc, default="interaction") from None
    context: dict[str, Any] = {
        "ts_s": interaction.ts.timestamp(),
        "source": interaction.source,
        "model_version": interaction.model_version,
        "prompt_version": interaction.prompt_version,
        "latency_ms": interaction.latency_ms,
        "cost": interaction.cost,
        "prompt": None,
        "response": None,
    }
    if allow_text:
        for name in ("prompt", "response"):
            text = getattr(interaction, name)
            context[name] = None if text is None else redact_text(text, counts)
    return context


def newer(stored: dict[str, Any] | None, candidate: dict[str, Any]) -> bool:
    """Whether ``candidate`` replaces ``stored``: the latest interaction time wins, so a
    replayed or out-of-order older record never overwrites a newer one."""
    return stored is None or candidate["ts_s"] >= stored["ts_s"]


def enrich(event: dict[str, Any], context: dict[str, Any] | None, ttl_s: float) -> tuple[dict[str, Any], Status]:
    """``event`` (a clean Avro record with an ``interaction_id``) with its context joined."""
    payload = dict(event["payload"])
    extra = dict(payload.get("extra") or {})
    out = {**event, "payload": payload}
    ts: datetime = event["ts"]
    status: Status
    if context is None:
        status = "unknown"
    elif ts.timestamp() - context["ts_s"] > ttl_s:
        status = "expired"
    else:
        status = "joined"
        extra["interaction_tracked_at"] = datetime.fromtimestamp(context["ts_s"], UTC).isoformat()
        extra["interaction_source"] = context["source"]
        for name in ("latency_ms", "cost", "prompt", "response"):
            if context.get(name) is not None:
                extra[f"interaction_{name}"] = context[name]
        for name in ("model_version", "prompt_version"):
            if out.get(name) is None and context.get(name) is not None:
                out[name] = context[name]
    extra["interaction_status"] = status
    payload["extra"] = extra
    return out, status

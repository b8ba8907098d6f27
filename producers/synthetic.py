"""Synthetic feedback for demos, tests and benchmarks (deterministic for a seed)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from schemas.models import FeedbackEvent

__all__ = ["generate_events"]

_SOURCES = ("dream_ui", "oracle", "mesh", "guardian", "oneiric")
_MODELS = ("m-2026.10", "m-2026.11")
_PROMPTS = ("p-a", "p-b")
_COMMENTS = (
    "Great answer, thanks",
    "Too long",
    "Wrong citation in the second paragraph",
    "Exactly what I needed",
    "Slow to respond",
)


def _payload(kind: str, rng: random.Random) -> dict[str, object]:
    match kind:
        case "thumbs":
            return {"direction": rng.choice(("up", "down")), "comment": rng.choice(_COMMENTS)}
        case "rating":
            return {"stars": rng.randint(1, 5)}
        case "correction":
            return {"corrected_response": "The capital of Australia is Canberra."}
        case "implicit":
            return {
                "signal": rng.choice(("copy", "citation_click", "read_time")),
                "read_time_ms": rng.randint(200, 90_000),
            }
        case "veto":
            return {"reason_code": rng.choice(("pii_leak", "unsafe_advice", "policy"))}
        case "latency":
            return {"latency_ms": rng.randint(800, 12_000)}
        case _:
            return {"detail": rng.choice(_COMMENTS)}


def generate_events(n: int, *, seed: int = 7, now: datetime | None = None) -> Iterator[FeedbackEvent]:
    """``n`` plausible events spread over the last hour before ``now``."""
    rng = random.Random(seed)
    now = now or datetime.now(UTC)
    kinds = ("thumbs", "thumbs", "rating", "correction", "implicit", "veto", "bad_output", "latency", "safety")
    for i in range(n):
        kind = rng.choice(kinds)
        yield FeedbackEvent(
            event_id=f"{seed:04x}-{i:08d}-{rng.getrandbits(32):08x}",
            ts=now - timedelta(seconds=rng.uniform(0, 3600)),
            source="guardian" if kind == "veto" else rng.choice(_SOURCES),
            type=kind,
            severity=rng.choice(("info", "info", "warn", "error")) if kind != "safety" else "critical",
            payload=_payload(kind, rng),
            user_id=f"user-{rng.randint(1, 500)}",
            session_id=f"session-{rng.randint(1, 2000)}",
            interaction_id=f"interaction-{i}",
            model_version=rng.choice(_MODELS),
            prompt_version=rng.choice(_PROMPTS),
            tags=["synthetic"],
        )

"""The project's exception tree.

Every error a user can meet derives from :class:`PipelineError` and carries a
message that says what went wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "InvalidEvent",
    "PipelineError",
    "PoisonEvent",
    "StackError",
    "TransientError",
]


class PipelineError(Exception):
    """Base class for every error raised by the feedback pipeline."""


class ConfigError(PipelineError):
    """A setting is missing or malformed; the message names the setting and the expected form."""


class StackError(PipelineError):
    """The local stack (Kafka, embedded ClickHouse) cannot start or be reached."""


class TransientError(PipelineError):
    """A dependency is temporarily unavailable; retrying later may succeed."""


class InvalidEvent(PipelineError, ValueError):
    """An event breaks the contract. ``field`` and ``rule`` say where and how."""

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}")


class PoisonEvent(PipelineError):
    """Bytes that cannot be decoded into an event. ``reason`` is safe to log (no payload)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)

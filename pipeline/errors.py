"""The project's exception tree.

Every error a user can meet derives from :class:`PipelineError` and carries a
message that says what went wrong and what to do about it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

__all__ = [
    "ConfigError",
    "InvalidEvent",
    "PipelineError",
    "PoisonEvent",
    "StackError",
    "TransientError",
    "field_rules",
]


def field_rules(exc: ValidationError, prefix: str = "", default: str = "event") -> list[tuple[str, str]]:
    """Each error of a pydantic ``ValidationError`` as (dotted field, rule): the field after
    ``prefix`` (``default`` when the error is about the whole object), the rule without
    pydantic's "Value error, " prefix. Never the submitted value."""
    return [
        (prefix + (".".join(str(p) for p in err["loc"]) or default), err["msg"].removeprefix("Value error, "))
        for err in exc.errors()
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

    @classmethod
    def first(cls, exc: ValidationError, prefix: str = "", default: str = "event") -> InvalidEvent:
        """The first of ``exc``'s errors (see :func:`field_rules`)."""
        return cls(*field_rules(exc, prefix, default)[0])


class PoisonEvent(PipelineError):
    """Bytes that cannot be decoded into an event. ``reason`` is safe to log (no payload)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)

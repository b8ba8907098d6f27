"""Settings, errors, logging, metrics, the local stack and the ``feedback`` command."""

from pipeline.errors import (
    ConfigError,
    InvalidEvent,
    PipelineError,
    PoisonEvent,
    StackError,
    TransientError,
)
from pipeline.settings import Settings, get_settings

__all__ = [
    "ConfigError",
    "InvalidEvent",
    "PipelineError",
    "PoisonEvent",
    "Settings",
    "StackError",
    "TransientError",
    "get_settings",
]

"""The ``feedback`` typer app and what every command module shares.

The app lives here, not in :mod:`pipeline.cli`, so that there is exactly one app however
the CLI is started. ``python -m pipeline.cli`` runs ``cli.py`` as ``__main__``, and a
spawned child process (``feedback serve --workers N``) runs it again as ``__mp_main__``.
Command modules that imported ``pipeline.cli`` by name would then load a second copy
halfway through the first and fail on the circular import. They all import from here.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console

from pipeline.logs import configure_logging
from pipeline.settings import Settings, get_settings

__all__ = ["app", "console", "print_json", "settings"]

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Feedback-event pipeline: local stack, producers, worker, sinks."
)
console = Console(stderr=True)


def settings() -> Settings:
    """The settings from the environment, with logging configured from them."""
    loaded = get_settings()
    configure_logging(loaded)
    return loaded


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")

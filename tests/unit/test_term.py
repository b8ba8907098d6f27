"""Event text printed on a terminal: rich markup and control sequences are neutralised."""

from __future__ import annotations

import io
from dataclasses import replace
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from rich.table import Table

from pipeline.ops_cli import letter_cells
from pipeline.query_cli import list_cells
from pipeline.term import plain, safe

HOSTILE = "[/b] [red]alarm[/red] \x1b]8;;http://evil\x07link\x1b]8;;\x07 \x1b[2J\rdone \x9b31m \u202eevil\u202c \x7f"
_CONTROLS = {*range(0x20), 0x7F, *range(0x80, 0xA0), 0x202E, 0x202C}


def _render(*cells: str) -> str:
    out = io.StringIO()
    table = Table(*(f"c{i}" for i in range(len(cells))))
    table.add_row(*cells)
    Console(file=out, width=400, force_terminal=False, color_system=None).print(table)
    return out.getvalue()


def test_plain_shows_every_control_as_a_visible_escape() -> None:
    text = plain(HOSTILE)
    assert not {ord(c) for c in text} & _CONTROLS
    assert "\\x1b]8;;http://evil\\x07link" in text and "\\x1b[2J\\x0ddone" in text
    assert "\\x9b31m" in text and "\\u202eevil\\u202c" in text and "\\x7f" in text
    assert plain("a\tb\nc") == "a b c" and plain("a\nb", newlines=True) == "a\nb"
    assert plain(None) == "" and plain(3) == "3"


def test_safe_text_prints_as_written_through_rich() -> None:
    printed = _render(safe(HOSTILE), safe("trailing backslash \\"), safe("\\[red]x"))
    assert "\x1b" not in printed and "\x07" not in printed and "\r" not in printed
    assert "[/b] [red]alarm[/red]" in printed  # literal, not styles
    assert "trailing backslash \\" in printed and "\\[red]x" in printed


def test_unescaped_markup_is_what_breaks_a_table() -> None:
    """The failure safe() prevents: the same cell unescaped crashes rich (so the test above can fail)."""
    try:
        _render("[/b]")
    except Exception as exc:  # rich.errors.MarkupError
        assert "closing tag" in str(exc)
    else:
        raise AssertionError("rich accepted an unbalanced closing tag; the premise of safe() changed")


@given(st.text(max_size=200))
def test_any_text_renders_without_a_control_byte(text: str) -> None:
    printed = _render(safe(text))
    assert not {ord(c) for c in printed} & (_CONTROLS - {0x0A})


def test_list_cells_are_escaped() -> None:
    row = {
        "ts": datetime(2026, 11, 1, 8, 30, tzinfo=UTC), "source": "s[/b]", "type": "thumbs", "severity": "info",
        "value": 1.0, "model_version": "m\x1b[31m", "prompt_version": None, "interaction_id": "i\r",
        "tags": ["[red]"], "payload_comment": HOSTILE,
    }  # fmt: skip
    cells = list_cells(row)
    printed = _render(*cells)
    assert "\x1b" not in printed and "\r" not in printed
    assert "s[/b]" in printed and "[red]" in printed and "m\\x1b[31m" in printed and "i\\x0d" in printed


def test_dlq_cells_are_escaped() -> None:
    from tests.unit.test_dlq import RAW, _letter

    hostile = replace(_letter(0), stage="gate[/b]", error="bad \x1b[2J [red]")
    printed = _render(*(safe(c) for c in letter_cells(hostile, RAW)))
    assert "\x1b" not in printed and "gate[/b]" in printed

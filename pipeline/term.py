"""Text from event data made safe to print on a terminal.

Every string that came from an event, a Kafka record or a ClickHouse row goes through
:func:`safe` before it reaches rich (table cells, ``console.print``), or through
:func:`plain` before a plain ``write``. Two things are neutralised:

* terminal control: C0 controls (``\\x00``-``\\x1f``, so ESC and with it every CSI/OSC
  sequence, BEL, BS, CR), DEL, C1 controls (``\\x80``-``\\x9f``, among them the 8-bit CSI
  and OSC), and the Unicode bidi overrides/isolates and line separators that reorder or
  break what a reader sees. Each is shown as a visible escape (``\\x1b``, ``\\u202e``) so an
  operator sees that it was there; a tab becomes a space, a newline a space unless asked;
* rich markup: ``[red]``, ``[/b]``, ``[link=...]`` are escaped (``rich.markup.escape``), so
  they print as written and a stray closing tag cannot crash the command.

JSON output needs neither: ``json.dumps`` and ``orjson`` escape every control character.
"""

from __future__ import annotations

from typing import Any

from rich.markup import escape

__all__ = ["plain", "safe"]


def _table(newlines: bool) -> dict[int, str]:
    table = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
    bidi_and_breaks = (0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
    table.update({c: f"\\u{c:04x}" for c in bidi_and_breaks})
    table[0x09] = " "
    table[0x0A] = "\n" if newlines else " "
    return table


_ONE_LINE = _table(newlines=False)
_LINES = _table(newlines=True)


def plain(value: Any, *, newlines: bool = False) -> str:
    """``value`` as text with every terminal control character shown as a visible escape.

    ``None`` is the empty string. A newline is kept only with ``newlines=True`` (else a space).
    For output that is written as is; for rich, use :func:`safe`.
    """
    if value is None:
        return ""
    return str(value).translate(_LINES if newlines else _ONE_LINE)


def safe(value: Any, *, newlines: bool = False) -> str:
    """:func:`plain` with rich markup escaped: for a table cell or a ``console.print`` string."""
    return escape(plain(value, newlines=newlines))

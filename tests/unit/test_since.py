"""The time parser behind --since/--until, and the cell and number formatting of the analyst commands."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.query_cli import list_cells
from pipeline.report import format_change, format_rate, format_value
from pipeline.since import parse_time, to_micros

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "back"),
    [
        ("30m", timedelta(minutes=30)),
        ("1h", timedelta(hours=1)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(weeks=2)),
        ("90s", timedelta(seconds=90)),
        (" 12 H ", timedelta(hours=12)),
        ("0h", timedelta(0)),
    ],
)
def test_relative_durations_count_back_from_now(text: str, back: timedelta) -> None:
    assert parse_time(text, NOW) == NOW - back


def test_iso_dates_and_times_are_utc_instants() -> None:
    assert parse_time("2026-11-01", NOW) == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_time("2026-11-01T08:30", NOW) == datetime(2026, 11, 1, 8, 30, tzinfo=UTC)
    assert parse_time("2026-11-01T08:30:00Z", NOW) == datetime(2026, 11, 1, 8, 30, tzinfo=UTC)
    assert parse_time("2026-11-01T10:30:00+02:00", NOW) == datetime(2026, 11, 1, 8, 30, tzinfo=UTC)
    assert parse_time("2026-11-01 08:30", NOW).tzinfo == UTC
    # now given in another zone: the result is the same instant, in UTC
    assert parse_time("1h", NOW.astimezone(timezone(timedelta(hours=5)))) == NOW - timedelta(hours=1)


@pytest.mark.parametrize("text", ["", "3x", "1y", "-1h", "h", "1.5h", "2026-13-01", "yesterday", "1h30m", "2026/11/01"])
def test_bad_values_raise_one_line_reasons(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_time(text, NOW)
    message = str(info.value)
    assert "\n" not in message and "30m" in message and len(message) < 80


def test_far_back_is_refused() -> None:
    with pytest.raises(ValueError, match="too far back"):
        parse_time("999999999w", NOW)


def test_micros_are_exact() -> None:
    assert to_micros(datetime(1970, 1, 1, 0, 0, 1, 5, tzinfo=UTC)) == 1_000_005
    assert to_micros(NOW) == int(NOW.timestamp()) * 1_000_000


@pytest.mark.parametrize(
    "args",
    [
        ["list", "--since", "3x"],
        ["list", "--limit", "0"],
        ["report", "--period", "year"],
        ["report", "--until", "tomorrow"],
        ["export", "--format", "csv"],
        ["export", "--since", "1d", "--until", "2d"],
        ["export", "--min-value", "2"],
    ],
)
def test_bad_arguments_exit_2_before_any_connection(args: list[str]) -> None:
    # Nothing listens on port 1: reaching ClickHouse would exit 1, not 2.
    result = CliRunner().invoke(app, args, env={"FEEDBACK_CLICKHOUSE_URL": "http://127.0.0.1:1"})
    assert result.exit_code == 2, result.output
    assert "Invalid value" in result.output


@pytest.mark.parametrize("command", ["list", "report", "export", "stats"])
def test_help_has_an_example(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert f"feedback {command}" in result.output and "Example" in result.output


def test_list_cells() -> None:
    row = {
        "ts": datetime(2026, 11, 23, 9, 5, 7, 123456),  # naive: UTC
        "source": "dream_ui",
        "type": "thumbs",
        "severity": "info",
        "value": -1.0,
        "model_version": None,
        "prompt_version": "p-a",
        "interaction_id": "i-9",
        "tags": ["a", "b"],
        "payload_comment": "Wrong   citation\nin the " + "x" * 80,
    }
    cells = list_cells(row)
    assert cells[:9] == ["2026-11-23 09:05:07", "dream_ui", "thumbs", "info", "-1.00", "-", "p-a", "i-9", "a,b"]
    assert cells[9].startswith("Wrong citation in the x") and cells[9].endswith("…") and len(cells[9]) == 50
    assert list_cells({**row, "value": None, "payload_comment": None, "payload_text": "hi"})[4::5] == ["-", "hi"]


def test_report_number_formatting() -> None:
    assert format_value(None) == "-" and format_value(0.12345) == "0.123" and format_value(-1) == "-1.000"
    assert format_rate(None) == "-" and format_rate(0.612) == "61.2%" and format_rate(1) == "100.0%"
    assert format_change(0.5, 0.25) == "+0.250" and format_change(0.1, 0.3) == "-0.200"
    assert format_change(0.75, 0.5, rate=True) == "+25.0 pp"
    assert format_change(None, 0.5) == "n/a" and format_change(0.5, None, rate=True) == "n/a"

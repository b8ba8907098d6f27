"""`feedback status` tells an analyst how to reach the embedded ClickHouse server."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner


def test_status_says_where_the_clickhouse_password_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.cli  # noqa: F401  (registers the commands)
    from pipeline.cli_app import app
    from pipeline.settings import get_settings

    monkeypatch.setenv("FEEDBACK_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("FEEDBACK_CLICKHOUSE_PORT", "18123")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["status"], env={"COLUMNS": "300"})
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "connect to clickhouse: http://127.0.0.1:18123 user default, password in" in text
    assert str(tmp_path / "clickhouse" / "password") in result.output.replace("\n", "")

"""Settings errors and the CLI's refusal to publish invalid events."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import ConfigError
from pipeline.settings import Settings, get_settings


def test_settings_from_env_and_derived_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEEDBACK_KAFKA_PORT", "19092")
    monkeypatch.setenv("FEEDBACK_CLICKHOUSE_URL", "http://ch.internal:8123")
    s = Settings()
    assert s.kafka_bootstrap == "127.0.0.1:19092" and s.uses_local_kafka
    assert s.clickhouse_endpoint == "http://ch.internal:8123" and not s.uses_embedded_clickhouse
    assert Settings(**{k.removeprefix("FEEDBACK_").lower(): v for k, v in s.to_env().items()}) == s


def test_bad_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEEDBACK_KAFKA_PORT", "not-a-port")
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError, match="FEEDBACK_KAFKA_PORT"):
            get_settings()
    finally:
        get_settings.cache_clear()


def test_produce_rejects_invalid_events_naming_field_and_rule_and_publishes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Nothing listens on this port: reaching Kafka at all would fail the test with a timeout.
    monkeypatch.setenv("FEEDBACK_KAFKA_PORT", "1")
    get_settings.cache_clear()
    lines = "\n".join(
        [
            '{"source": "dream_ui", "type": "thumbs"}',
            '{"source": "dream_ui", "type": "thumbs", "severity": "fatal"}',
            '{"source": "dream_ui", "type": "rating", "payload": {"stars": {"n": 4}}}',
            "{not json",
        ]
    )
    try:
        result = CliRunner().invoke(app, ["produce", "-"], input=lines)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2
    err = result.stderr
    assert "line 2: severity:" in err and "'debug', 'info', 'warn', 'error' or 'critical'" in err
    assert "line 3: payload.stars: must be a string, number, boolean or null" in err
    assert "line 4: not valid JSON" in err
    assert not any(x.startswith("invalid event: line 1:") for x in err.splitlines())
    assert "nothing published (3 invalid event(s))" in err

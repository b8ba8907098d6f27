"""Settings errors and the CLI's refusal to publish invalid events."""

from __future__ import annotations

import re

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
    # A child process handed to_env() sees the same settings (dicts travel as JSON, secrets in clear).
    s = Settings(sample_rates={"implicit": 0.25}, pseudonym_key="0123456789abcdef", allow_text=True)
    for name, value in s.to_env().items():
        monkeypatch.setenv(name, value)
    assert Settings() == s


def test_allow_text_accepts_the_seed_name_and_the_prefixed_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().allow_text is False
    monkeypatch.setenv("ALLOW_TEXT", "true")
    assert Settings().allow_text is True
    monkeypatch.delenv("ALLOW_TEXT")
    monkeypatch.setenv("FEEDBACK_ALLOW_TEXT", "1")
    assert Settings().allow_text is True


@pytest.mark.parametrize(
    ("name", "value", "rule"),
    [
        ("FEEDBACK_SAMPLE_RATES", '{"implicit": 1.5}', "must be in [0, 1]"),
        ("FEEDBACK_RATE_LIMIT_OVERRIDES", '{"oracle": 0}', "must be > 0"),
        ("FEEDBACK_BIAS_HALF_LIFE_S", "0", "greater than 0"),
    ],
)
def test_bad_gate_settings_name_the_variable_and_rule(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, rule: str
) -> None:
    monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError, match=f"{name}: .*{re.escape(rule)}"):
            get_settings()
    finally:
        get_settings.cache_clear()


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

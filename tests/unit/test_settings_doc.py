"""The runbook's generated tables agree with the code, and the generator renders what it should."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.settings import PROJECT_ROOT, Settings
from pipeline.settings_doc import (
    FALLBACK_DESCRIPTIONS,
    SECTIONS,
    check_document,
    format_default,
    main,
    render_settings,
    render_topic_retention,
    setting_docs,
    update_document,
)
from schemas.topics import TOPICS

RUNBOOK = PROJECT_ROOT / "docs" / "FEEDBACK_SYSTEM.md"


def test_the_runbook_matches_the_code() -> None:
    # On failure: python -m pipeline.settings_doc --write, and commit the document.
    assert check_document(RUNBOOK) == []


def test_every_setting_is_in_the_table_once_with_a_description() -> None:
    table = render_settings()
    rows = table.splitlines()[2:]
    assert len(rows) == len(Settings.model_fields)
    for name in Settings.model_fields:
        env = f"`FEEDBACK_{name.upper()}`"
        assert sum(env in row for row in rows) == 1, name
    docs = {d.field: d for d in setting_docs()}
    assert all(d.description for d in docs.values())
    assert docs["allow_text"].env == ("FEEDBACK_ALLOW_TEXT", "ALLOW_TEXT")
    assert docs["kafka_port"].default == "`9092`" and docs["kafka_port"].allowed == "≥ 1, ≤ 65535"
    assert docs["path"].default == "`.local/feedback` (in the project folder)"  # not this machine's path
    assert docs["table_store"].allowed == "`rocksdb`, `memory`"
    assert (docs["rate_limit_burst"].type, docs["rate_limit_burst"].default) == ("number", "unset")  # optional


def test_fallback_descriptions_are_only_for_fields_without_one() -> None:
    fields = Settings.model_fields
    stale = [name for name in FALLBACK_DESCRIPTIONS if name not in fields or fields[name].description]
    assert stale == [], f"remove these from FALLBACK_DESCRIPTIONS (the field has its own now, or is gone): {stale}"


class _Tiny(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEEDBACK_")

    port: int = Field(default=80, gt=0, lt=65536, description="A port.")
    mode: Literal["a", "b"] = Field(default="a", description="A | mode.")
    secret: SecretStr = Field(default=SecretStr(""), description="A secret.")
    flag: bool = Field(default=True, validation_alias=AliasChoices("FEEDBACK_FLAG", "FLAG"), description="A flag.")
    rates: dict[str, float] = Field(default_factory=lambda: {"z": 1.0, "a": 0.5}, description="Rates.")
    names: list[str] = Field(default_factory=lambda: ["x"], description="Names.")
    where: Path | None = Field(default=None, description="A path.")


def test_a_settings_class_renders_its_types_defaults_and_constraints() -> None:
    lines = render_settings(_Tiny).splitlines()
    assert lines[:2] == ["| variable | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    assert lines[2:] == [
        "| `FEEDBACK_PORT` | integer | `80` | > 0, < 65536 | A port. |",
        "| `FEEDBACK_MODE` | one of | `a` | `a`, `b` | A \\| mode. |",
        "| `FEEDBACK_SECRET` | secret | empty |  | A secret. |",
        "| `FEEDBACK_FLAG` / `FLAG` | boolean | `true` |  | A flag. |",
        '| `FEEDBACK_RATES` | JSON object | `{"a":0.5,"z":1.0}` |  | Rates. |',
        '| `FEEDBACK_NAMES` | JSON list | `["x"]` |  | Names. |',
        "| `FEEDBACK_WHERE` | path | unset |  | A path. |",
    ]


def test_a_field_without_a_description_is_refused() -> None:
    class Undocumented(BaseSettings):
        mystery: int = 3

    with pytest.raises(ValueError, match="setting mystery has no description"):
        setting_docs(Undocumented)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "unset"),
        ("", "empty"),
        (SecretStr("hidden"), "`hidden`"),
        (False, "`false`"),
        (86400.0, "`86400`"),
        (0.05, "`0.05`"),
        (PROJECT_ROOT / ".local", "`.local` (in the project folder)"),
        (Path("/srv/feedback"), "`/srv/feedback`"),
        ({}, "`{}`"),
    ],
)
def test_format_default(value: object, shown: str) -> None:
    assert format_default(value) == shown


def test_topic_retention_lists_every_topic() -> None:
    table = render_topic_retention()
    for name in TOPICS:
        assert f"| `{name}` |" in table
    assert "| `feedback.raw.v1` | subject: user_id \\| client ip \\| source | delete | 1 day |" in table
    assert "| `feedback.dlq.v1` | original key | delete | 1 day |" in table  # raw bytes: as long as raw


DOC = "intro\n<!-- settings:begin -->\nold table\n<!-- settings:end -->\noutro\n"


def test_update_replaces_only_between_markers_and_is_idempotent() -> None:
    sections = {"settings": lambda: "| new |"}
    once = update_document(DOC, sections)
    assert once.startswith("intro\n<!-- settings:begin -->\n") and once.endswith(
        "| new |\n<!-- settings:end -->\noutro\n"
    )
    assert "old table" not in once
    assert update_document(once, sections) == once
    with pytest.raises(ValueError, match="no <!-- topic-retention:begin -->"):
        update_document(DOC, {"topic-retention": lambda: ""})


def test_check_and_write_on_a_stale_copy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "runbook.md"
    current = RUNBOOK.read_text(encoding="utf-8")
    doc.write_text(
        current.replace("`FEEDBACK_KAFKA_PORT` | integer | `9092`", "`FEEDBACK_KAFKA_PORT` | integer | `9999`")
    )
    assert check_document(doc) == ["settings"]
    assert main([str(doc), "--check"]) == 1
    assert "out of date (settings)" in capsys.readouterr().err
    assert main([str(doc), "--write"]) == 0
    assert doc.read_text(encoding="utf-8") == current and main([str(doc)]) == 0
    assert set(SECTIONS) == {"settings", "topic-retention", "table-retention"}

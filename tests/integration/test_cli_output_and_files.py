"""Hostile event text through the real commands, and the files they write, on the real stack.

Events whose strings carry rich markup and terminal control sequences are put where the
commands read them (ClickHouse rows, the reputation, bias, triage and DLQ topics); every
command that prints event strings runs as the ``feedback`` program and must neither crash
nor let a control byte through. Exports and reports are then checked for 0600/0700 modes,
both through the program and in-process under a permissive umask.
"""

from __future__ import annotations

import os
import re
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from pipeline.export import ExportFilters, export_events
from pipeline.kafka_admin import ensure_topics
from pipeline.query_cli import events_table
from pipeline.report import build_report, write_report
from pipeline.settings import Settings
from schemas.dead_letter import dead_letter
from schemas.serde import AvroSerde
from schemas.state_records import BiasRecord, ReputationRecord, encode_record
from schemas.topics import Topics
from schemas.triage_records import TriageItem
from sinks.clickhouse import EVENT_COLUMNS, ClickHouseWriter, connect, event_row
from sinks.migrations import migrate
from stream_processors.normalize import normalize
from tests.integration.pipeline_procs import run_cli

pytestmark = pytest.mark.integration

HOSTILE = "[/b] [red]x[/red] \x1b]8;;http://evil\x07link\x1b]8;;\x07 \x1b[2J\rgone \x9b2J"
NOW = datetime.now(UTC).replace(microsecond=0)
# A raw control byte in the output: C0 but newline, DEL, C1 (the 8-bit CSI). No colour is
# asked for (no terminal), so rich emits no escape codes of its own.
_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f\x80-\x9f]")


@dataclass(frozen=True)
class Hostile:
    settings: Settings
    out: Path


def _record(event_id: str, ago: timedelta, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": event_id, "ts": NOW - ago, "source": "dream_ui", "type": "thumbs", "severity": "info",
        "payload": {"text": None, "comment": None, "corrected_response": None,
                    "extra": {"direction": "up", "prompt": "What is 2 + 2?", "response": "4"}},
        "user_id": "u_" + "0" * 32, "session_id": None, "interaction_id": f"i-{event_id}",
        "model_version": "m-1", "prompt_version": "p-1", "value": None, "confidence": None, "tags": [],
        "idempotency_key": None, "client_ip": None, "sample_rate": None, "text_dropped": False,
        "propagation_weight": None, "hash": f"h-{event_id}",
    }  # fmt: skip
    base.update(fields)
    return normalize(base)


@pytest.fixture(scope="module")
def hostile(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    tag = uuid.uuid4().hex[:10]
    out = tmp_path_factory.mktemp("hostile")
    settings = stack_settings.model_copy(
        update={"topic_prefix": f"t{tag}.", "clickhouse_database": f"t_{tag}", "path": out / "jsonl"}
    )
    client = connect(settings)
    migrate(client, settings)
    payload = {"text": None, "comment": HOSTILE, "corrected_response": None,
               "extra": {"direction": "down", "prompt": f"Q {HOSTILE}", "response": f"A {HOSTILE}"}}  # fmt: skip
    rows = [
        _record("e1", timedelta(minutes=5), payload=payload, tags=["[red]", "t\x1b[31m"], model_version="m[/b]",
                interaction_id="i\r\x1b[2K", source="src[/b]\x1b]0;title\x07"),
        _record("e2", timedelta(minutes=6), source="dream_ui", type="rating",
                payload={**payload, "extra": {"stars": 5, "prompt": "Name a prime.", "response": "7."}}),
    ]  # fmt: skip
    ClickHouseWriter(client, settings.clickhouse_database, "feedback_events", EVENT_COLUMNS).insert(
        [event_row(r, 0, i) for i, r in enumerate(rows)], "hostile:0:0-1"
    )
    ensure_topics(settings)
    topics = Topics(settings.topic_prefix)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    rep = ReputationRecord(f"rep{HOSTILE}", 0.5, 3, False, 1.0)
    producer.produce(topics.reputation, key=rep.source.encode(), value=encode_record(rep))
    bias = BiasRecord(f"dir{HOSTILE}", "m[/b]\x1b[5m", 0.4, time.time() - 60.0, 3600.0, 2)
    producer.produce(topics.directive_bias, key=bias.key.encode(), value=encode_record(bias))
    item = TriageItem(
        triage_id="tri-1", event_id="e1", source="src[/b]", type="veto", severity="error", value=-1.0,
        reason=f"type veto {HOSTILE}", status="open", label="", note=HOSTILE, created_s=time.time() - 60,
        updated_s=time.time() - 60, version=1,
    )  # fmt: skip
    producer.produce(topics.triage, key=item.triage_id.encode(), value=item.to_bytes())
    letter = dead_letter(stage="gate", error=f"ValueError: {HOSTILE}", topic=topics.raw, partition=0, offset=7,
                         key=b"k", raw=b"raw bytes", now=NOW - timedelta(minutes=1))  # fmt: skip
    producer.produce(topics.dlq, key=b"k", value=AvroSerde("dead_letter_v1").encode(letter))
    assert producer.flush(30) == 0
    yield Hostile(settings, out)


def _clean_run(settings: Settings, *args: str) -> str:
    """The command's stdout and stderr; it must succeed with no raw control byte in either."""
    result = run_cli(settings, *args)
    output = result.stdout + "\n" + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output[-3000:]
    raw = _CONTROL.findall(output)
    assert not raw, f"{args}: raw control bytes {sorted(set(raw))!r} in the output"
    return output


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (("list", "--since", "1h"), ["[/b] [red]x[/red]", "src[/b]", "m[/b]", "[red],t\\x1b[31m"]),
        (("stats",), ["src[/b]\\x1b]0;title\\x07"]),
        (("reputation",), ["rep[/b] [red]x[/red]"]),
        (("bias",), ["dir[/b]"]),
        (("bias", "watch", "--max-seconds", "3"), ["dir[/b] [red]x[/red] \\x1b]8;;http://evil\\x07link"]),
        (("triage",), ["tri-1", "type veto [/b]"]),
        (("dlq", "list", "--since", "1h"), ["ValueError: [/b] [red]x[/red]"]),
    ],
    ids=["list", "stats", "reputation", "bias", "bias-watch", "triage", "dlq-list"],
)
def test_commands_print_hostile_event_text_escaped(hostile: Hostile, args: tuple[str, ...], shown: list[str]) -> None:
    output = _clean_run(hostile.settings, *args)
    flat = re.sub(r"\s*│\s*|\s+", " ", output)  # a long cell may wrap inside its column
    for text in shown:
        assert text in output or text in flat, f"{args}: {text!r} not shown as written"


def test_json_output_keeps_the_text_exactly(hostile: Hostile) -> None:
    import json

    result = run_cli(hostile.settings, "list", "--since", "1h", "--json")
    assert result.returncode == 0 and not _CONTROL.findall(result.stdout.replace("\n", "")), result.stderr
    rows = json.loads(result.stdout)
    assert rows[0]["payload_comment"] == HOSTILE  # escaped by JSON, not changed


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_exports_and_reports_written_by_the_program_are_private(hostile: Hostile) -> None:
    out = hostile.out / "by-program" / "exports"
    for fmt in ("training", "jsonl", "promptfoo"):
        _clean_run(hostile.settings, "export", "--format", fmt, "--since", "1d", "--min-value", "-1",
                   "--output", str(out / f"x-{fmt}.out"))  # fmt: skip
    _clean_run(hostile.settings, "report", "--output", str(hostile.out / "by-program" / "reports" / "week.html"),
               "--format", "html")  # fmt: skip
    report = (hostile.out / "by-program" / "reports" / "week.html").read_text()
    assert "src[/b]\\x1b]0;title\\x07" in report and not _CONTROL.findall(report.replace("\n", ""))
    files = [p for p in (hostile.out / "by-program").rglob("*") if p.is_file()]
    assert len(files) >= 9  # 3 exports + 3 cards + report + 2 charts
    assert {p: oct(_mode(p)) for p in files if _mode(p) != 0o600} == {}
    dirs = [hostile.out / "by-program", out, hostile.out / "by-program" / "reports"]
    assert {str(d): oct(_mode(d)) for d in dirs if _mode(d) != 0o700} == {}


def test_exports_and_reports_are_private_under_a_permissive_umask(hostile: Hostile) -> None:
    """In-process (a library caller): the explicit modes, not the CLI's umask, keep them private;
    a file that was there as 0644 is tightened when it is rewritten."""
    settings = hostile.settings
    old = os.umask(0o022)
    try:
        target = hostile.out / "in-process"
        target.mkdir(mode=0o755)
        os.chmod(target, 0o755)
        existing = target / "train.jsonl"
        existing.write_text("old\n")
        os.chmod(existing, 0o644)
        client = connect(settings)
        filters = ExportFilters(NOW - timedelta(days=1), NOW + timedelta(minutes=1), -1.0, (), False, 0.85)
        result = export_events(client, events_table(settings), "training", existing, filters)
        assert result.written >= 1
        export_events(client, events_table(settings), "jsonl", target / "new" / "all.jsonl", filters)
        data = build_report(client, events_table(settings), "week", NOW + timedelta(minutes=1))
        files = write_report(data, target / "reports" / "week.md", "md", "svg")
    finally:
        os.umask(old)
    written = [existing, result.card, target / "new" / "all.jsonl", target / "new" / "all.card.md", *files]
    assert {str(p): oct(_mode(p)) for p in written if _mode(p) != 0o600} == {}
    assert _mode(target / "new") == _mode(target / "reports") == 0o700
    assert _mode(target) == 0o755  # a folder the caller chose is theirs: not changed
    assert existing.read_text() != "old\n"


def test_a_sink_run_leaves_only_private_files(isolated: Settings) -> None:
    """The real sink process on a JSONL folder that existed with wide bits (and a 0644 file in
    it): afterwards every file there is 0600 and every folder 0700."""
    folder = Path(isolated.path)
    folder.mkdir(parents=True)
    os.chmod(folder, 0o755)
    (folder / "README.txt").write_text("made by hand\n")
    os.chmod(folder / "README.txt", 0o644)
    ensure_topics(isolated)
    serde = AvroSerde()
    producer = Producer({"bootstrap.servers": isolated.kafka_bootstrap})
    for i in range(20):
        record = _record(f"s{i}", timedelta(seconds=i), user_id=f"u_{i:032d}")
        producer.produce(
            Topics(isolated.topic_prefix).clean, key=record["user_id"].encode(), value=serde.encode(record)
        )
    assert producer.flush(30) == 0
    result = run_cli(isolated, "sink", "--idle-exit", "8", env={"FEEDBACK_LOG_LEVEL": "WARNING"}, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    day_files = list(folder.glob("feedback-*.jsonl"))
    assert sum(len(p.read_bytes().splitlines()) for p in day_files) == 20
    modes = {
        str(p): oct(_mode(p)) for p in (folder, *folder.rglob("*")) if _mode(p) != (0o700 if p.is_dir() else 0o600)
    }
    assert modes == {}
    assert _mode(folder) == 0o700 and _mode(folder / "README.txt") == 0o600

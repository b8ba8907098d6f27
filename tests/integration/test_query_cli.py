"""The analyst commands on real data: ``feedback list``, ``stats``, ``report`` and ``export`` run as
the ``feedback`` program against the embedded ClickHouse (and Kafka for reputation and bias), and
their output is checked against the rows inserted."""

from __future__ import annotations

import base64
import json
import re
import socket
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer

from pipeline.kafka_admin import ensure_topics
from pipeline.report import format_change, format_rate, format_value
from pipeline.settings import Settings
from schemas.state_records import BiasRecord, ReputationRecord, encode_record
from schemas.topics import Topics
from sinks.clickhouse import EVENT_COLUMNS, ClickHouseWriter, connect, event_row
from sinks.migrations import migrate
from stream_processors.normalize import normalize
from tests.integration.pipeline_procs import run_cli, run_cli_ok

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n"
NOW = datetime.now(UTC).replace(microsecond=0)
EMAIL = "admin@example.com"


def _record(
    event_id: str,
    ago: timedelta,
    type_: str,
    source: str,
    *,
    extra: dict[str, Any] | None = None,
    model: str | None = "m-new",
    prompt: str | None = "p-a",
    tags: tuple[str, ...] = (),
    interaction: str | None = None,
    comment: str | None = None,
    corrected: str | None = None,
    sample_rate: float | None = None,
) -> dict[str, Any]:
    """An event as the gate leaves it (Avro form, normalized: value and confidence set)."""
    return normalize(
        {
            "event_id": event_id, "ts": NOW - ago, "source": source, "type": type_, "severity": "info",
            "payload": {"text": None, "comment": comment, "corrected_response": corrected, "extra": extra or {}},
            "user_id": "u_" + "0" * 32, "session_id": None, "interaction_id": interaction or f"i-{event_id}",
            "model_version": model, "prompt_version": prompt, "value": None, "confidence": None,
            "tags": list(tags), "idempotency_key": None, "client_ip": None, "sample_rate": sample_rate,
            "text_dropped": False, "propagation_weight": None, "hash": f"h-{event_id}",
        }
    )  # fmt: skip


P1 = "How do I reset my password?"
R1 = f"Open Settings, choose Security, then Reset password. Write to {EMAIL} if the mail does not arrive."
m, h, d = timedelta(minutes=1), timedelta(hours=1), timedelta(days=1)
EVENTS = [
    # current week
    _record("t1", 10 * m, "thumbs", "dream_ui", extra={"direction": "up", "prompt": P1, "response": R1},
            tags=("billing",)),
    _record("t2", 20 * m, "thumbs", "oracle", extra={"direction": "up", "prompt": P1, "response": R1.upper()},
            prompt="p-b", tags=("billing",)),  # a near-duplicate of t1
    _record("r5", 2 * h, "rating", "oracle", tags=("math",),
            extra={"stars": 5, "system": "Be brief.", "prompt": "What is 7 x 6?", "response": "42."}),
    _record("r4", 3 * h, "rating", "dream_ui", model="m-old", prompt="p-b",
            extra={"stars": 4, "prompt": "Name a prime.", "response": "7 is prime."}),
    _record("td", 30 * m, "thumbs", "mesh", model="m-old", prompt="p-b", tags=("math",), comment="Wrong: says 5",
            extra={"direction": "down", "prompt": "What is 2 + 2?", "response": "5"}),
    _record("tu", 40 * m, "thumbs", "mesh", extra={"direction": "up"}),  # no conversation
    _record("corr", 1 * d, "correction", "dream_ui", model="m-old", corrected="Canberra is the capital.",
            extra={"prompt": "Capital of Australia?", "response": "Sydney."}),
    _record("copy", 2 * d, "implicit", "oracle", extra={"signal": "copy"}, sample_rate=0.5),
    _record("veto", 3 * d, "veto", "guardian", model="m-old", extra={"reason_code": "policy"}),
    _record("slow", 5 * d, "latency", "mesh", extra={"latency_ms": 9000}, sample_rate=0.25),
    # i-td's worst comment: td's (non-empty beats r1, the latest and as low, without one; the lower
    # value beats r2's). r2's -0.5 also keeps the month's mean off a rounding boundary (0.1625 with
    # -1 flipped between 0.162 and 0.163 with ClickHouse's summation order).
    _record("r1", 25 * m, "task_success", "oracle", model="m-old", interaction="i-td", extra={"success": False}),
    _record("r2", 5 * d, "rating", "oracle", model="m-old", interaction="i-td", extra={"stars": 2},
            comment="Still says 5"),
    _record("note", 1 * h, "note", "oracle", extra={"detail": "no adapter: no value"}),
    # previous week
    _record("p1", 9 * d, "thumbs", "dream_ui", model="m-old", extra={"direction": "up"}),
    _record("p2", 10 * d, "rating", "oracle", model="m-old", prompt="p-b", extra={"stars": 3}),
    _record("p3", 12 * d, "thumbs", "dream_ui", extra={"direction": "up", "prompt": "Old question?",
                                                       "response": "An old answer."}),
    # before both
    _record("old", 20 * d, "thumbs", "dream_ui", extra={"direction": "up"}),
]  # fmt: skip
BY_ID = {e["event_id"]: e for e in EVENTS}


@dataclass(frozen=True)
class Loaded:
    settings: Settings
    out: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def loaded(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    tag = uuid.uuid4().hex[:10]
    out = tmp_path_factory.mktemp("query_cli")
    settings = stack_settings.model_copy(
        update={"topic_prefix": f"t{tag}.", "clickhouse_database": f"t_{tag}", "path": out / "jsonl"}
    )
    client = connect(settings)
    migrate(client, settings)
    writer = ClickHouseWriter(client, settings.clickhouse_database, "feedback_events", EVENT_COLUMNS)
    rows = [event_row(r, 0, i) for i, r in enumerate(EVENTS)]
    writer.insert(rows, "test:0:0-15")
    writer.insert([event_row(BY_ID["t1"], 1, 0)], "test:1:0-0")  # the same event again: only FINAL hides it
    client.insert(
        "rejected_events",
        [["x1", "dream_ui", "thumbs", NOW, "h", "invalid", "ts", "too far in the future", "raw", 0, i, NOW]
         for i in range(2)]
        + [["x3", "oracle", "rating", None, "h", "rate_limited", "", "over the limit", "raw", 1, 9, NOW]],
        database=settings.clickhouse_database,
        column_names=["event_id", "source", "type", "ts", "hash", "reason", "field", "rule", "topic", "partition",
                      "offset", "rejected_at"],
    )  # fmt: skip

    ensure_topics(settings)
    topics = Topics(settings.topic_prefix)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for rep in (ReputationRecord("mesh", 0.9, 10, False, 1.0), ReputationRecord("mesh", 0.3, 40, True, 0.3),
                ReputationRecord("oracle", 0.95, 12, False, 1.0)):  # fmt: skip
        producer.produce(topics.reputation, key=rep.source.encode(), value=encode_record(rep))
    bias = BiasRecord("increase_grounding", "m-new", 0.4, time.time() - 3600.0, 3600.0, 9)
    producer.produce(topics.directive_bias, key=bias.key.encode(), value=encode_record(bias))
    assert producer.flush(30) == 0
    yield Loaded(settings, out)


_cli = run_cli
_ok = run_cli_ok


def _within(since: timedelta, until: timedelta = timedelta(0)) -> list[dict[str, Any]]:
    return [e for e in EVENTS if NOW - since <= e["ts"] < NOW - until]


# --- list ------------------------------------------------------------------------------------------
def test_list_filters_newest_first_once_each(loaded: Loaded) -> None:
    rows = json.loads(_ok(loaded.settings, "list", "--type", "thumbs", "--since", "1h", "--json").stdout)
    assert [r["event_id"] for r in rows] == ["t1", "t2", "td", "tu"]  # t1 was inserted twice
    first = rows[0]
    assert first["source"] == "dream_ui" and first["value"] == 1.0 and first["tags"] == ["billing"]
    assert first["payload"]["response"] == R1 and datetime.fromisoformat(first["ts"]) == BY_ID["t1"]["ts"]

    mesh = json.loads(
        _ok(loaded.settings, "list", "-t", "thumbs", "--since", "1h", "--source", "mesh", "--json").stdout
    )
    assert [r["event_id"] for r in mesh] == ["td", "tu"]
    two = json.loads(_ok(loaded.settings, "list", "--since", "30d", "--limit", "2", "--json").stdout)
    assert [r["event_id"] for r in two] == ["t1", "t2"]
    since = (NOW - timedelta(days=11)).date().isoformat()  # an ISO date: midnight UTC
    ids = {r["event_id"] for r in json.loads(_ok(loaded.settings, "list", "--since", since, "--json",
                                                   "--limit", "100").stdout)}  # fmt: skip
    start = datetime.fromisoformat(since).replace(tzinfo=UTC)
    assert ids == {e["event_id"] for e in EVENTS if e["ts"] >= start}

    table = _ok(loaded.settings, "list", "--type", "rating", "--type", "correction", "--since", "2d")
    body = [line for line in table.stdout.splitlines() if re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line)]
    assert len(body) == 3  # r5, r4, corr
    assert "i-r5" in body[0] and "i-r4" in body[1] and "i-corr" in body[2] and "+1.00" in body[0]
    assert "3 event(s)" in table.stderr


# --- stats -----------------------------------------------------------------------------------------
def test_stats_totals_rejections_sampling_reputation_and_bias(loaded: Loaded) -> None:
    data = json.loads(_ok(loaded.settings, "stats", "--json").stdout)
    analytics = data["analytics"]
    want = Counter((e["source"], e["type"]) for e in EVENTS)
    assert {(t["source"], t["type"]): t["events"] for t in analytics["totals"]} == want
    slow = next(t for t in analytics["totals"] if t["type"] == "latency")
    assert slow["estimated"] == 4.0 and slow["mean_value"] == -0.5  # one event kept at rate 0.25
    note = next(t for t in analytics["totals"] if t["type"] == "note")
    assert note["rated"] == 0 and note["mean_value"] is None
    assert analytics["rejections"] == [
        {"reason": "invalid", "field": "ts", "count": 2},
        {"reason": "rate_limited", "field": "", "count": 1},
    ]
    sampling = {s["type"]: s for s in analytics["sampling"]}
    assert sampling["implicit"] == {"type": "implicit", "kept": 1, "sampled": 1, "lowest_rate": 0.5,
                                    "configured_rate": 1.0, "estimated": 2.0}  # fmt: skip
    assert sampling["thumbs"]["sampled"] == 0 and sampling["thumbs"]["kept"] == 7
    assert data["clickhouse"]["feedback_events"] == len(EVENTS) + 1
    assert data["clickhouse"]["feedback_events_final"] == len(EVENTS)
    assert [(r["source"], r["score"], r["downweighted"]) for r in data["reputation"]] == [
        ("mesh", 0.3, True),
        ("oracle", 0.95, False),
    ]
    (bias,) = data["bias"]
    assert bias["directive"] == "increase_grounding" and bias["model_version"] == "m-new"
    assert bias["value_now"] == pytest.approx(0.2, abs=0.01)  # one half-life after the update

    text = _ok(loaded.settings, "stats").stdout
    for title in ("What landed", "Totals by source and type", "Rejection reasons", "Sampling",
                  "Source reputation", "Directive bias"):  # fmt: skip
        assert title in text
    assert re.search(r"guardian\s*│\s*veto\s*│\s*1\s*│", text)
    assert re.search(r"rate_limited\s*│\s*-\s*│\s*1", text) and re.search(r"mesh\s*│\s*0\.3000", text)


# --- report ----------------------------------------------------------------------------------------
def _metrics(events: list[dict[str, Any]]) -> tuple[int, float | None, float | None]:
    rated = [e["value"] for e in events if e["value"] is not None]
    if not rated:
        return len(events), None, None
    return len(events), sum(rated) / len(rated), sum(v > 0 for v in rated) / len(rated)


def _md_rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first markdown table after ``heading``."""
    lines = text.split(heading, 1)[1].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block: list[str] = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        block.append(line)
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in block[2:]]


def test_report_markdown_matches_the_rows_and_has_charts(loaded: Loaded) -> None:
    output = loaded.out / "reports" / "week.md"
    result = _ok(loaded.settings, "report", "--period", "week", "--output", str(output))
    assert str(output) in result.stderr
    text = output.read_text()
    current, previous = _within(7 * d), _within(14 * d, 7 * d)
    (n_cur, mean_cur, ok_cur), (n_prev, mean_prev, ok_prev) = _metrics(current), _metrics(previous)
    summary = {row[0]: row[1:] for row in _md_rows(text, "## Summary")}
    assert summary["events"] == [str(n_cur), str(n_prev), f"{n_cur - n_prev:+d}"]
    assert summary["satisfaction (mean value)"] == [
        format_value(mean_cur), format_value(mean_prev), format_change(mean_cur, mean_prev)
    ]  # fmt: skip
    assert summary["success rate"] == [
        format_rate(ok_cur),
        format_rate(ok_prev),
        format_change(ok_cur, ok_prev, rate=True),
    ]

    by_model = {row[0]: row for row in _md_rows(text, "### By model_version")}
    for model in ("m-new", "m-old"):
        n, mean, ok = _metrics([e for e in current if e["model_version"] == model])
        _, prev_mean, _ = _metrics([e for e in previous if e["model_version"] == model])
        assert by_model[model][1:] == [str(n), format_value(mean), format_rate(ok), format_value(prev_mean),
                                       format_change(mean, prev_mean)]  # fmt: skip
    by_tag = {row[0]: int(row[1]) for row in _md_rows(text, "### By tag")}
    assert by_tag == {"billing": 2, "math": 2, "(none)": n_cur - 4}
    by_source = {row[0]: int(row[1]) for row in _md_rows(text, "### By source")}
    assert by_source == Counter(e["source"] for e in current)
    by_prompt = {row[0]: int(row[1]) for row in _md_rows(text, "### By prompt_version")}
    assert by_prompt == Counter(e["prompt_version"] for e in current)

    per_interaction: dict[str, list[float]] = defaultdict(list)
    for e in current:
        if e["value"] is not None:
            per_interaction[e["interaction_id"]].append(e["value"])
    negative = [i for i, values in per_interaction.items() if sum(values) < 0]
    worst = sorted(negative, key=lambda i: (sum(per_interaction[i]) / len(per_interaction[i]),
                                                     -len(per_interaction[i]), i))[:10]  # fmt: skip
    rows = _md_rows(text, "## Worst-rated interactions")
    assert [r[0] for r in rows] == worst
    td = next(r for r in rows if r[0] == "i-td")
    assert td[1:3] == ["3", "-0.833"] and td[5] == "Wrong: says 5"

    trend, breakdown = output.parent / "week-trend.png", output.parent / "week-breakdown.png"
    for chart in (trend, breakdown):
        data = chart.read_bytes()
        assert data.startswith(PNG) and len(data) > 5_000
        assert f"]({chart.name})" in text  # linked from the report, next to it


def test_report_html_embeds_its_charts_and_svg_charts_parse(loaded: Loaded) -> None:
    output = loaded.out / "html" / "month.html"
    _ok(loaded.settings, "report", "--period", "month", "--format", "html", "--output", str(output))
    page = output.read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    files = [output.parent / "month-trend.png", output.parent / "month-breakdown.png"]
    assert [base64.b64decode(e) for e in embedded] == [f.read_bytes() for f in files]
    n, mean, _ = _metrics(_within(30 * d))
    assert f"<td>events</td><td>{n}</td>" in page
    assert f"<td>satisfaction (mean value)</td><td>{format_value(mean)}</td>" in page
    assert "<h3>By tag</h3>" in page and "<td>i-td</td>" in page

    svg_out = loaded.out / "svg" / "week.md"
    _ok(loaded.settings, "report", "--output", str(svg_out), "--chart-format", "svg")
    for name in ("week-trend.svg", "week-breakdown.svg"):
        root = ET.parse(svg_out.parent / name).getroot()
        assert root.tag.endswith("svg")


# --- export ----------------------------------------------------------------------------------------
def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_export_training_round_trips_without_duplicates_or_pii(loaded: Loaded) -> None:
    output = loaded.out / "export" / "train.jsonl"
    result = _ok(loaded.settings, "export", "--format", "training", "--since", "7d", "--output", str(output))
    examples = _jsonl(output)
    assert [e["metadata"]["event_id"] for e in examples] == ["t1", "r5"]  # t2 nearly repeats t1; tu has no text
    first = examples[0]["messages"]
    assert first == [{"role": "user", "content": P1}, {"role": "assistant", "content": R1.replace(EMAIL, "[EMAIL]")}]
    assert [m["role"] for m in examples[1]["messages"]] == ["system", "user", "assistant"]
    raw = output.read_text()
    assert EMAIL not in raw and "u_000" not in raw
    card = output.with_name("train.card.md").read_text()
    selected = [e for e in _within(7 * d) if e["value"] is not None and e["value"] >= 0.7]
    assert f"| events selected (FINAL, filters above) | {len(selected)} |" in card
    assert "| without a prompt and a response (left out) | 1 |" in card
    assert "on 5-character shingles) | 1 |" in card
    assert "| records changed by the PII re-check | 1 (EMAIL: 1) |" in card and "| written | 2 |" in card
    assert "1 near-duplicate(s) removed" in result.stderr

    more = loaded.out / "export" / "more.jsonl"
    _ok(loaded.settings, "export", "--since", "7d", "--min-value", "0.4", "--corrections", "--output", str(more))
    assert [e["metadata"]["event_id"] for e in _jsonl(more)] == ["t1", "r5", "r4", "corr"]
    assert _jsonl(more)[-1]["messages"][-1]["content"] == "Canberra is the capital."


def test_export_promptfoo_cases_from_rated_outputs(loaded: Loaded) -> None:
    output = loaded.out / "export" / "cases.yaml"
    _ok(loaded.settings, "export", "--format", "promptfoo", "--since", "30d", "--output", str(output))
    cases = yaml.safe_load(output.read_text())
    kinds = {c["metadata"]["event_id"]: c["assert"][0]["type"] for c in cases}
    assert kinds == {"t1": "similar", "r5": "similar", "td": "not-similar", "corr": "similar", "p3": "similar"}
    td = next(c for c in cases if c["metadata"]["event_id"] == "td")
    assert td["vars"] == {"prompt": "What is 2 + 2?"} and td["assert"][0]["value"] == "5"
    assert output.with_name("cases.card.md").exists()
    as_json = loaded.out / "export" / "cases.json"
    _ok(loaded.settings, "export", "--format", "promptfoo", "--since", "30d", "--output", str(as_json))
    assert json.loads(as_json.read_text()) == cases


def test_export_type_value_range_and_lengths_select_and_the_card_says_so(loaded: Loaded) -> None:
    negative = loaded.out / "export" / "negative.yaml"
    _ok(loaded.settings, "export", "--format", "promptfoo", "--since", "30d", "--max-value", "-0.5",
        "--output", str(negative))  # fmt: skip
    kinds = {c["metadata"]["event_id"]: c["assert"][0]["type"] for c in yaml.safe_load(negative.read_text())}
    assert kinds == {"td": "not-similar", "corr": "similar"}  # a correction's answer is the good one
    thumbs = loaded.out / "export" / "negative-thumbs.yaml"
    _ok(loaded.settings, "export", "--format", "promptfoo", "--since", "30d", "--max-value", "-0.5",
        "--type", "thumbs", "--output", str(thumbs))  # fmt: skip
    assert [c["metadata"]["event_id"] for c in yaml.safe_load(thumbs.read_text())] == ["td"]
    card = thumbs.with_name("negative-thumbs.card.md").read_text()
    assert "- Types: thumbs" in card and "- Quality filter: value ≤ -0.5" in card
    assert "| -1 ≤ value < -0.5 | 1 |" in card and "| 0.5 ≤ value ≤ 1 | 0 |" in card
    assert "| mesh | m-old | 1 |" in card  # by source and model

    long = loaded.out / "export" / "long.jsonl"
    _ok(loaded.settings, "export", "--since", "7d", "--min-prompt-chars", "15", "--output", str(long))
    assert [e["metadata"]["event_id"] for e in _jsonl(long)] == ["t1"]  # r5's prompt has 14 characters
    card = long.with_name("long.card.md").read_text()
    assert "| prompt or response shorter than the minimum (left out) | 1 |" in card and "| written | 1 |" in card
    assert "Mean value of the records written: 1.000." in card and "| dream_ui | m-new | 1 |" in card
    bad = _cli(loaded.settings, "export", "--min-value", "0.5", "--max-value", "0.2")
    assert bad.returncode == 2 and "above --max-value" in bad.stderr


def test_report_has_an_insights_section(loaded: Loaded) -> None:
    output = loaded.out / "reports" / "insights.md"
    _ok(loaded.settings, "report", "--output", str(output))
    text = output.read_text()
    section = text.split("## Insights: what works and what doesn't", 1)[1]
    # A handful of events: every group is under the 30 opinions insights need, so nothing is ranked.
    assert "Benjamini-Hochberg at 0.05" in section and "0 comparisons" in section
    assert "Figures come from `feedback_current FINAL`." in text


def test_export_jsonl_time_range(loaded: Loaded) -> None:
    output = loaded.out / "export" / "events.jsonl"
    since, until = (NOW - 15 * d).isoformat(), (NOW - 6 * d).isoformat()
    _ok(loaded.settings, "export", "--format", "jsonl", "--since", since, "--until", until, "--output", str(output))
    lines = _jsonl(output)
    assert [r["event_id"] for r in lines] == ["p3", "p2", "p1"]  # oldest first
    assert lines[0]["payload"] == {"direction": "up", "prompt": "Old question?", "response": "An old answer."}
    assert datetime.fromisoformat(lines[1]["ts"]) == BY_ID["p2"]["ts"] and lines[1]["value"] == 0.0
    assert "| written | 3 |" in output.with_name("events.card.md").read_text()


# --- failures ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [["list"], ["report"], ["export", "--format", "jsonl"], ["stats"]],
)
def test_clickhouse_unreachable_is_one_line_and_exit_1(loaded: Loaded, args: list[str]) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    result = _cli(loaded.settings, *args, env={"FEEDBACK_CLICKHOUSE_URL": url})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot reach ClickHouse at {url}: OperationalError. Start the local stack with "
                      "`feedback up`, or set FEEDBACK_CLICKHOUSE_URL."]  # fmt: skip
    if args[0] != "stats":  # stats also reports what Kafka holds
        assert result.stderr.strip() == errors[0]


def test_missing_tables_say_to_migrate(loaded: Loaded) -> None:
    empty = loaded.settings.model_copy(update={"clickhouse_database": f"t_{uuid.uuid4().hex[:10]}"})
    result = _cli(empty, "list")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"error: no feedback tables in database {empty.clickhouse_database} at {empty.clickhouse_endpoint}; "
        "run `feedback migrate` (sinks also create them on start)"
    )

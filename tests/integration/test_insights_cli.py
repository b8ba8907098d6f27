"""``feedback insights`` and ``feedback suggest`` on planted data in the embedded ClickHouse, run as
the ``feedback`` program: the groups' weighted figures match the documented rule computed here in
Python, a planted difference and a planted decline are found, and a decline exits 3."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipeline.insights import Sums, event_weight, sums_of
from pipeline.insights_cli import DECLINE_EXIT
from pipeline.settings import Settings
from pipeline.suggest import HOOK_FIELDS
from sinks.clickhouse import EVENT_COLUMNS, ClickHouseWriter, connect, event_row
from sinks.migrations import migrate
from stream_processors.normalize import normalize
from tests.integration.pipeline_procs import run_cli, run_cli_ok

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(microsecond=0)
SECRET = "SECRET-COMMENT-TEXT"
REPUTATION = {"mesh": 0.3}  # mesh is down-weighted; every other source weighs 1


def _event(
    n: int, days_ago: float, up: bool, prompt: str, tag: str, *, source: str = "dream_ui",
    sample_rate: float | None = None, confidence: float | None = None, session: str | None = None,
    interaction: str | None = "auto", propagation: float | None = None, user: str | None = None,
    supersedes: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    extra: dict[str, Any] = {"direction": "up" if up else "down", "prompt": f"{SECRET} prompt", "response": "r"}
    if propagation is not None:
        extra["propagation_weight"] = propagation
    if supersedes is not None:
        extra["supersedes"] = supersedes
    record = normalize({
        "event_id": f"e{n}", "ts": NOW - timedelta(days=days_ago, minutes=n % 500), "source": source,
        "type": "thumbs", "severity": "info",
        "payload": {"text": None, "comment": SECRET, "corrected_response": None, "extra": extra},
        "user_id": user, "session_id": session,
        "interaction_id": f"i{n}" if interaction == "auto" else interaction,
        "model_version": "m1", "prompt_version": prompt, "value": None, "confidence": None, "tags": [tag],
        "idempotency_key": None, "client_ip": None, "sample_rate": sample_rate, "text_dropped": False,
        "propagation_weight": None, "hash": f"h{n}",
    })  # fmt: skip
    if confidence is not None:
        record["confidence"] = confidence
    return record


def _planted() -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []

    def add(count: int, ups: int, days_ago: float, prompt: str, tag: str, **kw: Any) -> None:
        for i in range(count):
            events.append(_event(len(events), days_ago, i < ups, prompt, tag, **kw))

    # This week: p-b does much worse than p-a on math; last week it did as well.
    add(120, 90, 1, "p-a", "math")
    add(100, 40, 2, "p-b", "math")
    add(120, 90, 9, "p-a", "math")
    add(100, 80, 9, "p-b", "math")
    # Weighted events: sampled, low confidence, a down-weighted source.
    add(30, 20, 3, "p-a", "geo", sample_rate=0.25)
    add(30, 10, 3, "p-a", "geo", confidence=0.4)
    add(40, 30, 3, "p-a", "geo", source="mesh")
    add(5, 5, 3, "p-c", "rare")  # too few to compare
    # A session: two interactions (p-a, p-b) and session-level feedback that reaches both.
    events.append(_event(len(events), 1, True, "p-a", "chat", session="s1", interaction="si-1"))
    events.append(_event(len(events), 1, False, "p-b", "chat", session="s1", interaction="si-2"))
    for up in (True, False, True):
        events.append(_event(len(events), 1, up, "p-z", "chat", session="s1", interaction=None, propagation=0.5))
    # A changed vote: the rater's thumbs down, then up on the same interaction. One opinion: up.
    rater = "u_" + "ab" * 16
    old = _event(len(events), 2, False, "p-r", "revised", user=rater, interaction="rv-1")
    events += [old, _event(len(events) + 1, 1, True, "p-r", "revised", user=rater, interaction="rv-1",
                           supersedes=old["event_id"])]  # fmt: skip
    return events


EVENTS = _planted()


def _rows_by_rule(events: list[dict[str, Any]], since: datetime, until: datetime) -> list[tuple[dict[str, Any], float]]:
    """The documented rule, in Python: each opinion with its weight; session-level ones once per interaction
    of their session, in that interaction's prompt and tags."""
    superseded = {e["payload"]["extra"].get("supersedes") for e in events} - {None}
    interactions = {}
    for e in events:
        if e["interaction_id"] and e["session_id"]:
            interactions.setdefault(e["session_id"], []).append(e)
    out = []
    for e in events:
        if not since <= e["ts"] < until or e["value"] is None or e["event_id"] in superseded:
            continue
        w = event_weight(e["confidence"], e["sample_rate"], REPUTATION.get(e["source"], 1.0))
        if e["session_id"] and not e["interaction_id"] and e["session_id"] in interactions:
            for i in interactions[e["session_id"]]:
                out.append(({**e, "prompt_version": i["prompt_version"], "tags": i["tags"]},
                            w * e["propagation_weight"]))  # fmt: skip
        else:
            out.append((e, w))
    return out


def _expected(dimension: str) -> dict[str, Sums]:
    groups: dict[str, tuple[list[float], list[float]]] = {}
    for e, w in _rows_by_rule(EVENTS, NOW - timedelta(days=7), NOW + timedelta(hours=1)):
        keys = e["tags"] if dimension == "tag" else [e[dimension]]
        for k in keys:
            xs, ws = groups.setdefault(k, ([], []))
            xs.append(e["value"])
            ws.append(w)
    return {k: sums_of(xs, ws) for k, (xs, ws) in groups.items()}


@dataclass(frozen=True)
class Loaded:
    settings: Settings
    out: Path


@pytest.fixture(scope="module")
def loaded(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    tag = uuid.uuid4().hex[:10]
    settings = stack_settings.model_copy(update={"topic_prefix": f"t{tag}.", "clickhouse_database": f"t_{tag}"})
    client = connect(settings)
    migrate(client, settings)
    writer = ClickHouseWriter(client, settings.clickhouse_database, "feedback_events", EVENT_COLUMNS)
    writer.insert([event_row(r, 0, i) for i, r in enumerate(EVENTS)], "test:0:all")
    writer.insert([event_row(r, 1, i) for i, r in enumerate(EVENTS[:50])], "test:1:again")  # replayed: FINAL
    client.insert(
        "reputation_history",
        [["mesh", 0.9, 10, False, 1.0, NOW - timedelta(days=2), 0, 1],
         ["mesh", 0.3, 40, True, 0.3, NOW - timedelta(hours=1), 0, 2]],  # the latest counts
        database=settings.clickhouse_database,
        column_names=["source", "score", "observations", "downweighted", "weight", "published_at",
                      "kafka_partition", "kafka_offset"],
    )  # fmt: skip
    yield Loaded(settings, tmp_path_factory.mktemp("insights"))


def _insights(loaded: Loaded, *args: str, code: int = DECLINE_EXIT) -> dict[str, Any]:
    result = run_cli(loaded.settings, "insights", "--json", *args)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize("dimension", ["prompt_version", "source", "tag"])
def test_group_figures_follow_the_weighting_rule(loaded: Loaded, dimension: str) -> None:
    data = _insights(loaded, "--by", dimension, "--min-samples", "2")
    got = {g["group"]: g for g in data["groups"] if g["dimension"] == dimension}
    want = _expected(dimension)
    assert set(got) == set(want)
    for name, s in want.items():
        g = got[name]
        assert g["n"] == s.n, name
        assert g["n_eff"] == pytest.approx(s.n_eff, abs=1e-3), name
        assert g["mean_value"] == pytest.approx(s.mean, abs=1e-6), name
        assert g["success_rate"] == pytest.approx(s.rate, abs=1e-6), name
    geo = want["geo"] if dimension == "tag" else None
    if geo is not None:  # the rule moves the figures: unweighted, geo's success rate would be 60/100
        assert geo.rate == pytest.approx((20 * 4 + 10 * 0.4 + 30 * 0.3) / (30 * 4 + 30 * 0.4 + 40 * 0.3))
    if dimension == "prompt_version":  # the session's 3 opinions reach si-1 (p-a) and si-2 (p-b), not p-z
        assert "p-z" not in got
        assert got["p-r"]["n"] == 1 and got["p-r"]["mean_value"] == 1.0  # the changed vote, as it now stands
        assert data["table"].endswith(".feedback_current")


def test_a_planted_difference_and_decline_are_found(loaded: Loaded) -> None:
    data = _insights(loaded, "--by", "prompt_version/tag")
    assert data["table"].endswith(".feedback_events") or data["table"].endswith(".feedback_current")
    sig = {(f["dimension"], f["group"], f["compared_to"], f["metric"]): f for f in data["findings"] if f["significant"]}
    worse = sig[("prompt_version/tag", "p-b/math", "p-a/math", "mean_value")]
    # p-a/math: 90 up of 120, mean 0.5; p-b/math: 40 up of 100, mean -0.2.
    assert worse["effect"] == pytest.approx(-0.7) and worse["n"] == 100 and worse["n_compared_to"] == 120
    assert worse["ci_low"] < -0.7 < worse["ci_high"] < 0
    assert worse["keys"] == ["p-b", "math"] and worse["compared_keys"] == ["p-a", "math"]
    decline = sig[("prompt_version/tag", "p-b/math", "previous period", "success_rate")]
    assert decline["effect"] == pytest.approx(0.4 - 0.8) and decline in data["declines"]
    assert ("prompt_version/tag", "p-a/math", "previous period", "success_rate") not in sig  # unchanged
    assert {"dimension": "prompt_version/tag", "group": "p-c/rare", "n": 5} in data["insufficient"]
    assert all("p-c/rare" not in (f["group"], f["compared_to"]) for f in data["findings"])
    for f in data["findings"]:
        assert set(f) >= {"dimension", "group", "compared_to", "metric", "effect", "n", "ci_low", "ci_high",
                          "significant"}  # fmt: skip


def test_a_decline_exits_3_and_sets_the_gauge(loaded: Loaded) -> None:
    prom = loaded.out / "metrics" / "insights.prom"
    result = run_cli(loaded.settings, "insights", "--by", "prompt_version/tag", "--prom-file", str(prom))
    assert result.returncode == DECLINE_EXIT, result.stderr
    assert "What works and what doesn't" in result.stdout and "p-b/math" in result.stdout
    assert "Insufficient" in result.stdout and "p-c/rare (5)" in result.stdout
    text = prom.read_text()
    assert "feedback_insights_declines " in text and "feedback_insights_declines 0.0" not in text
    line = 'feedback_insights_success_rate_decline{dimension="prompt_version/tag",group="p-b/math"} '
    (value,) = [row.removeprefix(line) for row in text.splitlines() if row.startswith(line)]
    assert float(value) == pytest.approx(0.4)  # 80% -> 40%
    # A week ago there was no week before it: nothing to decline from, exit 0.
    quiet = _insights(loaded, "--by", "prompt_version/tag", "--until", "7d", code=0)
    assert quiet["declines"] == [] and all(f["compared_to"] != "previous period" for f in quiet["findings"])


def test_bad_options_name_the_rule(loaded: Loaded) -> None:
    result = run_cli(loaded.settings, "insights", "--by", "user_id")
    assert result.returncode == 2 and "not a dimension" in result.stderr and "--by" in result.stderr


HOOK_OUT = "FEEDBACK_TEST_HOOK_OUT"


def record_hook(aggregates: list[dict[str, Any]]) -> str:
    """A text hook for the test: writes what it was given to the file the environment names."""
    import os

    Path(os.environ[HOOK_OUT]).write_text(json.dumps(aggregates))
    return f"{len(aggregates)} suggestion(s)"


def test_suggest_ranks_cites_numbers_and_the_hook_gets_no_text(loaded: Loaded) -> None:
    data = json.loads(run_cli_ok(loaded.settings, "suggest", "--json").stdout)
    (top,) = [s for s in data["suggestions"] if s["rule"] == "worse_than_reference" and s["group"] == "p-b/math"]
    assert top["text"].startswith("prompt p-b scores 0.70 lower than p-a on tag math (n=100, ")
    assert top["text"].endswith(": route tag math to p-a or revise p-b")
    impacts = [s["impact"] for s in data["suggestions"]]
    assert impacts == sorted(impacts, reverse=True) and data["summary"] is None  # no hook: rules only

    dump = loaded.out / "hook.json"
    env = {"FEEDBACK_SUGGEST_TEXT_HOOK": "tests.integration.test_insights_cli:record_hook", HOOK_OUT: str(dump)}
    result = run_cli(loaded.settings, "suggest", env=env)
    assert result.returncode == 0, result.stderr
    assert f"Summary: {len(data['suggestions'])} suggestion(s)" in result.stdout
    given = json.loads(dump.read_text())
    assert len(given) == len(data["suggestions"]) and all(set(g) == set(HOOK_FIELDS) for g in given)
    assert SECRET not in dump.read_text() and "prompt" not in {k for g in given for k in g}
    bad = run_cli(loaded.settings, "suggest", env={"FEEDBACK_SUGGEST_TEXT_HOOK": "no_such_module:f"})
    assert bad.returncode == 1 and "suggest_text_hook" in bad.stderr and "Traceback" not in bad.stderr

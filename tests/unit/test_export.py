"""The pure parts of ``feedback export``: conversations, PII re-check, near-duplicates, promptfoo cases, card."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pipeline.export import (
    ExportFilters,
    ExportResult,
    conversation,
    data_card,
    dedup,
    jaccard,
    jsonl_record,
    normalize_text,
    promptfoo_case,
    shingles,
    training_example,
)

TS = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)


def _row(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": "e-1", "ts": TS, "source": "dream_ui", "type": "thumbs", "value": 1.0,
        "interaction_id": "i-1", "model_version": "m-1", "prompt_version": "p-a", "user_id": "u_abc",
        "corrected_response": None, "payload": {"direction": "up", "prompt": "What is 2+2?", "response": "4."},
    }  # fmt: skip
    return {**base, **kw}


def test_conversation_reads_the_payload_snapshot() -> None:
    assert conversation(_row()) == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
    with_system = _row(payload={"system_prompt": "Be brief.", "input": "Hi", "output": "Hello"})
    assert [m["role"] for m in conversation(with_system) or []] == ["system", "user", "assistant"]
    assert conversation(_row(payload={"prompt": "Hi"})) is None  # no answer
    assert conversation(_row(payload={"prompt": "  ", "response": "x"})) is None  # blank prompt
    fixed = _row(type="correction", value=-1.0, corrected_response="Canberra.", payload={"prompt": "Capital?"})
    assert conversation(fixed) == [
        {"role": "user", "content": "Capital?"},
        {"role": "assistant", "content": "Canberra."},
    ]
    # Delayed feedback: the snapshot track() recorded, joined in the stream; the event's own keys win.
    joined = _row(payload={"interaction_prompt": "Tracked question?", "interaction_response": "Tracked answer."})
    assert [m["content"] for m in conversation(joined) or []] == ["Tracked question?", "Tracked answer."]
    both = _row(payload={"prompt": "Own?", "interaction_prompt": "Tracked?", "interaction_response": "A."})
    assert [m["content"] for m in conversation(both) or []] == ["Own?", "A."]


def test_training_example_rechecks_pii_and_leaves_out_user_ids() -> None:
    pii: Counter[str] = Counter()
    row = _row(payload={"prompt": "Mail me at jane.doe@example.com", "response": "Call +41 44 668 18 00."})
    example, changed = training_example(row, pii)
    assert changed and example is not None
    assert [m["content"] for m in example["messages"]] == ["Mail me at [EMAIL]", "Call [PHONE]."]
    assert pii == Counter({"EMAIL": 1, "PHONE": 1})
    assert "user_id" not in example["metadata"] and "u_abc" not in str(example)
    assert example["metadata"]["ts"] == "2026-11-20T10:00:00Z" and example["metadata"]["value"] == 1.0
    clean, changed = training_example(_row(), pii)
    assert clean is not None and not changed
    assert training_example(_row(payload={}), pii) == (None, False)


def test_promptfoo_cases_from_rated_outputs() -> None:
    pii: Counter[str] = Counter()
    good, _ = promptfoo_case(_row(value=0.8), 0.7, pii)
    assert good is not None
    assert good["vars"] == {"prompt": "What is 2+2?"}
    assert good["assert"] == [{"type": "similar", "value": "4.", "threshold": 0.8}]
    assert good["metadata"]["event_id"] == "e-1" and "rated +0.80" in good["description"]
    bad, _ = promptfoo_case(_row(value=-1.0), 0.7, pii)
    assert bad is not None and bad["assert"][0]["type"] == "not-similar"
    assert promptfoo_case(_row(value=0.5), 0.7, pii) == (None, False)  # between the thresholds
    assert promptfoo_case(_row(value=None), 0.7, pii) == (None, False)
    fix, _ = promptfoo_case(_row(type="correction", value=-1.0, corrected_response="Four."), 0.7, pii)
    assert fix is not None and fix["assert"][0] == {"type": "similar", "value": "Four.", "threshold": 0.8}


def test_jsonl_record_is_plain_json_with_text_rechecked() -> None:
    pii: Counter[str] = Counter()
    record, changed = jsonl_record(_row(payload_comment="ip 10.1.2.3", payload={"note": "x@y.org"}, tags=("a",)), pii)
    assert changed and record["payload_comment"] == "ip [IP]" and record["payload"] == {"note": "[EMAIL]"}
    assert record["ts"] == "2026-11-20T10:00:00Z" and record["tags"] == ["a"]


def test_normalized_shingles() -> None:
    assert normalize_text("  Hello,   WORLD!! ") == "hello world"
    assert shingles("Hello, world!") == shingles("hello world")
    assert len(shingles("abc")) == 1  # shorter than a shingle: the text itself
    assert jaccard(shingles("the same text"), shingles("the same text")) == 1.0
    assert jaccard(shingles("completely different"), shingles("nothing alike here")) < 0.2


def test_dedup_removes_near_duplicates_and_keeps_the_first() -> None:
    base = "Open Settings, choose Security, then Reset password. It takes about a minute to arrive by e-mail."
    texts = [
        base,
        base.upper(),  # case only
        base.replace(",", "").replace(".", "!"),  # punctuation only
        base.replace("about a minute", "about one minute"),  # a small edit
        "Go to Settings and pick Security. There you can reset the password, which is mailed to you.",  # reworded
        "The capital of Australia is Canberra, not Sydney.",
    ]
    kept, removed = dedup(texts, lambda t: t, threshold=0.85)
    assert kept == [base, texts[4], texts[5]] and removed == 3
    assert dedup(texts, lambda t: t, threshold=1.0)[1] == 2  # exact (after normalizing) only


def test_dedup_is_deterministic_and_keeps_distinct_items() -> None:
    rng = random.Random(3)
    words = [f"w{i}" for i in range(500)]
    texts = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(300)]
    kept, removed = dedup(texts, lambda t: t)
    assert removed == 0 and kept == texts
    doubled = [t for t in texts for _ in range(2)]
    assert dedup(doubled, lambda t: t) == (texts, 300)


def test_dedup_threshold_must_be_a_share() -> None:
    with pytest.raises(ValueError):
        dedup(["a"], lambda t: t, threshold=0)


def test_data_card_states_counts_filters_and_range(tmp_path: Path) -> None:
    filters = ExportFilters(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 8, tzinfo=UTC), min_value=0.7)
    result = ExportResult("training", tmp_path / "train.jsonl", tmp_path / "train.card.md", filters)
    result.selected, result.no_content, result.duplicates_removed, result.written = 10, 3, 2, 5
    result.pii_changed, result.pii_kinds = 1, Counter({"EMAIL": 2})
    result.first_ts, result.last_ts = "2026-11-02T00:00:00Z", "2026-11-07T00:00:00Z"
    result.by_source = Counter({"dream_ui": 5})
    card = data_card(result)
    for expected in [
        "# Data card: train.jsonl",
        "2026-11-01T00:00:00Z ≤ ts < 2026-11-08T00:00:00Z",
        "2026-11-02T00:00:00Z to 2026-11-07T00:00:00Z",
        "value ≥ 0.7",
        "| events selected (FINAL, filters above) | 10 |",
        "| without a prompt and a response (left out) | 3 |",
        "near-duplicates removed (Jaccard ≥ 0.85 on 5-character shingles) | 2 |",
        "| records changed by the PII re-check | 1 (EMAIL: 2) |",
        "| written | 5 |",
        "- dream_ui: 5",
    ]:
        assert expected in card, expected


def test_value_range_lengths_and_the_score_buckets() -> None:
    from pipeline.export import long_enough, score_bucket

    pii: Counter[str] = Counter()
    # Band 0 (a value range was given): the sign decides, and 0 is neither.
    assert promptfoo_case(_row(value=-0.25), 0.0, pii)[0]["assert"][0]["type"] == "not-similar"  # type: ignore[index]
    assert promptfoo_case(_row(value=0.25), 0.0, pii)[0]["assert"][0]["type"] == "similar"  # type: ignore[index]
    assert promptfoo_case(_row(value=0.0), 0.0, pii) == (None, False)
    start, end = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 8, tzinfo=UTC)
    with pytest.raises(ValueError, match="above max_value"):
        ExportFilters(start, end, min_value=0.5, max_value=0.2)
    prompt12 = ExportFilters(start, end, min_prompt_chars=12)
    assert long_enough(_row(), prompt12)  # "What is 2+2?" has 12 characters
    assert not long_enough(_row(), ExportFilters(start, end, min_prompt_chars=13))
    assert not long_enough(_row(), ExportFilters(start, end, min_response_chars=3))  # "4." has 2
    assert not long_enough(_row(payload={"prompt": "What is 2+2?"}), prompt12)  # no answer at all
    assert long_enough(_row(payload={}), ExportFilters(start, end))  # no minimum: anything goes
    buckets = [score_bucket(v) for v in (-1.0, -0.5, -0.01, 0.0, 0.49, 0.5, 1.0, None)]
    assert buckets == ["-1 ≤ value < -0.5", "-0.5 ≤ value < 0", "-0.5 ≤ value < 0", "value = 0", "0 < value < 0.5",
                       "0.5 ≤ value ≤ 1", "0.5 ≤ value ≤ 1", "no value"]  # fmt: skip

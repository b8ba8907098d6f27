"""Recall and kept on the redaction test set (tests/data/redaction_corpus.jsonl).

Recall: the share of texts with PII where none of the listed PII strings survives.
Kept: the share of look-alikes (versions, dates, prices, order numbers, ISBNs, UUIDs,
SHAs, model names, prose with "at" and "dot") that come out unchanged.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from stream_processors.redact import redact_text

DATA = Path(__file__).parent.parent / "data"
ROWS: list[dict[str, Any]] = [
    json.loads(line) for line in (DATA / "redaction_corpus.jsonl").read_text(encoding="utf-8").splitlines()
]
POSITIVE = [row for row in ROWS if row["pii"]]
LOOKALIKE = [row for row in ROWS if not row["pii"]]
FAMILIES = {
    "email", "email_intl", "email_obfuscated", "phone_us", "phone_uk", "phone_de", "phone_fr", "phone_in",
    "phone_br", "phone_jp", "phone_au", "phone_other", "card", "iban", "ssn", "ssn_named", "ip", "jwt", "bearer", "pem",
    "cloud_key", "vcs_token", "slack", "stripe", "conn_string", "keyword_secret", "mixed",
}  # fmt: skip


def recall() -> tuple[float, list[str]]:
    missed = [row["text"] for row in POSITIVE if any(p in redact_text(row["text"]) for p in row["pii"])]
    return 1 - len(missed) / len(POSITIVE), missed


def kept() -> tuple[float, list[str]]:
    changed = [row["text"] for row in LOOKALIKE if redact_text(row["text"]) != row["text"]]
    return 1 - len(changed) / len(LOOKALIKE), changed


def test_the_corpus_is_what_its_script_writes() -> None:
    spec = importlib.util.spec_from_file_location("make_redaction_corpus", DATA / "make_redaction_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == (DATA / "redaction_corpus.jsonl").read_text(encoding="utf-8")


def test_the_corpus_covers_every_family_and_is_not_small() -> None:
    assert {row["family"] for row in POSITIVE} == FAMILIES
    assert len(POSITIVE) >= 1000 and len(LOOKALIKE) >= 1000
    assert {row["family"] for row in LOOKALIKE} >= {
        "lookalike_version",
        "lookalike_date_iso",
        "lookalike_time",
        "lookalike_price",
        "lookalike_order",
        "lookalike_isbn",
        "lookalike_uuid",
        "lookalike_sha",
        "lookalike_model",
        "lookalike_prose",
        "lookalike_misc",
    }


def test_recall_is_at_least_99_percent() -> None:
    score, missed = recall()
    assert score >= 0.99, missed[:20]


def test_lookalikes_kept_at_least_98_percent() -> None:
    score, changed = kept()
    assert score >= 0.98, changed[:20]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_no_family_is_mostly_missed(family: str) -> None:
    """A family with few rows could hide in the total: each one on its own, at 0.95."""
    rows = [row for row in POSITIVE if row["family"] == family]
    caught = sum(not any(p in redact_text(row["text"]) for p in row["pii"]) for row in rows)
    assert caught / len(rows) >= 0.95

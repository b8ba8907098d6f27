"""``feedback export``: training data, promptfoo test cases and plain JSON Lines from ClickHouse.

What the content comes from: ``feedback_events`` has no prompt or response columns of its
own, so a conversation is read from the event's ``payload`` map, which producers fill with
the interaction's snapshot (already redacted by the gate):

- the user turn from the first of ``prompt``, ``input``, ``query``, ``question``, then
  ``interaction_prompt`` (the snapshot ``track()`` recorded, joined in the stream);
- the assistant turn from the first of ``response``, ``output``, ``answer``, ``completion``,
  then ``interaction_response``;
- an optional system turn from ``system`` or ``system_prompt``;
- for a ``correction`` event, the ``corrected_response`` column is the assistant turn.

Events without both turns are counted (``no_content``) and left out. Every text written is
run through :func:`stream_processors.redact.redact_text` again, and near-duplicate
conversations are dropped (character shingles, MinHash LSH candidates, exact Jaccard check).

Opinions come from the table the caller names (``feedback_current FINAL``: the latest revision
of each, so a changed vote exports once, as it now stands). Filters: time, sources, types, a
value range (``min_value`` / ``max_value``), and minimum prompt and response lengths (in
characters, of the turns above; an event without them is then left out).
"""

from __future__ import annotations

import json
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from pipeline.private_files import make_private_dirs, open_private, write_private
from pipeline.since import to_micros
from stream_processors.redact import redact_text

__all__ = [
    "COLUMNS",
    "CONTENT_KEYS",
    "SCORE_BUCKETS",
    "ExportFilters",
    "ExportResult",
    "NearDuplicateFilter",
    "conversation",
    "data_card",
    "dedup",
    "export_events",
    "jsonl_record",
    "long_enough",
    "promptfoo_case",
    "recheck_pii",
    "score_bucket",
    "training_example",
]

Format = Literal["training", "promptfoo", "jsonl"]
T = TypeVar("T")

#: Payload keys read for each turn, first match wins.
CONTENT_KEYS: dict[str, tuple[str, ...]] = {
    "system": ("system", "system_prompt"),
    "user": ("prompt", "input", "query", "question", "interaction_prompt"),
    "assistant": ("response", "output", "answer", "completion", "interaction_response"),
}

#: The ``feedback_events`` columns every export reads, in this order.
COLUMNS: tuple[str, ...] = (
    "event_id",
    "ts",
    "source",
    "type",
    "severity",
    "user_id",
    "session_id",
    "interaction_id",
    "model_version",
    "prompt_version",
    "value",
    "confidence",
    "sample_rate",
    "tags",
    "payload_text",
    "payload_comment",
    "corrected_response",
    "payload",
)
_TEXT_COLUMNS = ("payload_text", "payload_comment", "corrected_response")


# --- conversations --------------------------------------------------------------------
def _first(payload: dict[str, str], keys: Sequence[str]) -> str | None:
    for key in keys:
        value = payload.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


def conversation(row: dict[str, Any]) -> list[dict[str, str]] | None:
    """The chat messages an event carries (system?, user, assistant), or None without both turns."""
    payload = row.get("payload") or {}
    user = _first(payload, CONTENT_KEYS["user"])
    if row.get("type") == "correction" and row.get("corrected_response"):
        assistant: str | None = row["corrected_response"]
    else:
        assistant = _first(payload, CONTENT_KEYS["assistant"])
    if user is None or assistant is None:
        return None
    system = _first(payload, CONTENT_KEYS["system"])
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def recheck_pii(texts: Iterable[str], counts: Counter[str]) -> tuple[list[str], bool]:
    """The texts redacted again; whether anything changed (``counts`` gets one per placeholder)."""
    out = [redact_text(t, counts) for t in texts]
    return out, any(a != b for a, b in zip(out, texts, strict=True))


def _iso(ts: datetime) -> str:
    return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).astimezone(UTC).isoformat().replace("+00:00", "Z")


def _metadata(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "event_id": row["event_id"],
        "interaction_id": row.get("interaction_id"),
        "source": row["source"],
        "type": row["type"],
        "value": row.get("value"),
        "model_version": row.get("model_version"),
        "prompt_version": row.get("prompt_version"),
        "ts": _iso(row["ts"]),
    }


def training_example(row: dict[str, Any], pii: Counter[str]) -> tuple[dict[str, Any] | None, bool]:
    """``{"messages": [...], "metadata": {...}}`` for one event (None: no conversation), and
    whether the PII re-check changed it. No user or session id is written."""
    messages = conversation(row)
    if messages is None:
        return None, False
    contents, changed = recheck_pii([m["content"] for m in messages], pii)
    messages = [{"role": m["role"], "content": c} for m, c in zip(messages, contents, strict=True)]
    return {"messages": messages, "metadata": _metadata(row)}, changed


def promptfoo_case(
    row: dict[str, Any], min_value: float, pii: Counter[str], similarity: float = 0.8
) -> tuple[dict[str, Any] | None, bool]:
    """A promptfoo test case from a rated output, and whether the PII re-check changed it.

    The prompt becomes ``vars.prompt``. A well-rated output (value >= ``min_value`` and above 0)
    or a human correction is what a good answer should resemble (``similar``); a badly rated one
    (value <= -``min_value`` and below 0) is what it should not (``not-similar``). Anything in
    between (a value of 0 always), or an event without a conversation, gives None.
    """
    messages = conversation(row)
    value = row.get("value")
    if messages is None or value is None:
        return None, False
    if row["type"] == "correction" or (value >= min_value and value > 0):
        kind = "similar"
    elif value <= -min_value and value < 0:
        kind = "not-similar"
    else:
        return None, False
    texts = {m["role"]: m["content"] for m in messages}
    keys = list(texts)
    redacted, changed = recheck_pii([texts[k] for k in keys], pii)
    texts = dict(zip(keys, redacted, strict=True))
    vars_: dict[str, str] = {"prompt": texts["user"]}
    if "system" in texts:
        vars_["system"] = texts["system"]
    rated = "corrected" if row["type"] == "correction" else f"rated {value:+.2f}"
    case = {
        "description": f"{row['source']}/{row['type']} {rated} (event {row['event_id']})",
        "vars": vars_,
        "assert": [{"type": kind, "value": texts["assistant"], "threshold": similarity}],
        "metadata": {k: v for k, v in _metadata(row).items() if v is not None},
    }
    return case, changed


def jsonl_record(row: dict[str, Any], pii: Counter[str]) -> tuple[dict[str, Any], bool]:
    """The event as one JSON object (``ts`` in ISO 8601 UTC), text re-checked for PII."""
    out = dict(row)
    out["ts"] = _iso(row["ts"])
    changed = False
    for column in _TEXT_COLUMNS:
        if isinstance(out.get(column), str):
            (out[column],), c = recheck_pii([out[column]], pii)
            changed |= c
    payload = dict(row.get("payload") or {})
    keys = sorted(payload)
    texts, c = recheck_pii([payload[k] for k in keys], pii)
    out["payload"] = dict(zip(keys, texts, strict=True))
    out["tags"] = list(row.get("tags") or [])
    return out, changed or c


# --- near-duplicate removal --------------------------------------------------------------
_NON_WORD = re.compile(r"[\W_]+")
_PRIME = 4_294_967_311  # the smallest prime above 2**32: (a * x + b) stays below 2**64


def normalize_text(text: str) -> str:
    """Case, accents' compatibility forms, punctuation and spacing folded away."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def shingles(text: str, k: int = 5) -> frozenset[int]:
    """32-bit hashes of the character ``k``-grams of the normalized text (the text itself when shorter)."""
    norm = normalize_text(text)
    grams = [norm[i : i + k] for i in range(max(1, len(norm) - k + 1))]
    return frozenset(zlib.crc32(g.encode()) for g in grams)


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    """Size of the intersection over size of the union (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 1.0


class NearDuplicateFilter:
    """Keeps a text unless one already kept is at least ``threshold`` similar (Jaccard of shingles).

    Candidates come from MinHash LSH (``bands`` x ``rows`` hash functions, fixed seed: the
    same input always keeps the same items); each candidate is confirmed by exact Jaccard.
    """

    def __init__(self, threshold: float = 0.85, *, bands: int = 20, rows: int = 6, seed: int = 1) -> None:
        if not 0 < threshold <= 1:
            raise ValueError("threshold must be in (0, 1]")
        self.threshold = threshold
        self.bands, self.rows = bands, rows
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, 2**31, size=bands * rows, dtype=np.uint64)
        self._b = rng.integers(0, 2**31, size=bands * rows, dtype=np.uint64)
        self._buckets: dict[tuple[int, bytes], list[int]] = {}
        self._kept: list[frozenset[int]] = []

    def _signature(self, sh: frozenset[int]) -> np.ndarray:
        x = np.fromiter(sh, dtype=np.uint64, count=len(sh))[:, None]
        return ((x * self._a + self._b) % np.uint64(_PRIME)).min(axis=0)

    def add(self, text: str) -> bool:
        """True (and remembered) when ``text`` is new; False when it nearly duplicates a kept one."""
        sh = shingles(text)
        sig = self._signature(sh)
        keys = [(band, sig[band * self.rows : (band + 1) * self.rows].tobytes()) for band in range(self.bands)]
        seen: set[int] = set()
        for key in keys:
            for index in self._buckets.get(key, ()):
                if index not in seen:
                    seen.add(index)
                    if jaccard(sh, self._kept[index]) >= self.threshold:
                        return False
        index = len(self._kept)
        self._kept.append(sh)
        for key in keys:
            self._buckets.setdefault(key, []).append(index)
        return True


def dedup(items: Iterable[T], text: Callable[[T], str], threshold: float = 0.85) -> tuple[list[T], int]:
    """The items without near-duplicates (the first of each group is kept), and how many went."""
    kept_filter = NearDuplicateFilter(threshold)
    kept: list[T] = []
    removed = 0
    for item in items:
        if kept_filter.add(text(item)):
            kept.append(item)
        else:
            removed += 1
    return kept, removed


def _conversation_text(item: dict[str, Any]) -> str:
    if "messages" in item:
        return "\n".join(f"{m['role']}: {m['content']}" for m in item["messages"])
    return "\n".join([*(f"{k}: {v}" for k, v in sorted(item["vars"].items())), str(item["assert"][0]["value"])])


# --- the export ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportFilters:
    """What ``feedback export`` selects: ``since <= ts < until``, ``min_value <= value <= max_value``
    (a None bound is open), the sources and types (empty: all), and minimum prompt and response
    lengths. ``band`` is promptfoo's: ``value >= band`` is ``similar``, ``value <= -band``
    ``not-similar`` (the CLI uses 0.7 without a value range, else 0: the range decides)."""

    since: datetime
    until: datetime
    min_value: float | None = 0.7
    sources: tuple[str, ...] = ()
    corrections: bool = False
    dedup_threshold: float = 0.85
    types: tuple[str, ...] = ()
    max_value: float | None = None
    min_prompt_chars: int = 0
    min_response_chars: int = 0
    band: float = 0.7

    def __post_init__(self) -> None:
        if self.min_value is not None and self.max_value is not None and self.min_value > self.max_value:
            raise ValueError(f"min_value {self.min_value:g} is above max_value {self.max_value:g}")
        if self.min_prompt_chars < 0 or self.min_response_chars < 0:
            raise ValueError("minimum prompt and response lengths must be 0 or more")


@dataclass
class ExportResult:
    format: str
    output: Path
    card: Path
    filters: ExportFilters
    selected: int = 0
    no_content: int = 0
    neutral: int = 0
    pii_changed: int = 0
    pii_kinds: Counter[str] = field(default_factory=Counter)
    duplicates_removed: int = 0
    too_short: int = 0
    written: int = 0
    first_ts: str | None = None
    last_ts: str | None = None
    by_source: Counter[str] = field(default_factory=Counter)
    by_model: Counter[str] = field(default_factory=Counter)
    by_source_model: Counter[tuple[str, str]] = field(default_factory=Counter)
    scores: Counter[str] = field(default_factory=Counter)
    value_sum: float = 0.0
    rated: int = 0


def _where(fmt: Format, filters: ExportFilters) -> tuple[str, dict[str, Any]]:
    clauses = ["ts >= fromUnixTimestamp64Micro({since:Int64})", "ts < fromUnixTimestamp64Micro({until:Int64})"]
    params: dict[str, Any] = {"since": to_micros(filters.since), "until": to_micros(filters.until)}
    if filters.sources:
        clauses.append("source IN {sources:Array(String)}")
        params["sources"] = list(filters.sources)
    if filters.types:
        clauses.append("type IN {types:Array(String)}")
        params["types"] = list(filters.types)
    if filters.min_value is not None:
        low = "value >= {min_value:Float64}"
        corrections = fmt == "training" and filters.corrections
        clauses.append(f"({low} OR type = 'correction')" if corrections else low)
        params["min_value"] = filters.min_value
    if filters.max_value is not None:
        clauses.append("value <= {max_value:Float64}")
        params["max_value"] = filters.max_value
    if fmt == "promptfoo":
        clauses.append("value IS NOT NULL")
    return " AND ".join(clauses), params


def long_enough(row: dict[str, Any], filters: ExportFilters) -> bool:
    """Whether the event's prompt and response are at least the minimum lengths (always, without one)."""
    if not filters.min_prompt_chars and not filters.min_response_chars:
        return True
    messages = conversation(row)
    if messages is None:
        return False
    turns = {m["role"]: m["content"] for m in messages}
    return len(turns["user"]) >= filters.min_prompt_chars and len(turns["assistant"]) >= filters.min_response_chars


def _rows(client: Any, table: str, fmt: Format, filters: ExportFilters) -> tuple[int, Iterator[dict[str, Any]]]:
    where, params = _where(fmt, filters)
    total = int(client.command(f"SELECT count() FROM {table} FINAL WHERE {where}", parameters=params))
    # Best rated and newest first: near-duplicates then keep the best example of each group.
    order = "value DESC, ts DESC, event_id" if fmt != "jsonl" else "ts, event_id"
    sql = f"SELECT {', '.join(COLUMNS)} FROM {table} FINAL WHERE {where} ORDER BY {order}"

    def rows() -> Iterator[dict[str, Any]]:
        with client.query_row_block_stream(sql, parameters=params) as stream:
            for block in stream:
                for row in block:
                    yield dict(zip(COLUMNS, row, strict=True))

    return total, rows()


def export_events(
    client: Any,
    table: str,
    fmt: Format,
    output: Path,
    filters: ExportFilters,
    *,
    advance: Callable[[int], None] | None = None,
    started: Callable[[int], None] | None = None,
) -> ExportResult:
    """Write the export to ``output`` and its data card next to it; returns the counts.

    ``started(total)`` is called once the number of selected events is known and
    ``advance(n)`` as rows are read (for a progress bar).
    """
    card = output.with_suffix(".card.md")
    result = ExportResult(fmt, output, card, filters)
    total, rows = _rows(client, table, fmt, filters)
    result.selected = total
    if started:
        started(total)
    items: list[dict[str, Any]] = []
    make_private_dirs(output.parent)
    jsonl_out = open_private(output, "w") if fmt == "jsonl" else None
    try:
        for i, row in enumerate(rows, start=1):
            if advance and i % 500 == 0:
                advance(500)
            if fmt == "jsonl":
                if not long_enough(row, filters):
                    result.too_short += 1
                    continue
                record, changed = jsonl_record(row, result.pii_kinds)
                assert jsonl_out is not None
                jsonl_out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
                _count(result, row, changed)
                continue
            pii: Counter[str] = Counter()  # counted only for the items written
            if fmt == "training":
                item, changed = training_example(row, pii)
            else:
                item, changed = promptfoo_case(row, filters.band, pii)
                if item is None and conversation(row) is not None:
                    result.neutral += 1
                    continue
            if item is None:
                result.no_content += 1
                continue
            if not long_enough(row, filters):
                result.too_short += 1
                continue
            item["_row"], item["_changed"], item["_pii"] = row, changed, pii
            items.append(item)
        if advance:
            advance(total % 500)
    finally:
        if jsonl_out is not None:
            jsonl_out.close()
    if fmt != "jsonl":
        kept, result.duplicates_removed = dedup(items, _conversation_text, filters.dedup_threshold)
        for item in kept:
            _count(result, item.pop("_row"), item.pop("_changed"))
            result.pii_kinds.update(item.pop("_pii"))
        _write_items(fmt, output, kept)
    write_private(card, data_card(result))
    return result


def _count(result: ExportResult, row: dict[str, Any], changed: bool) -> None:
    result.written += 1
    result.pii_changed += changed
    model = row.get("model_version") or "(none)"
    result.by_source[row["source"]] += 1
    result.by_model[model] += 1
    result.by_source_model[(row["source"], model)] += 1
    value = row.get("value")
    result.scores[score_bucket(value)] += 1
    if value is not None:
        result.rated += 1
        result.value_sum += value
    ts = _iso(row["ts"])
    result.first_ts = min(result.first_ts or ts, ts)
    result.last_ts = max(result.last_ts or ts, ts)


def _write_items(fmt: Format, output: Path, items: list[dict[str, Any]]) -> None:
    if fmt == "training":
        with open_private(output, "w") as fh:
            for item in items:
                fh.write(json.dumps(item, ensure_ascii=False) + "\n")
        return
    # promptfoo reads a tests file as YAML or JSON (a list of test cases): the suffix decides.
    if output.suffix == ".json":
        write_private(output, json.dumps(items, ensure_ascii=False, indent=2) + "\n")
        return
    import yaml

    write_private(output, yaml.safe_dump(items, allow_unicode=True, sort_keys=False, width=1000))


# --- the data card ---------------------------------------------------------------------------
#: The score distribution's buckets, in the card's order.
SCORE_BUCKETS = ("-1 ≤ value < -0.5", "-0.5 ≤ value < 0", "value = 0", "0 < value < 0.5", "0.5 ≤ value ≤ 1",
                 "no value")  # fmt: skip


def score_bucket(value: float | None) -> str:
    """The :data:`SCORE_BUCKETS` entry a value falls in."""
    if value is None:
        return SCORE_BUCKETS[5]
    if value == 0:
        return SCORE_BUCKETS[2]
    if value < 0:
        return SCORE_BUCKETS[0] if value < -0.5 else SCORE_BUCKETS[1]
    return SCORE_BUCKETS[3] if value < 0.5 else SCORE_BUCKETS[4]


def _filter_lines(f: ExportFilters, fmt: str) -> list[str]:
    lines = [f"- Types: {', '.join(f.types) if f.types else 'all'}"]
    low = "" if f.min_value is None else f"value ≥ {f.min_value:g}"
    high = "" if f.max_value is None else f"value ≤ {f.max_value:g}"
    if low or high:
        extra = (
            "; corrections included (corrected_response as the answer)" if fmt == "training" and f.corrections else ""
        )
        lines.append(f"- Quality filter: {' and '.join(x for x in (low, high) if x)}{extra}")
    if fmt == "promptfoo":
        if f.band > 0:
            lines.append(f"- Rated outputs: value ≥ {f.band:g} → `similar`, value ≤ {-f.band:g} → `not-similar`")
        else:
            lines.append("- Rated outputs: value above 0 → `similar`, below 0 → `not-similar`")
    if f.min_prompt_chars or f.min_response_chars:
        lines.append(f"- Minimum lengths: prompt {f.min_prompt_chars}, response {f.min_response_chars} characters")
    return lines


def _distribution_lines(result: ExportResult) -> list[str]:
    mean = f"{result.value_sum / result.rated:.3f}" if result.rated else "-"
    lines = ["", "## Score distribution", "", f"Mean value of the records written: {mean}.", "",
             "| value | records |", "|---|---|"]  # fmt: skip
    lines += [f"| {b} | {result.scores.get(b, 0)} |" for b in SCORE_BUCKETS]
    lines += ["", "## By source and model version", "", "| source | model version | records |", "|---|---|---|"]
    lines += [f"| {src} | {model} | {n} |" for (src, model), n in sorted(result.by_source_model.items())]
    return lines


_SCHEMAS = {
    "training": '{"messages": [{"role": "system"?, ...}, {"role": "user", "content": "..."}, '
    '{"role": "assistant", "content": "..."}], "metadata": {"event_id", "interaction_id", "source", "type", '
    '"value", "model_version", "prompt_version", "ts"}}',
    "promptfoo": "a list of test cases: description, vars.prompt (and vars.system), assert "
    "[similar | not-similar to the rated output, threshold], metadata",
    "jsonl": "one feedback_events row per line: " + ", ".join(COLUMNS),
}


def data_card(result: ExportResult) -> str:
    """The markdown data card written next to an export."""
    f = result.filters
    lines = [
        f"# Data card: {result.output.name}",
        "",
        f"- Generated: {_iso(datetime.now(UTC))}",
        f"- Format: `{result.format}`; written: **{result.written}** record(s) to `{result.output.name}`",
        f"- Time filter: {_iso(f.since)} ≤ ts < {_iso(f.until)}",
        f"- Events in the data: {result.first_ts or '-'} to {result.last_ts or '-'}",
        f"- Sources: {', '.join(f.sources) if f.sources else 'all'}",
        *_filter_lines(f, result.format),
    ]
    lines += [
        "",
        "## Counts",
        "",
        "| step | count |",
        "|---|---|",
        f"| events selected (FINAL, filters above) | {result.selected} |",
    ]
    if result.format != "jsonl":
        lines += [
            f"| without a prompt and a response (left out) | {result.no_content} |",
            *(
                [f"| rated between the thresholds (left out) | {result.neutral} |"]
                if result.format == "promptfoo"
                else []
            ),
            f"| near-duplicates removed (Jaccard ≥ {f.dedup_threshold:g} on 5-character shingles) "
            f"| {result.duplicates_removed} |",
        ]
    if f.min_prompt_chars or f.min_response_chars:
        lines.append(f"| prompt or response shorter than the minimum (left out) | {result.too_short} |")
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(result.pii_kinds.items())) or "none"
    lines += [
        f"| records changed by the PII re-check | {result.pii_changed} ({kinds}) |",
        f"| written | {result.written} |",
        "",
        "## By source",
        "",
        *[f"- {k}: {n}" for k, n in sorted(result.by_source.items())],
        "",
        "## By model version",
        "",
        *[f"- {k}: {n}" for k, n in sorted(result.by_model.items())],
        *_distribution_lines(result),
        "",
        "## Content",
        "",
        "The user turn is the payload's `" + "` / `".join(CONTENT_KEYS["user"]) + "`, the assistant turn its `"
        + "` / `".join(CONTENT_KEYS["assistant"]) + "` (a correction's `corrected_response`), the system turn its `"
        + "` / `".join(CONTENT_KEYS["system"]) + "`. Text was redacted by the gate and checked again here "
        "(typed placeholders such as `[EMAIL]`). No user or session ids are written"
        + (" except the pseudonymized `user_id` / `session_id` columns" if result.format == "jsonl" else "") + ".",
        "",
        f"Schema: {_SCHEMAS[result.format]}",
        "",
    ]  # fmt: skip
    return "\n".join(lines)

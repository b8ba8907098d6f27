"""The ClickHouse side of ``feedback insights``: per-group weighted sums, aggregated by the server.

One query reads the opinions of the current and the previous period once and returns, for
every dimension and group, the :class:`~pipeline.insights.Sums` of each period; nothing but
those sums leaves ClickHouse.

Opinions come from ``feedback_current FINAL`` (one row per opinion, its latest revision) when
that table exists, else from ``feedback_events FINAL`` (every event is an opinion).

**Session-level feedback.** An opinion with a session_id and no interaction_id counts toward
each interaction of its session: once per interaction, with its weight times its
``propagation_weight`` (NULL: 1), in that interaction's model_version, prompt_version and tags
(those of the interaction's latest opinion), and under its own source and type. The
interactions of a session are those named by opinions with that session_id in the two periods.
A session-level opinion whose session has no such interaction counts once, as itself.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pipeline.insights import ALL, PAIRS, SINGLE, Group, Insights, Sums, analyse
from pipeline.since import to_micros

__all__ = ["fetch_groups", "load_insights", "opinions_table", "reputation_weights"]


def opinions_table(client: Any, database: str, cluster: str | None = None) -> str:
    """``feedback_current`` (one row per opinion) when it exists, else ``feedback_events``; qualified.

    On a cluster, the Distributed ``*_all`` tables: ``feedback_current_all`` when there is one,
    else ``feedback_events_all``."""
    current = "feedback_current_all" if cluster else "feedback_current"
    if int(client.command(f"EXISTS TABLE `{database}`.{current}") or 0) == 1:
        return f"`{database}`.{current}"
    return f"`{database}`.{'feedback_events_all' if cluster else 'feedback_events'}"


def reputation_weights(client: Any, database: str) -> dict[str, float]:
    """Each source's latest reputation weight from ``reputation_history`` (latest: publish time, then
    partition and offset); empty when the table does not exist."""
    if int(client.command(f"EXISTS TABLE `{database}`.reputation_history") or 0) != 1:
        return {}
    rows = client.query(
        "SELECT toString(source), argMax(weight, (published_at, kafka_partition, kafka_offset)) "
        f"FROM `{database}`.reputation_history FINAL GROUP BY source"
    ).result_rows
    return {str(s): float(w) for s, w in rows}


def _key_array() -> str:
    """Every (dimension, key) a row belongs to: the singles, each tag, the pairs, and ``all``."""
    col = {"model_version": "mv", "prompt_version": "pv", "source": "src", "type": "typ"}
    items: list[str] = [f"('{ALL}', ['{ALL}'])"]
    for d in SINGLE:
        items.append(f"[('{d}', [{col[d]}])]" if d != "tag" else "arrayMap(t -> ('tag', [t]), tg)")
    for a, b in PAIRS:
        if "tag" in (a, b):
            other = col[b if a == "tag" else a]
            parts = "[t, " + other + "]" if a == "tag" else "[" + other + ", t]"
            items.append(f"arrayMap(t -> ('{a}/{b}', {parts}), tg)")
        else:
            items.append(f"[('{a}/{b}', [{col[a]}, {col[b]}])]")
    return "arrayConcat([" + items[0] + "], " + ", ".join(items[1:]) + ")"


def _sql(table: str, reputation: dict[str, float]) -> tuple[str, dict[str, Any]]:
    params: dict[str, Any] = {}
    if reputation:
        rep = "transform(toString(source), {rep_sources:Array(String)}, {rep_weights:Array(Float64)}, 1.0)"
        params["rep_sources"] = sorted(reputation)
        params["rep_weights"] = [reputation[s] for s in params["rep_sources"]]
    else:
        rep = "1.0"
    sql = f"""
WITH
base AS (
    SELECT ts, toString(source) AS src, toString(type) AS typ, ifNull(model_version, '(none)') AS mv,
           ifNull(prompt_version, '(none)') AS pv,
           if(empty(tags), ['(none)'], CAST(tags, 'Array(String)')) AS tg,
           value, session_id, interaction_id, ifNull(propagation_weight, 1.0) AS prop,
           ifNull(confidence, 1.0) / ifNull(sample_rate, 1.0) * {rep} AS w
    FROM {table} FINAL
    WHERE ts >= fromUnixTimestamp64Micro({{prev:Int64}}) AND ts < fromUnixTimestamp64Micro({{end:Int64}})
),
interactions AS (
    SELECT interaction_id AS iid, any(session_id) AS sid, argMax(mv, ts) AS imv, argMax(pv, ts) AS ipv,
           argMax(tg, ts) AS itg
    FROM base WHERE interaction_id IS NOT NULL AND session_id IS NOT NULL GROUP BY interaction_id
),
rows AS (
    SELECT ts, src, typ, mv, pv, tg, value, w FROM base
    WHERE value IS NOT NULL AND NOT (interaction_id IS NULL AND session_id IS NOT NULL
                                     AND session_id IN (SELECT sid FROM interactions))
    UNION ALL
    SELECT b.ts, b.src, b.typ, i.imv, i.ipv, i.itg, b.value, b.w * b.prop
    FROM base AS b INNER JOIN interactions AS i ON b.session_id = i.sid
    WHERE b.value IS NOT NULL AND b.interaction_id IS NULL
)
SELECT d.1 AS dimension, d.2 AS key, ts >= fromUnixTimestamp64Micro({{start:Int64}}) AS is_current,
       count(), sum(w), sum(w * w), sum(w * value), sum(w * value * value), sumIf(w, value > 0)
FROM rows ARRAY JOIN {_key_array()} AS d
GROUP BY dimension, key, is_current
"""
    return sql, params


def fetch_groups(
    client: Any, table: str, previous_start: datetime, start: datetime, end: datetime, reputation: dict[str, float]
) -> list[Group]:
    """The groups of every dimension with their sums for [start, end) and [previous_start, start)."""
    sql, params = _sql(table, reputation)
    params.update(prev=to_micros(previous_start), start=to_micros(start), end=to_micros(end))
    cells: dict[tuple[str, tuple[str, ...]], dict[bool, Sums]] = {}
    for dim, key, is_current, n, w, w2, wx, wx2, wpos in client.query(sql, parameters=params).result_rows:
        sums = Sums(int(n), float(w), float(w2), float(wx), float(wx2), float(wpos))
        cells.setdefault((str(dim), tuple(str(k) for k in key)), {})[bool(is_current)] = sums
    return [Group(dim, key, by.get(True, Sums()), by.get(False, Sums())) for (dim, key), by in sorted(cells.items())]


def load_insights(
    client: Any,
    database: str,
    cluster: str | None,
    previous_start: datetime,
    start: datetime,
    end: datetime,
    *,
    dimensions: tuple[str, ...] | None = None,
    min_samples: int = 30,
) -> tuple[Insights, str]:
    """The insights of [start, end) against [previous_start, start) over ``dimensions`` (default: all;
    the overall ``all`` group is always there), and the table the opinions came from."""
    table = opinions_table(client, database, cluster)
    groups = fetch_groups(client, table, previous_start, start, end, reputation_weights(client, database))
    chosen = [g for g in groups if dimensions is None or g.dimension in dimensions or g.dimension == ALL]
    return analyse(chosen, min_samples=min_samples), table

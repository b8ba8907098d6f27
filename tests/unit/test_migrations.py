"""The migration DDL: rendering per database, and the cluster variants generated from the same definitions."""

from __future__ import annotations

import re

import pytest

from sinks.migrations import MIGRATIONS, _render, distributed_tables, for_cluster


def test_versions_strictly_increase_and_every_statement_names_its_database() -> None:
    versions = [m.version for m in MIGRATIONS]
    assert versions == sorted(set(versions)) and versions[0] == 1
    for migration in MIGRATIONS:
        for statement in migration.statements:
            rendered = _render(statement, "analytics")
            assert "`analytics`." in rendered and "{db}" not in rendered


def test_cluster_variant_uses_replicated_engines_and_on_cluster() -> None:
    for migration in MIGRATIONS:
        for statement in migration.statements:
            rendered = _render(statement, "db", "prod")
            if rendered.lstrip().startswith("INSERT "):  # a backfill runs where the client is connected
                assert rendered == _render(statement, "db") and "ON CLUSTER" not in rendered
                continue
            if rendered.lstrip().startswith(("RENAME ", "EXCHANGE ")):  # ON CLUSTER ends these
                assert rendered.endswith(" ON CLUSTER `prod`"), rendered
                continue
            assert re.search(r"^\s*(CREATE|ALTER|DROP) [^(]*? ON CLUSTER `prod`", rendered), rendered[:120]
            assert "non_replicated_deduplication_window" not in rendered
            engine = re.search(r"ENGINE = (\w+)", rendered)
            if engine and "MATERIALIZED VIEW" not in rendered:
                assert engine.group(1).startswith("Replicated"), engine.group(1)
    triage = for_cluster("CREATE TABLE IF NOT EXISTS `db`.triage (x UInt8) ENGINE = ReplacingMergeTree(version)", "c")
    path = "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'"
    assert f"ReplicatedReplacingMergeTree({path}, version)" in triage
    with pytest.raises(ValueError, match="ON CLUSTER"):
        for_cluster("SELECT 1", "c")


def test_distributed_tables_shard_the_event_tables() -> None:
    ddl = distributed_tables("db", "prod")
    assert any("feedback_events_all" in d and "cityHash64(event_id)" in d for d in ddl)
    assert all("ON CLUSTER `prod`" in d and "ENGINE = Distributed(`prod`, `db`" in d for d in ddl)


class _Ledger:
    """A client whose ledger holds ``done`` and whose tables have ``columns`` ((table, column) pairs)."""

    def __init__(
        self, done: set[int], columns: set[tuple[str, str]], tables: dict[str, dict[str, str]] | None = None
    ) -> None:
        self.done, self.columns, self.commands = done, columns, []  # type: ignore[var-annotated]
        self.tables = tables or {}  # name → system.tables fields (engine, sorting_key)

    def command(self, sql: str) -> None:
        self.commands.append(sql)

    def query(self, sql: str, parameters: dict[str, str] | None = None) -> object:
        if "system.columns" in sql:
            assert parameters is not None
            rows = [(1,)] if (parameters["t"], parameters["c"]) in self.columns else []
        elif "system.tables" in sql:
            assert parameters is not None
            column = sql.split()[1]
            found = self.tables.get(parameters["t"], {})
            rows = [(found[column],)] if column in found else []
        else:
            rows = [(v,) for v in self.done]
        return type("R", (), {"result_rows": rows})()

    def insert(self, *args: object, **kw: object) -> None:
        pass


def test_a_statement_bound_to_a_column_is_skipped_once_the_column_is_gone() -> None:
    from sinks.migrations import apply_migrations

    m11 = next(m for m in MIGRATIONS if m.version == 11)
    (index,) = m11.while_column
    assert "finalizeAggregation(last_type)" in m11.statements[index]
    earlier = {m.version for m in MIGRATIONS if m.version != 11}
    fresh = _Ledger(earlier, {("interaction_stats", "last_type")})
    assert apply_migrations(fresh, "db") == [11]  # type: ignore[arg-type]
    assert any("UPDATE last = " in c for c in fresh.commands)
    rerun = _Ledger(earlier, set())  # the columns were dropped before the ledger row was written
    assert apply_migrations(rerun, "db") == [11]  # type: ignore[arg-type]
    assert not any("UPDATE last = " in c for c in rerun.commands)
    assert any("DROP COLUMN IF EXISTS last_type" in c for c in rerun.commands)


def test_feedback_current_names_the_gates_explicit_signals_and_fills_from_every_event() -> None:
    from sinks.migrations import _EXPLICIT_SQL
    from stream_processors.dedup import EXPLICIT_SIGNALS

    assert set(_EXPLICIT_SQL.strip("()").replace("'", "").split(", ")) == EXPLICIT_SIGNALS
    (m20,) = [m for m in MIGRATIONS if m.version == 20]
    create, view, backfill = (_render(s, "db") for s in m20.statements[1:])
    assert "ENGINE = ReplacingMergeTree(ts)" in create and "ORDER BY opinion_key" in create
    assert view.split(" AS SELECT ", 1)[1] == backfill.split(") SELECT ", 1)[1]  # the same rows, either way
    assert "FROM `db`.feedback_events" in backfill


def test_a_rename_or_exchange_is_skipped_once_it_happened() -> None:
    from sinks.migrations import apply_migrations

    earlier = {m.version for m in MIGRATIONS if m.version not in (21, 22)}
    old_key = {"sorting_key": "topic, partition, offset"}
    fresh = _Ledger(earlier, set(), {
        "feedback_daily": {"engine": "SummingMergeTree"}, "interaction_stats": {"engine": "AggregatingMergeTree"},
        "rejected_events": old_key, "dlq_events": old_key,
    })  # fmt: skip
    assert apply_migrations(fresh, "db") == [21, 22]  # type: ignore[arg-type]
    assert any(c.startswith("RENAME TABLE `db`.feedback_daily TO") for c in fresh.commands)
    assert sum(c.startswith("EXCHANGE TABLES") for c in fresh.commands) == 2
    # A re-run after everything but the ledger rows: the views and the rebuilt tables are in place.
    done = _Ledger(earlier, set(), {
        "feedback_daily": {"engine": "View"}, "interaction_stats": {"engine": "View"},
        "rejected_events": {"sorting_key": "topic, partition, offset, event_id"},
        "dlq_events": {"sorting_key": "topic, partition, offset, stage, item"},
    })  # fmt: skip
    assert apply_migrations(done, "db") == [21, 22]  # type: ignore[arg-type]
    skipped = ("RENAME", "EXCHANGE", "DROP TABLE IF EXISTS `db`.interaction_stats", "INSERT INTO `db`.rejected_events ")
    assert not [c for c in done.commands if c.strip().startswith(skipped)]
    assert any("CREATE VIEW IF NOT EXISTS `db`.feedback_daily" in c for c in done.commands)  # idempotent ones run

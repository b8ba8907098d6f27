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
            assert re.search(r"^\s*(CREATE|ALTER) [^(]*? ON CLUSTER `prod`", rendered), rendered[:120]
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

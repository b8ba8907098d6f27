"""StateTable: batch-at-a-time table writes with Faust's own bytes, for both stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faust
import orjson
import pytest
from faust.types import TP

from stream_processors.faust_glue import StateTable, bound_rocksdb, faust_json, json_table
from stream_processors.outputs import CapturedOutputs

KEYS = ["plain", "ünïcødé ✓", 'quo"te', "u_" + "a" * 32, "i:i-1:thumbs"]
VALUES: list[Any] = [{"bucket": [1.5, 1e9], "offset": 2**40, "limited": []}, {"x": None, "y": "ü", "z": [1, 2.5]}]


def _table(tmp_path: Path, store: str) -> StateTable:
    app = faust.App(
        f"glue-{store}", broker="kafka://127.0.0.1:1", store=store, datadir=str(tmp_path), web_enabled=False
    )
    table = json_table(app, "t", partitions=4)
    app.finalize()
    return StateTable(table)


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
def test_changes_are_visible_in_the_batch_and_reach_store_and_changelog_once(tmp_path: Path, store: str) -> None:
    state = _table(tmp_path, store)
    out = CapturedOutputs(partition_count=4)
    for i in range(3):  # one key written three times in a batch: one changelog record
        state.set("k", {"n": i}, 2)
    state.set("gone", {"n": 0}, 1)
    state.delete("gone", 1)
    assert state.get("k", 2) == {"n": 2} and state.get("gone", 1) is None and len(state) == 2
    assert state._read("k", 2) is None  # the store is not written before the flush

    state.produce(out)
    out.flush()
    state.commit()
    changelog = out.sent[state.changelog]
    assert sorted(changelog, key=lambda m: m[2]) == [(b'"gone"', None, 1), (b'"k"', b'{"n":2}', 2)]
    assert state.get("k", 2) == {"n": 2} and state._read("k", 2) == {"n": 2} and state.get("gone", 1) is None
    if store == "rocksdb://":  # Faust's recovery starts after what was delivered
        assert state.table.data.persisted_offset(TP(state.changelog, 2)) == 0


def test_bytes_are_the_ones_faust_writes(tmp_path: Path) -> None:
    state = _table(tmp_path, "rocksdb://")
    store = state.table.data
    for key in KEYS:
        assert faust_json(key) == store._encode_key(key)
    for value in VALUES:
        assert faust_json(value) == store._encode_value(value)
        assert orjson.loads(faust_json(value)) == value


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
def test_scan_from_visits_every_entry_once_in_bounded_steps(tmp_path: Path, store: str) -> None:
    state = _table(tmp_path, store)
    want = {f"key-{i:03d}": {"i": i} for i in range(250)}
    for i, (key, value) in enumerate(want.items()):
        state.set(key, value, i % 4)
    state.produce(CapturedOutputs(partition_count=4))
    state.commit()
    seen: dict[str, Any] = {}
    cursor, steps = None, 0
    while True:
        entries, cursor = state.scan_from(cursor, 40)
        assert len(entries) <= 40
        for key, value in entries:
            assert key not in seen
            seen[key] = value
        steps += 1
        if cursor is None:
            break
    assert seen == want and steps >= 250 // 40
    assert dict(state.items()) == want


def test_bounded_rocksdb_stores_work_and_share_one_cache(tmp_path: Path) -> None:
    from faust.stores.rocksdb import RocksDBOptions

    from stream_processors import faust_glue

    bound_rocksdb(32 * 1024 * 1024)
    try:
        state = _table(tmp_path, "rocksdb://")
        for i in range(2000):
            state.set(f"k{i}", {"i": i}, i % 4)
        state.produce(CapturedOutputs(partition_count=4))
        state.commit()
        assert state._read("k1999", 3) == {"i": 1999} and state._read("k1999", 2) is None
        assert len(state.items()) == 2000
        cache = faust_glue._MEMORY["cache"]
        assert cache.get_usage() > 0  # the memtables are charged to the one shared cache
    finally:
        RocksDBOptions.as_options = faust_glue._faust_as_options  # type: ignore[method-assign]

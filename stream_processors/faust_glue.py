"""Everything the worker relies on inside Faust, in one place.

Faust stays the stream framework: it owns the consumer group, the partition
assignment, the tables' stores (RocksDB or memory), their changelog topics and
their recovery. Two of its per-message paths are too slow for this worker and are
bypassed here, and only here:

* **Table writes.** ``table[key] = value`` sends one changelog record through
  Faust's producer (aiokafka) for every write, and needs the "current event" to
  pick the partition. :class:`StateTable` keeps a batch's changes in a dict (a key
  written many times in one batch is written once), queues one changelog record per
  changed key on the worker's confluent-kafka producer, and writes the store only
  after that producer's flush: the local store is never ahead of the changelog, so
  Faust's recovery (which replays the changelog from the store's persisted offset)
  always ends in the same state. The bytes are exactly what Faust writes itself
  (its ``json`` codec is orjson with these options; a unit test compares them).
* **RocksDB options.** Faust gives every table partition its own 2 GiB block cache and
  64 MiB write buffers; :func:`bound_rocksdb` puts them all under one memory budget.
* **The current event.** Faust's own table API picks a partition from a context variable
  (``faust.streams._current_event``) that ``take_events`` does not set for the events it hands
  over in a batch. :class:`StateTable` takes the partition as an argument instead, so nothing
  in the worker depends on that variable.

The Faust internals used here: a store's open partition databases (``_dbs``,
``_db_for_partition``), the memory store's ``data``/``_key_partition``,
``set_persisted_offset``, and ``RocksDBOptions.as_options``. faust-streaming's version is bounded
in ``pyproject.toml``; ``tests/unit/test_faust_glue.py`` exercises each with the installed version.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import faust
import orjson
from faust.types import TP

from stream_processors.outputs import Outputs

__all__ = ["StateTable", "bound_rocksdb", "faust_json", "json_table"]

_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z  # faust.utils.json.dumps with orjson installed


def faust_json(value: Any) -> bytes:
    """The bytes Faust's ``json`` codec writes for ``value``."""
    return orjson.dumps(value, option=_JSON_OPTIONS)


_DELETED = object()


class StateTable:
    """A Faust table (JSON keys and values) read and written a batch at a time.

    ``get``/``set``/``delete`` take the partition explicitly: the partition of the source
    message, which is also the table's changelog partition (as Faust's own writes do).
    :meth:`produce` queues the batch's changelog records; after the producer's flush,
    :meth:`commit` writes them to the local store and records the changelog offsets
    reached (Faust's persisted offset, so a restart replays only what is newer).
    """

    def __init__(self, table: Any) -> None:
        self.table = table
        self.name: str = table.name
        self.changelog: str = table.changelog_topic.get_topic_name()
        self._dirty: dict[str, tuple[int, Any]] = {}
        self._encoded: list[tuple[int, bytes, bytes | None]] = []  # the changelog records produced
        self._delivered: dict[int, int] = {}
        self._dbs: dict[int, Any] | None = None  # a RocksDB store's open partitions (Faust's own dict)
        self.changes = 0  # keys changed so far (one changelog record each): what a sweep has to keep up with

    # --- the store --------------------------------------------------------------
    @property
    def _store(self) -> Any:
        return self.table.data

    def _rocksdb(self) -> bool:
        return hasattr(self._store, "_db_for_partition")

    def _read(self, key: str, partition: int) -> Any:
        dbs = self._dbs
        if dbs is None:  # the first read: which kind of store (Faust creates it on first use)
            store = self._store
            if not self._rocksdb():
                return store.data.get(key)
            dbs = self._dbs = store._dbs
        db = dbs.get(partition)
        if db is None:
            db = self._store._db_for_partition(partition)  # opens it
        raw = db.get(faust_json(key))
        return None if raw is None else orjson.loads(raw)

    # --- a batch's view ---------------------------------------------------------
    def get(self, key: str, partition: int) -> Any:
        hit = self._dirty.get(key)
        if hit is None:
            return self._read(key, partition)
        return None if hit[1] is _DELETED else hit[1]

    def set(self, key: str, value: Any, partition: int) -> None:
        self._dirty[key] = (partition, value)

    def delete(self, key: str, partition: int) -> None:
        self._dirty[key] = (partition, _DELETED)

    def __len__(self) -> int:
        return len(self._dirty)

    def produce(self, outputs: Outputs) -> None:
        """Queue one changelog record per key changed in this batch."""
        delivered = self._on_delivered
        encoded = self._encoded = []
        self.changes += len(self._dirty)
        for key, (partition, value) in self._dirty.items():
            raw_key = faust_json(key)
            body = None if value is _DELETED else faust_json(value)
            encoded.append((partition, raw_key, body))
            outputs.produce(self.changelog, raw_key, body, partition, delivered)

    def _on_delivered(self, _topic: str, partition: int, offset: int) -> None:
        if offset > self._delivered.get(partition, -1):
            self._delivered[partition] = offset

    def commit(self) -> None:
        """After the flush: apply the batch to the local store (see the class doc)."""
        store = self._store
        if self._rocksdb():
            import rocksdict  # installed with faust-streaming[rocksdict], which the rocksdb store needs

            batches: dict[int, Any] = {}
            for partition, raw_key, body in self._encoded:
                batch = batches.get(partition)
                if batch is None:
                    batch = batches[partition] = rocksdict.WriteBatch(raw_mode=True)
                if body is None:
                    batch.delete(raw_key)
                else:
                    batch.put(raw_key, body)
            for partition, batch in batches.items():
                store._db_for_partition(partition).write(batch)
            for partition, offset in self._delivered.items():
                store.set_persisted_offset(TP(self.changelog, partition), offset)
        else:
            for key, (partition, value) in self._dirty.items():
                if value is _DELETED:
                    store.data.pop(key, None)
                    store._key_partition.pop(key, None)
                else:
                    store.data[key] = value
                    store._key_partition[key] = partition
        self._dirty.clear()
        self._encoded = []
        self._delivered.clear()

    # --- whole-table views (timers, tests) ----------------------------------------
    def scan(self) -> Iterator[tuple[str, Any]]:
        """Every (key, value) of the local store; values remember their partition."""
        store = self._store
        if self._rocksdb():
            for _partition, db in list(store._dbs.items()):
                for raw_key, raw_value in db.items():
                    if raw_key == store.offset_key or raw_value is None:
                        continue
                    yield orjson.loads(raw_key), orjson.loads(raw_value)
        else:
            yield from list(store.data.items())

    def scan_from(self, cursor: Any, limit: int) -> tuple[list[tuple[str, Any]], Any]:
        """Up to ``limit`` entries of the local store from ``cursor`` (None: the start), and the
        cursor to go on from (None once the whole store was seen): a timer walks a large table
        a bounded step at a time instead of stalling the agents with one full pass."""
        store = self._store
        out: list[tuple[str, Any]] = []
        if not self._rocksdb():
            keys = list(store.data)
            start = 0 if cursor is None else cursor
            for key in keys[start : start + limit]:
                out.append((key, store.data[key]))
            end = start + limit
            return out, (end if end < len(keys) else None)
        partitions = sorted(store._dbs)
        partition, after = cursor if cursor is not None else (partitions[0] if partitions else 0, None)
        for p in [q for q in partitions if q >= partition]:
            it = store._dbs[p].iter()
            if after is not None and p == partition:
                it.seek(after)
                if it.valid() and it.key() == after:
                    it.next()
            else:
                it.seek_to_first()
            while it.valid():
                raw_key, raw_value = it.key(), it.value()
                if raw_key != store.offset_key and raw_value is not None:
                    out.append((orjson.loads(raw_key), orjson.loads(raw_value)))
                    if len(out) >= limit:
                        return out, (p, raw_key)
                it.next()
        return out, None

    def items(self) -> list[tuple[str, Any]]:
        return list(self.scan())

    def keys(self) -> list[str]:
        return [k for k, _ in self.scan()]


_MEMORY: dict[str, Any] = {}


def bound_rocksdb(memory_bytes: int) -> None:
    """Make every RocksDB database this process opens share one memory budget.

    Faust opens one database per table and partition, each with its own 2 GiB block cache and
    up to three 64 MiB write buffers: a worker's tables could grow to gigabytes. Here Faust's
    ``RocksDBOptions.as_options`` (rocksdict driver) is replaced so that every database uses
    one LRU block cache of ``memory_bytes`` and a write-buffer manager that charges the
    memtables to that cache (so memtables and cached blocks share the one limit), 8 MiB write
    buffers, a bloom filter of 10 bits per key on files and on memtables (most dedup lookups are
    for keys never seen: a filter answers them without a search). What it costs: reads of keys
    not in the cache go to disk (the OS page cache), and memtables flush sooner.
    """
    import rocksdict
    from faust.stores import rocksdb as faust_rocksdb

    cache = rocksdict.Cache(memory_bytes)
    manager = rocksdict.WriteBufferManager.new_write_buffer_manager_with_cache(memory_bytes // 2, False, cache)
    _MEMORY.update(cache=cache, manager=manager, bytes=memory_bytes)

    def as_options(self: Any) -> Any:
        if not self.use_rocksdict:  # pragma: no cover - python-rocksdb: Faust's own options
            return _faust_as_options(self)
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_max_open_files(self.max_open_files)
        options.set_write_buffer_size(8 * 1024 * 1024)
        options.set_max_write_buffer_number(2)
        options.set_target_file_size_base(self.target_file_size_base)
        options.set_write_buffer_manager(_MEMORY["manager"])
        options.set_memtable_prefix_bloom_ratio(0.1)
        options.set_memtable_whole_key_filtering(True)
        table = rocksdict.BlockBasedOptions()
        table.set_bloom_filter(10, False)
        table.set_block_cache(_MEMORY["cache"])
        table.set_cache_index_and_filter_blocks(True)
        table.set_pin_l0_filter_and_index_blocks_in_cache(True)
        options.set_block_based_table_factory(table)
        return options

    global _faust_as_options
    if _faust_as_options is None:
        _faust_as_options = faust_rocksdb.RocksDBOptions.as_options
    faust_rocksdb.RocksDBOptions.as_options = as_options  # type: ignore[method-assign]


_faust_as_options: Any = None


def json_table(app: faust.App, name: str, partitions: int, options: dict[str, Any] | None = None) -> Any:
    """A Faust table with JSON keys and values, as :class:`StateTable` reads and writes them."""
    schema = faust.Schema(key_serializer="json", value_serializer="json")
    return app.Table(name, default=None, schema=schema, partitions=partitions, options=options)

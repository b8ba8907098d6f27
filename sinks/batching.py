"""One batching base for every sink: collect, flush on size or time, commit after the flush.

Offsets are committed only after :meth:`BatchingSink.flush` returns, i.e. after the
batch is durable. A :class:`TransientError` from ``flush`` pauses consumption and
retries the same batch with backoff, so nothing is lost while a store is down.

Replays rebuild the same batches. Before flushing, the sink commits each
partition's *first* offset with commit metadata naming the batch's *last* offset
(an intent). A sink that restarts after a crash finds the intent with the
committed offset and collects that partition's first batch up to exactly that
offset, so the batch, and the ``insert_deduplication_token`` derived from its
offset range, are the same as before the crash and ClickHouse drops the repeat.
That first batch holds only the partitions with an intent (what the others deliver
meanwhile waits for the next batch), so a sink that owns them all rebuilds the batch
whole, and a token derived from all of its ranges at once is the same too.

The steps for one batch, and what a kill between them leaves:

1. collect (by size or time; a partition with an intent: exactly up to it);
2. commit the intent (each partition's first offset, metadata ``batch-end:<last>``);
3. flush (ClickHouse insert with the range's token; for JSONL see :mod:`sinks.jsonl`);
4. commit ``last + 1`` with empty metadata.

Killed during 1 or 2, nothing was written, and the next run collects afresh from
the previous commit. Killed during or after 3 and before 4, the intent is there:
the next run rebuilds exactly the same range, so the same token, and ClickHouse
drops what was already inserted. After 4 the batch is done.

A failed intent commit is retried (consumption paused) and the batch is never
flushed without one; a failed final commit is only logged: the intent stays, and
a replay is deduplicated. Messages consumed while waiting for an intent's range
from other partitions are held back once the batch is full.

Overlap (``overlap_flush``, on for the ClickHouse event sink): batch N is flushed on a
worker thread while the sink thread collects batch N+1 (only the sink thread touches
the consumer). Before N+1's intent is committed, N's flush is awaited (retried there
if it failed); N's "done" and N+1's intent then go out in one commit. So the intent
on record always names a batch that is either in flight or done, and the crash cases
above are unchanged. A rebalance waits for the flush in flight and commits it before
the partitions move.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import groupby, islice
from operator import lt, methodcaller
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from pipeline.errors import TransientError
from pipeline.settings import Settings

__all__ = ["INTENT_PREFIX", "Batch", "BatchingSink", "by_partition", "decode_intent", "encode_intent", "run_sinks"]

log = logging.getLogger(__name__)

_ERROR, _PARTITION, _OFFSET = methodcaller("error"), methodcaller("partition"), methodcaller("offset")

INTENT_PREFIX = "batch-end:"
INTENT_TIMEOUT_S = 120.0  # an intent whose messages never come (retention, a shrunk topic) is given up


class Batch(list[Message]):
    """One batch's messages in consumption order, also grouped per ``(topic, partition)`` (each
    group in strictly increasing offsets), so committing and grouping cost one step per
    partition instead of one per message."""

    def __init__(self, messages: Iterable[Message] = ()) -> None:
        super().__init__()
        self.parts: dict[tuple[str, int], list[Message]] = {}
        for msg in messages:
            self.add((msg.topic(), msg.partition()), msg)

    def add(self, key: tuple[str, int], msg: Message) -> None:
        self.append(msg)
        part = self.parts.get(key)
        if part is None:
            self.parts[key] = [msg]
        else:
            part.append(msg)

    def add_run(self, key: tuple[str, int], run: list[Message]) -> None:
        """``add`` for several messages of one partition, in offset order."""
        self.extend(run)
        part = self.parts.get(key)
        if part is None:
            self.parts[key] = run
        else:
            part.extend(run)

    def drop(self, keys: set[tuple[str, int]]) -> None:
        """Remove every message of the partitions ``keys`` (in place)."""
        if keys & self.parts.keys():
            self[:] = [m for m in self if (m.topic(), m.partition()) not in keys]
            for key in keys:
                self.parts.pop(key, None)


def _parts(messages: Sequence[Message]) -> dict[tuple[str, int], list[Message]]:
    if isinstance(messages, Batch):
        return messages.parts
    return Batch(messages).parts


def by_partition(messages: Sequence[Message]) -> dict[int, list[Message]]:
    """A batch's messages grouped by partition, each group in offset order (one topic per sink)."""
    return {partition: msgs for (_topic, partition), msgs in _parts(messages).items()}


def encode_intent(last_offset: int) -> str:
    return f"{INTENT_PREFIX}{last_offset}"


def decode_intent(metadata: str | None) -> int | None:
    """The last offset of the batch in flight when the offset was committed, if any."""
    if not metadata or not metadata.startswith(INTENT_PREFIX):
        return None
    try:
        return int(metadata.removeprefix(INTENT_PREFIX))
    except ValueError:
        return None


class BatchingSink(ABC):
    """Consumes ``topic`` in batches of at most ``batch_rows`` or ``batch_ms``; a batch with rows
    also closes when nothing new arrived for ``sink_idle_ms``."""

    name = "sink"
    overlap_flush = False  # flush batch N on a worker thread while batch N+1 is collected
    # A side table (rejections, dead letters, state history, triage, interactions): nobody waits on
    # it within a second, so it writes bigger batches less often (sink_side_batch_ms/idle_ms). Every
    # insert costs the embedded ClickHouse ~10 ms of CPU however small; these are most of them.
    side_table = False

    def __init__(
        self,
        settings: Settings,
        topic: str,
        group_id: str,
        *,
        batch_rows: int | None = None,
        batch_ms: int | None = None,
        consumer_config: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.batch_rows = batch_rows or settings.sink_batch_rows
        self.batch_ms = batch_ms or settings.sink_batch_ms
        self.idle_ms = settings.sink_idle_ms
        if self.side_table and batch_ms is None:
            self.batch_ms = max(self.batch_ms, settings.sink_side_batch_ms)
            self.idle_ms = max(self.idle_ms, settings.sink_side_idle_ms)
        conf: dict[str, Any] = {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
            # Keep librdkafka's prefetch queue deep (bounded by queued.max.messages.kbytes, 64 MiB) and
            # answer fetches within 50 ms: a batch is then consumed from memory, ~2x the defaults.
            # When the queue is full, fetch again 20 ms later rather than after the default 1 s (a
            # backlog over 64 MiB fills it; bare consume loop, 300k messages: 416k-453k -> 441k-492k/s).
            "queued.min.messages": 1_000_000,
            "fetch.wait.max.ms": 50,
            "fetch.queue.backoff.ms": 20,
            "client.id": f"feedback-{self.name}",
            "session.timeout.ms": int(settings.kafka_session_timeout_s * 1000),
        }
        conf.update(consumer_config or {})
        self._consumer = Consumer(conf)
        self._intents: dict[tuple[str, int], int] = {}  # partition → the offset its first batch must end at
        self._intent_deadline = 0.0
        self._carry: list[Message] = []  # consumed past an intent: the start of the next batch
        self._batch = Batch()  # the batch being collected
        self._last_taken: dict[tuple[str, int], int] = {}  # per partition, in the batch being collected
        self._closed: set[tuple[str, int]] = set()
        self._replaying: set[tuple[str, int]] = set()  # the partitions with an intent when the batch began
        self._inflight = Batch()  # the batch last handed to flush, until its offsets are committed
        self._inflight_flushed = False
        self._pending: Future[None] | None = None  # its flush on the worker thread
        self._stop = threading.Event()
        self.rows_written = 0
        self.batches = 0

    @abstractmethod
    def flush(self, messages: Sequence[Message]) -> None:
        """Make ``messages`` durable. Raise :class:`TransientError` to have the batch retried."""

    def stop(self) -> None:
        self._stop.set()

    def start_offsets(
        self, partitions: list[TopicPartition], committed: dict[tuple[str, int], int]
    ) -> dict[tuple[str, int], int]:
        """Where to start reading newly assigned partitions, when the sink knows better than the
        ``committed`` offsets (the JSONL sink's ledger). Default: the committed offsets."""
        return {}

    def maintenance(self) -> None:
        """Called between batches (and when idle) on the sink's thread; for housekeeping."""
        return

    def _forget(self, keys: set[tuple[str, int]]) -> None:
        """Drop what was collected for ``keys``: after a revoke or a (re)assignment those partitions
        are read again from their committed offsets, and must not appear twice in a batch."""
        self._carry = [m for m in self._carry if (m.topic(), m.partition()) not in keys]
        self._batch.drop(keys)
        self._inflight.drop(keys)
        for key in keys:
            self._intents.pop(key, None)
            self._last_taken.pop(key, None)
            self._closed.discard(key)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._drain_inflight()
        self._forget({(tp.topic, tp.partition) for tp in partitions})
        committed = consumer.committed(partitions, timeout=30)
        for tp in committed:
            end = decode_intent(tp.metadata)
            if end is not None and tp.offset >= 0 and end >= tp.offset:
                self._intents[(tp.topic, tp.partition)] = end
                log.info("batch_intent sink=%s partition=%d first=%d last=%d", self.name, tp.partition, tp.offset, end)
        self._intent_deadline = time.monotonic() + INTENT_TIMEOUT_S
        starts = self.start_offsets(partitions, {(tp.topic, tp.partition): tp.offset for tp in committed})
        for tp in partitions:
            if (tp.topic, tp.partition) in starts:
                tp.offset = starts[(tp.topic, tp.partition)]
                self._intents.pop((tp.topic, tp.partition), None)
        consumer.assign(partitions)
        # librdkafka keeps a partition's pause across a rebalance: one paused by _wait_paused when the
        # group moved (a broker lost) would be assigned again paused and never deliver its intent.
        consumer.resume(partitions)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._drain_inflight()
        self._forget({(tp.topic, tp.partition) for tp in partitions})  # a failed flush keeps what is still ours

    def _drain_inflight(self) -> None:
        """Before partitions move: wait for the flush in flight and commit it if it succeeded."""
        self._settle_inflight()
        if self._inflight and self._inflight_flushed:
            self._commit_done(self._inflight)
            self._inflight = Batch()

    def run(self, idle_exit_s: float | None = None) -> None:
        """Consume until :meth:`stop` (or ``idle_exit_s`` without messages, for one-shot runs)."""
        self._consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        last_message = time.monotonic()
        worker = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-flush") if self.overlap_flush else None
        try:
            while not self._stop.is_set():
                if self._pending is None:
                    self.maintenance()
                batch = self._collect()
                if not batch:
                    self._commit_done(self._await_inflight())
                    if idle_exit_s is not None and time.monotonic() - last_message > idle_exit_s:
                        return
                    continue
                last_message = time.monotonic()
                done = self._await_inflight()
                if not self._commit_intent(batch, done):
                    self._commit_done(done)
                    continue  # stopping, or the partitions moved: their new owner starts from the commits
                if worker is not None:
                    self._inflight, self._inflight_flushed = batch, False
                    self._pending = worker.submit(self._flush_counted, batch)
                else:
                    self._flush_with_retry(batch)
                    self._commit_done(batch)
        except TransientError as exc:
            if not self._stop.is_set():
                raise
            log.warning("sink_stopped_mid_batch sink=%s error=%s", self.name, exc)  # the intent stays for a replay
        finally:
            try:
                self._drain_inflight()
            finally:
                if worker is not None:
                    worker.shutdown(wait=True)
                self._consumer.close()

    def _settle_inflight(self) -> None:
        """Wait for the flush on the worker thread, if any; a transient failure leaves the batch
        in ``_inflight`` for :meth:`_await_inflight` to retry."""
        future, self._pending = self._pending, None
        if future is None:
            return
        try:
            future.result()
            self._inflight_flushed = True
        except TransientError as exc:
            log.warning("flush_failed sink=%s rows=%d error=%s", self.name, len(self._inflight), exc)

    def _await_inflight(self) -> Batch:
        """The batch handed to the worker, once durable (retried here if its flush failed), for its
        offsets to be committed; ``[]`` when there is none."""
        self._settle_inflight()
        if self._inflight and not self._inflight_flushed:
            self._flush_with_retry(self._inflight)  # _inflight stays visible to rebalances meanwhile
        batch, self._inflight = self._inflight, Batch()
        return batch

    def _collect(self) -> Batch:
        """The next batch: up to ``batch_rows`` messages or ``batch_ms``; a partition with an
        intent contributes exactly the messages up to the intent's offset."""
        batch = self._batch = Batch()
        self._last_taken = {}
        self._closed: set[tuple[str, int]] = set()  # partitions whose range in this batch is fixed
        self._replaying = set(self._intents)  # a replay: only these partitions, each up to its intent
        carry, self._carry = self._carry, []
        for msg in carry:
            self._take(msg, batch)
        deadline = time.monotonic() + self.batch_ms / 1000
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if self._intents and time.monotonic() > self._intent_deadline:
                log.warning("batch_intent_abandoned sink=%s partitions=%s", self.name, sorted(self._intents))
                self._intents.clear()
            if not self._intents and (self._replaying or len(batch) >= self.batch_rows or remaining <= 0):
                break  # (a replay is complete once its last intent's range is in)
            # Once the batch has rows, a consume that finds nothing new within idle_ms closes it: at
            # low rates rows are written as they come instead of waiting out batch_ms; under load
            # every consume returns rows, and batches fill to batch_rows or batch_ms as before.
            waiting = len(batch) > 0 and self.idle_ms > 0 and not self._intents
            msgs = self._consumer.consume(
                num_messages=max(1, min(10_000, self.batch_rows - len(batch))),
                timeout=min(max(remaining, 0.001), self.idle_ms / 1000) if waiting else max(remaining, 0.05),
            )
            if waiting and not msgs:
                break
            if self._intents.keys() - self._replaying:  # assigned during that consume, with intents
                if batch:  # this batch is not their replay: it ends here, they start the next one
                    self._carry.extend(msgs)
                    break
                self._replaying.update(self._intents)
            self._take_many(msgs, batch)
        return batch

    def _take_many(self, msgs: list[Message], batch: Batch) -> None:
        """:meth:`_take` for what one ``consume`` returned. In the usual case (no intent pending,
        no partition held back, no error) each run of one partition that carries on in increasing
        offsets from where the batch left that partition is taken whole; anything else goes
        message by message. One topic per sink, so a run is one partition's."""
        if self._intents or self._closed or any(map(_ERROR, msgs)):
            for msg in msgs:
                err = msg.error()
                if err is None:
                    self._take(msg, batch)
                elif err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume_error sink=%s code=%s", self.name, err.name())
            return
        last_taken = self._last_taken
        for partition, group in groupby(msgs, _PARTITION):
            run = list(group)
            key = (run[0].topic(), partition)
            offsets = list(map(_OFFSET, run))
            if offsets[0] > last_taken.get(key, -1) and all(map(lt, offsets, islice(offsets, 1, None))):
                last_taken[key] = offsets[-1]
                batch.add_run(key, run)
            else:
                for msg in run:
                    self._take(msg, batch)

    def _take(self, msg: Message, batch: Batch) -> None:
        key = (msg.topic(), msg.partition())
        if msg.offset() <= self._last_taken.get(key, -1):
            return  # delivered again (a seek or rebalance mid-batch): already in the batch
        self._last_taken[key] = msg.offset()
        if key in self._closed:
            self._carry.append(msg)  # the intent's range is complete: the rest waits for the next batch
            return
        end = self._intents.get(key)
        if end is None:
            if self._holds_back(key):
                self._closed.add(key)
                self._carry.append(msg)
                return
            batch.add(key, msg)
        elif msg.offset() > end:
            self._carry.append(msg)
            del self._intents[key]
            self._closed.add(key)
        else:
            batch.add(key, msg)
            if msg.offset() == end:
                del self._intents[key]
                self._closed.add(key)

    def _holds_back(self, key: tuple[str, int]) -> bool:
        """Whether a message of ``key``, a partition without an intent, waits for the next batch:
        during a replay, which holds the partitions of the batch it rebuilds and nothing else."""
        return bool(self._replaying)

    def _flush_counted(self, batch: list[Message]) -> None:
        self.flush(batch)
        self.rows_written += len(batch)
        self.batches += 1

    def _flush_with_retry(self, batch: list[Message]) -> None:
        delay = 0.5
        while True:
            try:
                self._flush_counted(batch)
                return
            except TransientError as exc:
                if self._stop.is_set():
                    raise
                log.warning("flush_retry sink=%s rows=%d retry_in_s=%.1f error=%s", self.name, len(batch), delay, exc)
                self._wait_paused(delay)
                delay = min(delay * 2, 30.0)

    def _wait_paused(self, delay: float) -> None:
        """Wait with consumption paused, serving the group (heartbeats, rebalances) meanwhile.

        A rebalance served here drops the moved partitions from the batch in flight (in place);
        their intents are committed, so whoever reads them next rebuilds the same ranges.
        """
        try:
            self._consumer.pause(self._consumer.assignment())
        except KafkaException as exc:
            log.warning("pause_failed sink=%s error=%s", self.name, exc)
        self._stop.wait(delay)
        msg = self._consumer.poll(0)
        if msg is not None and msg.error() is None:
            self._carry.append(msg)  # a partition assigned during the poll is not paused
        try:
            self._consumer.resume(self._consumer.assignment())
        except KafkaException as exc:
            log.warning("resume_failed sink=%s error=%s", self.name, exc)

    def _commit_intent(self, batch: list[Message], done: Sequence[Message] = ()) -> bool:
        """Commit the batch's intent (with ``done``, the previous batch, as committed where the new one
        does not continue it), retrying until it is durable; False if the batch is gone (stopping, or
        its partitions were revoked while retrying)."""
        delay = 0.5
        while batch:
            try:
                self._commit(batch, intent=True, done=done)
                return True
            except KafkaException as exc:
                if self._stop.is_set():
                    return False
                log.warning("intent_commit_retry sink=%s retry_in_s=%.1f error=%s", self.name, delay, exc)
                self._wait_paused(delay)
                delay = min(delay * 2, 30.0)
        return False

    def _commit_done(self, batch: list[Message]) -> None:
        """Commit ``last + 1``. On failure the intent stays: a replay rebuilds this batch and is
        deduplicated, and the next batch's intent commit moves the offsets on anyway."""
        if not batch:
            return
        try:
            self._commit(batch)
        except KafkaException as exc:
            log.warning("commit_failed sink=%s rows=%d error=%s", self.name, len(batch), exc)

    def _commit(self, batch: Sequence[Message], *, intent: bool = False, done: Sequence[Message] = ()) -> None:
        """Commit after the flush (next offset), or before it (``intent``: first offset + the last in
        metadata). ``done``: a flushed batch whose partitions not in ``batch`` are committed as done."""
        parts = _parts(batch)
        if intent:
            offsets = [
                TopicPartition(t, p, msgs[0].offset(), metadata=encode_intent(msgs[-1].offset()))
                for (t, p), msgs in parts.items()
            ]
        else:
            offsets = [TopicPartition(t, p, msgs[-1].offset() + 1) for (t, p), msgs in parts.items()]
        offsets += [
            TopicPartition(t, p, msgs[-1].offset() + 1) for (t, p), msgs in _parts(done).items() if (t, p) not in parts
        ]
        for tp in self._consumer.commit(offsets=offsets, asynchronous=False) or []:
            if tp.error is not None:  # a partition's commit failed while the request succeeded
                raise KafkaException(tp.error)


def run_sinks(sinks: Sequence[BatchingSink], idle_exit_s: float | None = None) -> list[str]:
    """Run each sink in its own thread until all have stopped; returns the names of those
    that died from an error.

    One sink failing stops the others (cleanly: each finishes or abandons its batch and
    keeps its intent), so the process exits and its supervisor restarts it, instead of
    running on with a sink that no longer moves.
    """
    failed: list[str] = []

    def _run(sink: BatchingSink) -> None:
        try:
            sink.run(idle_exit_s=idle_exit_s)
        except BaseException as exc:  # reported below; the process then exits non-zero
            # The type and where it was raised, never the message: it may quote a payload.
            where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
            at = f"{where.filename.rsplit('/', 1)[-1]}:{where.lineno}" if where else "?"
            log.error("sink_failed sink=%s error=%s at=%s", sink.name, type(exc).__name__, at)
            failed.append(sink.name)
            for other in sinks:
                other.stop()

    threads = [threading.Thread(target=_run, args=(s,), name=s.name, daemon=True) for s in sinks]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.5)
    return failed

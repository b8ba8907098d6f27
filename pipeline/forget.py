"""``feedback forget``: erase one user from every store the pipeline keeps (GDPR art. 17).

The user is named by the id their services send (``--user-id``; its keyed pseudonym is
derived, so pseudonymized rows are found) or by the pseudonym itself (``--pseudonym``,
e.g. copied from a ClickHouse row). Every store keeps its one writer; ``forget`` asks
each writer through the pipeline's own channels, in an order that leaves nothing behind:

1. **Drain.** An erasure marker (a null value keyed by the id) goes to every partition of
   ``feedback.raw.v1``; the gate drops that subject's rate-limit entry (tombstoned in its
   changelog). Once the worker's committed offsets pass the markers, everything the user
   sent before is past the gate; ``forget`` then waits for the enrich agent and the
   ClickHouse and JSONL sinks to consume what is ahead of them, so nothing in flight
   lands after the erasure.
2. **Find.** The user's events in ClickHouse give their event ids (triage items) and
   interaction ids (delayed-feedback contexts).
3. **Tombstone.** A tombstone per interaction id on the compacted
   ``feedback.interactions.v1`` (the worker drops its table entry, changelog included);
   an ``erase`` command per triage item on ``feedback.triage-commands.v1`` (the worker
   drops the item and tombstones it on ``feedback.triage.v1``; the triage sink deletes
   its ClickHouse rows and rewrites ``triage-queue.jsonl``).
4. **Delete** the user's rows from ClickHouse (``feedback_events``, ``feedback_current``, ``interaction_stats``,
   ``interactions``, ``triage``) with synchronous mutations: the data parts are rewritten,
   not masked.
5. **Files.** The daily JSONL files are rewritten without the user's lines by their one
   writer: the JSONL sink when it runs (a request in ``$FEEDBACK_PATH/.erasure/``),
   ``forget`` itself under the writer lock when it does not.
6. **Verify** by query and by scanning the files; print what was erased.

First of all, a record keyed by the user's keyed pseudonym (never the id) goes to the
compacted ``feedback.erasures.v1``: ``feedback dlq replay`` reads it and never sends a
dead letter of that user back through the gate.

Not erased, and said so: topics with time retention (raw, enrich, clean, rejected,
dead letters) hold the user's events until they age out; ``feedback_daily`` holds only
counts per source, type and day. Running ``forget`` again is harmless.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from pipeline.errors import StackError
from pipeline.settings import Settings
from schemas.topics import TOPICS, Topics
from schemas.triage_records import TriageCommand
from sinks.state_sinks import TRIAGE_QUEUE_FILE

__all__ = ["ForgetReport", "forget", "user_ids"]

log = logging.getLogger(__name__)
#: librdkafka's own log lines (one per failed connection attempt); the command says it in one line.
_client_log = logging.getLogger("pipeline.forget.kafka")
_client_log.addHandler(logging.NullHandler())
_client_log.propagate = False

POLL_S = 0.5
_DAY_MS = 86_400_000


@dataclass
class ForgetReport:
    """What one ``forget`` run did. ``erased`` counts per store; ``pending`` says what is not done yet."""

    erased: dict[str, int] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    remaining: dict[str, int] = field(default_factory=dict)  # found again by the final check
    ageing: dict[str, float] = field(default_factory=dict)  # topic → days until the user's events age out

    @property
    def complete(self) -> bool:
        return not self.pending and not any(self.remaining.values())


_PSEUDONYM = re.compile(r"u_[0-9a-f]{32}")


def erasure_keys(settings: Settings, given: str) -> set[str]:
    """The keys of the user's record on ``feedback.erasures.v1``: the keyed pseudonym of the id
    as given (the form ``dlq replay`` derives from a letter), and the given value itself when it
    is already a pseudonym (``--pseudonym``). Never an id in clear."""
    from stream_processors.config import hash_key
    from stream_processors.redact import pseudonymize

    keys = {pseudonymize(given, hash_key(settings))}
    if _PSEUDONYM.fullmatch(given):
        keys.add(given)
    return keys


def user_ids(settings: Settings, user_id: str | None, pseudonym: str | None) -> set[str]:
    """Every form the user's id takes in the stores: as sent, and pseudonymized."""
    from stream_processors.config import pseudonym_key
    from stream_processors.redact import pseudonymize

    if pseudonym:
        return {pseudonym}
    assert user_id
    ids = {user_id}
    key = pseudonym_key(settings)
    if key is not None:
        ids.add(pseudonymize(user_id, key))
    return ids


class _Kafka:
    """The producer and the offset reader ``forget`` needs (never joins a consumer group)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        common = {"bootstrap.servers": settings.kafka_bootstrap, "client.id": "feedback-forget", "logger": _client_log}
        # Kafka's Java partitioner, like every producer of these keys: a tombstone must land in its key's partition.
        self.producer = Producer(
            {**common, "acks": "all", "enable.idempotence": True, "partitioner": "murmur2_random",
             "message.timeout.ms": 30_000}
        )  # fmt: skip
        self._readers: dict[str, Consumer] = {}

    def reader(self, group: str) -> Consumer:
        if group not in self._readers:
            self._readers[group] = Consumer(
                {"bootstrap.servers": self.settings.kafka_bootstrap, "group.id": group, "enable.auto.commit": False,
                 "client.id": "feedback-forget", "logger": _client_log}
            )  # fmt: skip
        return self._readers[group]

    def partitions(self, topic: str) -> list[int]:
        meta = self.producer.list_topics(topic, timeout=15).topics[topic]
        if meta.error is not None:
            raise RuntimeError(f"topic {topic}: {meta.error.str()}")
        return sorted(meta.partitions)

    def send(self, topic: str, messages: Iterable[tuple[bytes, bytes | None, int | None]]) -> dict[int, int]:
        """Publish (key, value, partition or None) and wait for every acknowledgement; returns the
        highest offset written per partition."""
        last: dict[int, int] = {}
        failures: list[str] = []

        def delivered(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                failures.append(err.str())
            else:
                last[msg.partition()] = max(last.get(msg.partition(), -1), msg.offset())

        for key, value, partition in messages:
            kwargs: dict[str, Any] = {"key": key, "value": value, "on_delivery": delivered}
            if partition is not None:
                kwargs["partition"] = partition
            while True:
                try:
                    self.producer.produce(topic, **kwargs)
                    break
                except BufferError:
                    self.producer.poll(0.1)
        if self.producer.flush(60) or failures:
            raise RuntimeError(f"Kafka did not acknowledge the erasure on {topic}: {(failures or ['timed out'])[0]}")
        return last

    def ends(self, topic: str) -> dict[int, tuple[int, int]]:
        """(low, high) watermark per partition."""
        reader = self.reader("feedback-forget")
        return {p: reader.get_watermark_offsets(TopicPartition(topic, p), timeout=15) for p in self.partitions(topic)}

    def caught_up(self, group: str, topic: str, targets: dict[int, int]) -> bool:
        """Whether ``group`` has committed at least ``targets[p]`` (the next offset to read) on each partition."""
        if not targets:
            return True
        committed = self.reader(group).committed([TopicPartition(topic, p) for p in targets], timeout=15)
        return all(tp.offset >= targets[tp.partition] for tp in committed)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self.producer.flush(10)


def _wait(done: Callable[[], bool], deadline: float) -> bool:
    while True:
        if done():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)


def _backlog(kafka: _Kafka, topic: str) -> dict[int, int]:
    """What a consumer must have committed to be past everything in ``topic`` now (empty partitions skipped)."""
    return {p: high for p, (low, high) in kafka.ends(topic).items() if high > low}


def forget(
    settings: Settings,
    given: str,
    ids: set[str],
    *,
    wait_s: float = 120.0,
    drain: bool = True,
    step: Callable[[str], None] = lambda _text: None,
) -> ForgetReport:
    """Erase the user known by ``ids`` (``given``: the id as the operator gave it; see the module
    docstring). ``step`` is told each step's name."""
    from sinks.clickhouse import connect
    from stream_processors.config import triage_rules
    from stream_processors.triage import needs_triage

    report = ForgetReport()
    topics = Topics(settings.topic_prefix)
    worker_group = f"{settings.topic_prefix}{settings.worker_id}"
    deadline = time.monotonic() + wait_s
    kafka = _Kafka(settings)
    try:
        # 0. remember the erasure (keyed), so `feedback dlq replay` never sends the user's events again
        step("recording the erasure")
        from pipeline.kafka_admin import ensure_topics

        try:
            ensure_topics(settings)  # the erasures topic of a deployment older than it
        except StackError as exc:
            raise StackError(f"{exc} Nothing was erased yet: run it again.") from None
        erased_at = orjson.dumps({"erased_at": datetime.now(UTC).isoformat()})
        kafka.send(topics.erasures, [(k.encode(), erased_at, None) for k in sorted(erasure_keys(settings, given))])

        # 1. drain: markers through the gate, then whatever is between the gate and the sinks
        step("erasure markers through the gate")
        # The id as given, to every partition: the gate finds the entry under the id or its pseudonym.
        markers = kafka.send(topics.raw, [(given.encode(), None, p) for p in kafka.partitions(topics.raw)])
        if drain:
            past = {p: o + 1 for p, o in markers.items()}
            if not _wait(lambda: kafka.caught_up(worker_group, topics.raw, past), deadline):
                report.pending.append(
                    f"the worker (group {worker_group}) has not passed the erasure markers on {topics.raw}: "
                    "is `feedback worker` running? Events the user sent before may still land; run forget again"
                )
            else:
                step("events in flight to the sinks")
                enrich = _backlog(kafka, topics.enrich)
                if not _wait(lambda: kafka.caught_up(worker_group, topics.enrich, enrich), deadline):
                    report.pending.append(f"the worker has not consumed {topics.enrich} up to the erasure")
                clean = _backlog(kafka, topics.clean)
                for group, what in ((settings.sink_group, "ClickHouse"), (f"{settings.sink_group}-jsonl", "JSONL")):
                    if not _wait(lambda g=group: kafka.caught_up(g, topics.clean, clean), deadline):
                        report.pending.append(
                            f"the {what} sink (group {group}) is behind on {topics.clean}: events of the user "
                            "may land after this erasure; run forget again once `feedback sink` has caught up"
                        )

        # 2. find the user's events
        step("finding the user's events in ClickHouse")
        client = connect(settings)
        db = f"`{settings.clickhouse_database}`"
        on_cluster = f" ON CLUSTER `{settings.clickhouse_cluster}`" if settings.clickhouse_cluster else ""
        events = _read_from(db, "feedback_events", on_cluster)
        try:
            rows = client.query(
                f"SELECT event_id, interaction_id, type, severity FROM {events} WHERE user_id IN {{ids:Array(String)}}",
                parameters={"ids": sorted(ids)},
            ).result_rows
            event_ids = sorted({r[0] for r in rows})
            interaction_ids = sorted({r[1] for r in rows if r[1]})
            rules = triage_rules(settings)
            # Rows, not columns: an empty answer has no column at all.
            triaged = {r[0] for r in rows if needs_triage({"type": r[2], "severity": r[3]}, rules) is not None} | {
                r[0]
                for r in (
                    client.query(
                        f"SELECT DISTINCT triage_id FROM {db}.triage WHERE triage_id IN {{ids:Array(String)}}",
                        parameters={"ids": event_ids},
                    ).result_rows
                    if event_ids
                    else []
                )
            }

            # 3. tombstones and erase commands, applied by the worker
            step("tombstones for interactions and triage items")
            now = time.time()
            sent_interactions = kafka.send(topics.interactions, [(i.encode(), None, None) for i in interaction_ids])
            commands = [
                (t.encode(), TriageCommand(op="erase", triage_id=t, at_s=now, by="forget").to_bytes(), None)
                for t in sorted(triaged)
            ]
            sent_commands = kafka.send(topics.triage_commands, commands)
            report.erased["interaction contexts (tombstoned)"] = len(interaction_ids)
            report.erased["triage items (erase commands)"] = len(triaged)
            if drain and (sent_interactions or sent_commands):
                applied = _wait(
                    lambda: (
                        kafka.caught_up(
                            worker_group, topics.interactions, {p: o + 1 for p, o in sent_interactions.items()}
                        )
                        and kafka.caught_up(
                            worker_group, topics.triage_commands, {p: o + 1 for p, o in sent_commands.items()}
                        )
                    ),
                    deadline,
                )
                if not applied:
                    report.pending.append("the worker has not applied the interaction and triage erasures yet")
                elif sent_commands:
                    triage_out = _backlog(kafka, topics.triage)
                    if not _wait(lambda: kafka.caught_up(f"{settings.sink_group}-triage", topics.triage, triage_out),
                                 deadline):  # fmt: skip
                        report.pending.append(
                            f"the triage sink has not consumed the tombstones on {topics.triage}; "
                            f"{TRIAGE_QUEUE_FILE} is rewritten when it does"
                        )

            # 4. ClickHouse
            step("deleting from ClickHouse")
            targets = (
                ("feedback_events", "user_id", sorted(ids)),
                ("feedback_current", "user_id", sorted(ids)),  # the latest revision of each opinion
                # interaction_stats is a view over these rows (migration 21).
                ("interaction_stats_rows", "interaction_id", interaction_ids),
                # The interactions sink deletes on the tombstones too (it may be behind, or stopped).
                ("interactions", "interaction_id", interaction_ids),
                ("triage", "triage_id", event_ids),
            )
            for table, column, values in targets:
                report.erased[f"ClickHouse {table} rows"] = _delete(client, db, table, column, values, on_cluster)

            # 5. the JSONL files
            step("rewriting the JSONL files")
            report.erased["JSONL lines"] = _erase_files(settings, ids, deadline, report)

            # 6. verify, by query and by scanning the files
            step("verifying")
            report.remaining = {
                f"ClickHouse {table}": _count(client, _read_from(db, table, on_cluster), column, values)
                for table, column, values in targets
                if values
            }
            report.remaining.update(_left_in_files(settings, ids, event_ids))
        finally:
            client.close()
        report.ageing = _ageing(settings)
        return report
    finally:
        kafka.close()


def _read_from(db: str, table: str, on_cluster: str) -> str:
    """Where to count: the Distributed table for the sharded events on a cluster."""
    return f"{db}.{table}_all" if on_cluster and table == "feedback_events" else f"{db}.{table}"


def _count(client: Any, source: str, column: str, values: list[str]) -> int:
    if not values:
        return 0
    return int(
        client.command(f"SELECT count() FROM {source} WHERE {column} IN {{v:Array(String)}}", parameters={"v": values})
    )


def _delete(client: Any, db: str, table: str, column: str, values: list[str], on_cluster: str) -> int:
    """Delete synchronously (the data parts are rewritten, not masked); on a cluster on every shard and replica."""
    found = _count(client, _read_from(db, table, on_cluster), column, values)
    if found:
        client.command(
            f"ALTER TABLE {db}.{table}{on_cluster} DELETE WHERE {column} IN {{v:Array(String)}}",
            parameters={"v": values},
            settings={"mutations_sync": 2},
        )
    return found


def _erase_files(settings: Settings, ids: set[str], deadline: float, report: ForgetReport) -> int:
    from sinks.jsonl import WriterBusy, erase_offline, erasure_receipt, request_erasure

    directory = Path(settings.path)
    if not directory.exists():
        return 0
    try:
        return sum(erase_offline(directory, ids).values())
    except WriterBusy:
        pass  # the JSONL sink runs: it applies the request between two batches
    request_id = uuid.uuid4().hex
    request_erasure(directory, request_id, ids)
    receipt: dict[str, Any] | None = None

    def applied() -> bool:
        nonlocal receipt
        receipt = erasure_receipt(directory, request_id)
        return receipt is not None

    if _wait(applied, max(deadline, time.monotonic() + 30)):
        assert receipt is not None
        return int(receipt["lines"])
    report.pending.append(
        f"the JSONL sink has not applied erasure request {request_id} yet; it will on its next batch "
        f"(the request waits in {directory / '.erasure'})"
    )
    return 0


def _left_in_files(settings: Settings, ids: set[str], event_ids: list[str]) -> dict[str, int]:
    """Traces found by scanning the day files and the triage queue file after the erasure."""
    from sinks.jsonl import find_user_lines

    directory = Path(settings.path)
    left: dict[str, int] = {}
    if directory.exists():
        left["JSONL lines"] = sum(find_user_lines(directory, ids).values())
        queue = directory / TRIAGE_QUEUE_FILE
        if queue.exists() and event_ids:
            text = queue.read_bytes()
            left[TRIAGE_QUEUE_FILE] = sum(1 for e in event_ids if e.encode() in text)
    return left


def _ageing(settings: Settings) -> dict[str, float]:
    """Topics with time retention: the user's events there age out within their retention."""
    topics = Topics(settings.topic_prefix)
    out: dict[str, float] = {}
    for base in ("feedback.raw.v1", "feedback.enrich.v1", "feedback.clean.v1", "feedback.dlq.v1"):
        spec = TOPICS[base]
        if spec.retention_ms:
            out[topics.name(base)] = spec.retention_ms / _DAY_MS
    return out

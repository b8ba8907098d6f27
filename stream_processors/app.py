"""The Faust app: agents that glue the pure steps of this package to Kafka.

Six agents, each a loop over batches of raw messages (``stream.take_events``). A batch
is handled synchronously from its first message to the flush of everything it
produced, so Faust acknowledges its offsets only once its outputs and table changes
are in Kafka (:mod:`stream_processors.outputs`, :mod:`stream_processors.faust_glue`).

* ``gate``: feedback.raw.v1 (single events and envelopes of many) → decode →
  :func:`~stream_processors.gate_step.gate_step` → :func:`~stream_processors.routing.route_gate`
  → feedback.clean.v1, feedback.enrich.v1 (events naming an interaction, one envelope per
  partition and batch), feedback.rejected.v1, feedback.dlq.v1, triage commands, and one
  outcomes message per source and batch. Tables: the subjects' token buckets, and the
  dedup keys beside each opinion's latest revision (expired entries are swept by a timer).
* ``reputation``: outcomes → the source's EWMA (table) → feedback.reputation.v1, and bias
  increments (one message per directive and batch) on feedback.bias-input.v1.
* ``directive-bias``: increments → the directive's decayed bias (table) →
  feedback.directive-bias.v1, at most one update per key per publish interval.
* ``interactions``: feedback.interactions.v1 (``track()``) → the interaction's context
  (table, keyed by interaction_id; swept after twice the TTL).
* ``enrich``: feedback.enrich.v1 (co-partitioned with the interactions) → the context
  joined (:mod:`stream_processors.enrich`) → feedback.clean.v1.
* ``triage``: feedback.triage-commands.v1 → the item (table ``triage``) → feedback.triage.v1;
  a ``noise`` label is reported to reputation as a ``noise`` outcome.

Every table value remembers the last position it applied per origin (the raw offset and
the index inside an envelope, :func:`schemas.envelope.position`), so a batch replayed
after a crash changes nothing twice.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
from confluent_kafka import Consumer, TopicPartition
from faust.types import EventT

from pipeline.errors import InvalidEvent, PoisonEvent
from pipeline.kafka_admin import ensure_topics, topic_replication
from pipeline.settings import Settings
from producers.subscriber import CompactedTopicReader
from schemas.dead_letter import dead_letter
from schemas.envelope import is_envelope, position, unpack
from schemas.reward_records import encode_reward, split_arm_key
from schemas.serde import AvroSerde
from schemas.state_records import decode_reputation, encode_record
from schemas.topics import Topics
from schemas.triage_records import TriageCommand, TriageItem, decode_commands
from stream_processors.config import bias_config, gate_config, reputation_policy, reward_config, triage_rules
from stream_processors.dedup import dedup_key, opinion_key
from stream_processors.enrich import context_of, enrich, newer
from stream_processors.faust_glue import StateTable, bound_rocksdb, json_table
from stream_processors.gate_step import gate_step, opinion_from_json, opinion_to_json, subject_key
from stream_processors.interaction_index import InteractionIndex
from stream_processors.metrics import GateMetrics, Tally
from stream_processors.outputs import KafkaOutputs, Outputs, partition_for
from stream_processors.redact import pseudonymize
from stream_processors.rewards import (
    RewardItem,
    decode_items,
    group_reward_items,
    reward_items,
    reward_record,
    rewards_apply,
)
from stream_processors.routing import (
    clean_key,
    decode_list,
    group_by_partition,
    group_increments,
    group_outcomes,
    route_gate,
)
from stream_processors.state_steps import (
    BiasIncrement,
    Outcome,
    Throttle,
    bias_apply,
    bias_record,
    reputation_apply,
    reputation_record,
    seen_from_json,
    seen_to_json,
    subject_from_json,
    subject_idle,
    subject_to_json,
)
from stream_processors.triage import triage_apply

__all__ = ["FeedbackApp", "create_app", "run_worker"]

log = logging.getLogger(__name__)

BATCH = 1000  # Kafka messages per batch (an envelope is one message of up to 1000 events)
WITHIN_S = 0.02  # a partial batch is handled after this long (end-to-end latency)
FLUSH_EVENTS = 5_000  # a batch of envelopes is flushed every this many events, to bound its memory
SWEEP_S = 1.0  # the dedup and interaction sweeps look at SWEEP_SCAN entries this often
SWEEP_SCAN = 20_000
SWEEP_CATCH_UP = 5.0  # a late tick looks at up to this many ticks' worth of entries
SWEEP_MIN = 2_000
REPUBLISH_S = 60.0
MAX_LETTER_RAW = 512 * 1024  # a dead letter keeps the raw bytes up to this size
GC_THRESHOLD = 50_000  # allocations between young collections (Python's default: 700)
REWARD_POLL_S = 0.05  # the reward-items step takes what its consumer fetched this often ...
REWARD_BATCH = 5000  # ... at most this many messages at a time


def _broker_urls(bootstrap: str) -> list[str]:
    return [f"kafka://{server.strip()}" for server in bootstrap.split(",") if server.strip()]


def _message_time(timestamp: float | None) -> datetime:
    # The message timestamp (producer create time): a replay sees the same "now".
    return datetime.fromtimestamp(timestamp, UTC) if timestamp else datetime.now(UTC)


def _json_list(values: Iterable[bytes]) -> Iterable[tuple[bytes, int]]:
    """JSON objects (bytes) as JSON lists of at most 1000, for group_by_partition."""
    chunk: list[bytes] = []
    for value in values:
        chunk.append(value)
        if len(chunk) == 1000:
            yield b"[" + b",".join(chunk) + b"]", len(chunk)
            chunk = []
    if chunk:
        yield b"[" + b",".join(chunk) + b"]", len(chunk)


@dataclass
class FeedbackApp:
    """The app and what tests and the CLI reach into."""

    app: faust.App
    settings: Settings
    topics: Topics
    metrics: GateMetrics
    outputs: Outputs
    tables: dict[str, StateTable] = field(default_factory=dict)
    agents: dict[str, Any] = field(default_factory=dict)
    handlers: dict[str, Callable[[list[EventT]], None]] = field(default_factory=dict)  # an agent's batch step
    sweeps: dict[str, Callable[[float], None]] = field(default_factory=dict)  # a sweep step at a time (s)
    publish_state: Callable[..., None] | None = None


class _PolledMessage:
    """A confluent-kafka message as Faust's ``event.message`` (what the agents' helpers read)."""

    __slots__ = ("key", "offset", "partition", "timestamp", "topic", "value")

    def __init__(self, msg: Any) -> None:
        self.topic, self.partition, self.offset = msg.topic(), msg.partition(), msg.offset()
        self.key, self.value = msg.key(), msg.value()
        kind, ms = msg.timestamp()
        self.timestamp = ms / 1000 if kind else None


class _Polled:
    """A polled message in the shape of a Faust event (``.message``)."""

    __slots__ = ("message",)

    def __init__(self, msg: Any) -> None:
        self.message = _PolledMessage(msg)


def _exit_now(_exc: BaseException) -> None:
    logging.shutdown()
    os._exit(70)  # no finally blocks, no acknowledgement, no commit: the batch is read again


def create_app(
    settings: Settings,
    *,
    metrics: GateMetrics | None = None,
    outputs: Outputs | None = None,
    on_fatal: Callable[[BaseException], None] = _exit_now,
    interaction_index: InteractionIndex | None = None,
    **overrides: Any,
) -> FeedbackApp:
    """The worker's Faust app with the gate and state agents registered. ``outputs``: where the
    agents write (default: a confluent-kafka producer on the settings' cluster). ``on_fatal``:
    called when a batch fails as a whole (Kafka or the store, not a message); the default ends
    the process at once so the batch is never acknowledged. ``interaction_index``: lets feedback
    naming an interaction never tracked skip the enrich join (None: all of it takes the join)."""
    topics = Topics(settings.topic_prefix)
    conf: dict[str, Any] = {
        "broker": _broker_urls(settings.kafka_bootstrap),
        "value_serializer": "raw",
        "key_serializer": "raw",
        "topic_partitions": settings.topic_partitions,
        "producer_acks": -1,
        "consumer_auto_offset_reset": "earliest",
        "store": "rocksdb://" if settings.table_store == "rocksdb" else "memory://",
        # Per app id: local table state must never outlive the topics it was built from.
        "datadir": str(settings.state_dir / "worker" / f"{settings.topic_prefix}{settings.worker_id}"),
        "web_enabled": False,
        "table_standby_replicas": 0,
        "broker_session_timeout": settings.kafka_session_timeout_s,
        "broker_heartbeat_interval": max(1.0, settings.kafka_session_timeout_s / 10),
        # Messages buffered per agent: an envelope holds up to 1,000 events, so this bounds the memory a
        # backlog can take (16,384 envelopes of ~40-200 KB could hold gigabytes). Single-event
        # messages still fill a take_events batch of BATCH from it.
        "stream_buffer_maxsize": 512,
    }
    replicas, _ = topic_replication(settings)
    if replicas > 0:  # the topics Faust creates itself (its leader topic) get the pipeline's replication
        conf["topic_replication_factor"] = replicas
    conf.update(overrides)
    if settings.table_store == "rocksdb":
        bound_rocksdb(settings.table_memory_mb * 1024 * 1024)
    Path(conf["datadir"]).parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(f"{settings.topic_prefix}{settings.worker_id}", **conf)
    metrics = metrics or GateMetrics()
    out: Outputs = outputs if outputs is not None else KafkaOutputs(settings.kafka_bootstrap)
    fa = FeedbackApp(app, settings, topics, metrics, out)

    events_serde = AvroSerde.from_url(settings.schema_registry_url)
    letters = AvroSerde("dead_letter_v1")
    interaction_serde = AvroSerde("interaction_v1")
    rejections = AvroSerde("rejected_v1")
    config = gate_config(settings)
    policy = reputation_policy(settings)
    bias_cfg = bias_config(settings)
    rules = triage_rules(settings)

    def topic(name: str) -> faust.TopicT:
        return app.topic(name, value_serializer="raw", key_serializer="raw")

    raw_topic, outcomes_topic, bias_input_topic = topic(topics.raw), topic(topics.outcomes), topic(topics.bias_input)
    interactions_topic, enrich_topic = topic(topics.interactions), topic(topics.enrich)
    commands_topic = topic(topics.triage_commands)

    def table(name: str) -> StateTable:
        return StateTable(json_table(app, name, settings.topic_partitions))

    subjects, seen = table("gate-subjects"), table("gate-seen")
    reputation, bias = table("reputation"), table("directive-bias")
    interactions, triage = table("interactions"), table("triage")
    fa.tables.update(
        {
            "subjects": subjects,
            "seen": seen,
            "reputation": reputation,
            "bias": bias,
            "interactions": interactions,
            "triage": triage,
        }
    )

    def flush(*changed: StateTable) -> None:
        """Everything queued reaches Kafka, then the tables' local stores (see faust_glue)."""
        for state in changed:
            state.produce(out)
        out.flush()
        for state in changed:
            state.commit()

    def to_dlq(stage: str, event: EventT, reason: str, raw: bytes | None = None, index: int | None = None) -> None:
        msg = event.message
        metrics.dlq.labels(stage).inc()
        where = "" if index is None else f" (envelope item {index})"
        log.warning(
            "dead_lettered stage=%s topic=%s partition=%d offset=%d%s reason=%s",
            stage, msg.topic, msg.partition, msg.offset, where, reason,
        )  # fmt: skip
        body = msg.value if raw is None else raw
        error = reason + where
        if body is not None and len(body) > MAX_LETTER_RAW:
            body, error = b"", f"{error}; raw bytes ({len(body)}) left out: over {MAX_LETTER_RAW}"
        letter = dead_letter(
            stage=stage, error=error, topic=msg.topic, partition=msg.partition, offset=msg.offset,
            key=msg.key, raw=body, now=datetime.now(UTC),
        )  # fmt: skip
        out.produce(topics.dlq, msg.key, letters.encode(letter))

    def guarded(stage: str, event: EventT, work: Callable[[], None], raw: bytes | None = None,
                index: int | None = None) -> None:  # fmt: skip
        """Run one message's (or envelope item's) work; a failure is dead-lettered, never raised."""
        try:
            work()
        except PoisonEvent as exc:
            to_dlq(stage, event, exc.reason, raw, index)
        except Exception as exc:  # a bug must not stop the stream nor lose the message
            log.exception("stage_failed stage=%s offset=%d", stage, event.message.offset)
            to_dlq(stage, event, f"{type(exc).__name__} in {stage}", raw, index)

    def items_of(event: EventT) -> list[bytes] | None:
        """The event values a message carries; None (dead-lettered) for a malformed envelope."""
        value = event.message.value
        if not is_envelope(value):
            return [value]
        try:
            return unpack(value)
        except PoisonEvent as exc:
            to_dlq("decode", event, exc.reason)
            return None

    async def run(stream: faust.StreamT, handle: Callable[[list[EventT]], None]) -> None:
        async for batch in stream.take_events(BATCH, within=WITHIN_S):
            try:
                handle(batch)  # synchronous, flush included: no await between the first message and the ack
            except Exception as exc:
                # Not one message's fault (those are dead-lettered inside): Kafka or the store failed.
                # Leaving this loop would let take_events acknowledge the whole batch unprocessed, so
                # the worker stops here instead; its replacement replays the batch (harmlessly).
                log.critical(
                    "batch_failed topic=%s first_offset=%d error=%s: the worker stops so the batch is not "
                    "acknowledged", batch[0].message.topic, batch[0].message.offset, type(exc).__name__,
                )  # fmt: skip
                on_fatal(exc)
                raise
            _report_lag(batch)

    def _report_lag(batch: list[EventT]) -> None:
        last: dict[tuple[str, int], int] = {}
        for event in batch:
            last[(event.message.topic, event.message.partition)] = event.message.offset
        for (name, partition), offset in last.items():
            try:
                high = app.consumer.highwater(faust.types.TP(name, partition))
            except Exception:  # no fetch position yet (test context, rebalance)
                continue
            if high is not None:
                metrics.lag.labels(name, str(partition)).set(max(0, high - offset - 1))

    # --- the gate ---------------------------------------------------------------
    # Rate-limit keys: the pseudonym key when user ids are pseudonymized, else the hash key.
    subject_secret = config.pseudonym_key if config.pseudonym_key is not None else config.hash_key
    slowest = min([config.rate_limit, *config.source_limits.values()], key=lambda r: r.rate_per_s)
    idle_s = max(settings.rate_limit_idle_s, slowest.burst / max(slowest.rate_per_s, 1e-9))
    ttl_s = settings.interaction_ttl_s
    tracked = interaction_index
    index_wait_s = settings.interaction_index_wait_ms / 1000.0
    clean_name, enrich_name, rejected_name = topics.clean, topics.enrich, topics.rejected

    class GateBatch:
        """What a gate batch has produced but not flushed yet."""

        def __init__(self) -> None:
            self.outcomes: list[Outcome] = []
            self.enrich: list[tuple[bytes, bytes]] = []
            self.undecided: list[tuple[bytes, dict[str, Any], float]] = []  # (interaction id, event, sent at)
            self.triage: list[tuple[bytes, bytes]] = []
            self.tally = Tally()
            self.events = 0

    def gate_item(batch: GateBatch, event: EventT, body: bytes, index: int, envelope: bool, now: datetime) -> None:
        msg = event.message
        partition = msg.partition
        try:
            record = events_serde.decode(body)
        except PoisonEvent as exc:
            to_dlq("decode", event, exc.reason, body if envelope else None, index if envelope else None)
            return
        pos = position(msg.offset, index)
        subject = subject_key(record, subject_secret)
        key, okey = dedup_key(record, config.hash_key), opinion_key(record, config.hash_key) or ""
        result = gate_step(
            record, offset=pos, now=now, config=config,
            subject_state=subject_from_json(subjects.get(subject, partition)),
            seen=seen_from_json(seen.get(key, partition)), dedup_key=key,
            opinion=opinion_from_json(seen.get(okey, partition)) if okey else None, opinion_key=okey,
        )  # fmt: skip
        route = route_gate(
            record, result, topic=msg.topic, partition=partition, offset=msg.offset, position=pos,
            envelope=envelope, now=now, rules=rules, hash_key=config.hash_key,
        )  # fmt: skip
        tally = batch.tally
        for kind, count in result.redactions.items():
            tally.add(metrics.redactions, kind, n=count)
        etype = str(record["type"])
        if route.target in ("clean", "enrich"):
            assert route.event is not None
            if route.target == "clean":
                out.produce(clean_name, route.key, events_serde.encode(route.event))
            elif tracked is None:
                batch.enrich.append((route.key, events_serde.encode(route.event)))
            elif tracked.decided(now.timestamp()):
                to_join(batch, route.key, route.event, now.timestamp())
            else:  # sent moments ago: decided at the flush, once the index has read that far
                batch.undecided.append((route.key, route.event, now.timestamp()))
            tally.add(metrics.feedback, metrics.cap_source(str(record["source"])), metrics.cap_type(etype))
            if result.text_dropped:
                tally.add(metrics.text_dropped)
            if route.triage is not None:
                batch.triage.append((route.triage.triage_id.encode(), route.triage.to_bytes()))
            if etype == "veto":
                tally.add(metrics.veto)
            elif etype in ("regret", "regret_signal"):
                tally.add(metrics.regret)
        elif route.target == "sampled_out":
            tally.add(metrics.sampled_out, metrics.cap_type(etype))
        else:
            assert route.rejection is not None
            out.produce(rejected_name, route.key, rejections.encode(route.rejection))
            tally.add(metrics.rejected, route.reason)
            if route.reason == "rate_limited":
                tally.add(metrics.rate_limited)
            elif route.reason == "duplicate":
                tally.add(metrics.duplicates)
        assert route.outcome is not None
        batch.outcomes.append(route.outcome)
        # The state changes last: an event that failed on the way here is dead-lettered with no dedup
        # key recorded and no token taken, so its replay (`feedback dlq replay`) is decided afresh.
        if result.subject_state is not None:
            # The partition too: an erasure marker may arrive on another partition (see forget_subject).
            subjects.set(subject, {**subject_to_json(result.subject_state), "partition": partition}, partition)
        if result.seen is not None and result.outcome in ("clean", "sampled_out"):
            seen.set(key, seen_to_json(result.seen, partition), partition)
        if result.opinion is not None:  # the opinion's latest revision (the same table, its own key)
            seen.set(okey, opinion_to_json(result.opinion, partition), partition)

    def to_join(batch: GateBatch, interaction_id: bytes, event: dict[str, Any], sent_s: float) -> None:
        """An event naming an interaction: through the join, unless the index shows the
        interaction was never tracked before the event was sent (then marked as the join would)."""
        assert tracked is not None
        if tracked.may_have_context(interaction_id, sent_s):
            batch.enrich.append((interaction_id, events_serde.encode(event)))
            return
        enriched, status = enrich(event, None, ttl_s)
        out.produce(clean_name, clean_key(enriched), events_serde.encode(enriched))
        batch.tally.add(metrics.enriched, status)
        batch.tally.add(metrics.enrich_skipped)

    def gate_flush(batch: GateBatch) -> None:
        if batch.undecided:
            assert tracked is not None
            tracked.wait_until_decided(max(sent for _, _, sent in batch.undecided), index_wait_s)
            for interaction_id, event, sent_s in batch.undecided:
                to_join(batch, interaction_id, event, sent_s)
        if batch.enrich:
            for p, key, value in group_by_partition(batch.enrich, out.partitions(enrich_name), partition_for):
                out.produce(enrich_name, key, value, p)
        if batch.triage:
            commands = topics.triage_commands
            for p, key, value in group_by_partition(
                batch.triage, out.partitions(commands), partition_for, pack=_json_list
            ):
                out.produce(commands, key, value, p)
        for key, value in group_outcomes(batch.outcomes):
            out.produce(topics.outcomes, key, value)
        flush(subjects, seen)
        batch.tally.apply()
        if tracked is not None:
            metrics.index_behind.set(max(0.0, time.time() - tracked.covered_until))

    def gate_batch(events: list[EventT]) -> None:
        batch = GateBatch()
        for event in events:
            msg = event.message
            if msg.value is None:
                forget_subject(msg.key, msg.partition)
                continue
            items = items_of(event)
            if items is None:
                continue
            now = _message_time(msg.timestamp)
            envelope = len(items) > 1 or items[0] is not msg.value
            for index, body in enumerate(items):
                guarded(
                    "gate", event, lambda: gate_item(batch, event, body, index, envelope, now),  # noqa: B023
                    raw=body if envelope else None, index=index if envelope else None,
                )  # fmt: skip
            batch.events += len(items)
            if batch.events >= FLUSH_EVENTS:
                gate_flush(batch)
                batch = GateBatch()
        gate_flush(batch)

    @app.agent(raw_topic, name="gate")
    async def gate(stream: faust.StreamT) -> None:
        await run(stream, gate_batch)

    def forget_subject(key: bytes | None, partition: int) -> None:
        """An erasure marker (``feedback forget``): a null value on the raw topic, keyed by the user id
        or its pseudonym, sent to every partition. Drop that subject's rate-limit entry in this
        partition (the marker reaches every partition, so every copy goes)."""
        if not key:
            return
        given = key.decode(errors="replace")
        candidates = {given, pseudonymize(given, subject_secret)}  # the id, or its pseudonym, as sent
        for candidate in candidates:
            if subjects.get(candidate, partition) is not None:
                subjects.delete(candidate, partition)
                metrics.erased.labels("subjects").inc()

    def sweep_seen_at(now_s: float) -> None:
        """Tombstone dedup keys whose window has ended (an expired key is already ignored;
        this only keeps the table from growing)."""
        sweep(seen, lambda value: value["expires_s"] <= now_s, "dedup_keys_expired")

    def sweep_subjects_at(now_s: float) -> None:
        """Tombstone rate-limit buckets idle for ``rate_limit_idle_s`` (at least a full refill):
        a new event from that subject finds a full bucket either way."""
        sweep(subjects, lambda value: subject_idle(value, now_s, idle_s), "rate_limit_buckets_idle")

    fa.sweeps.update({"seen": sweep_seen_at, "subjects": sweep_subjects_at})

    @app.timer(interval=SWEEP_S)
    async def sweep_tables() -> None:
        now_s = time.time()
        sweep_seen_at(now_s)
        sweep_subjects_at(now_s)

    cursors: dict[str, Any] = {}
    changes_seen: dict[str, int] = {}
    kept_in_pass: dict[str, int] = {}  # live keys counted so far in the sweep's current pass ...
    pass_began: dict[str, float] = {}  # ... and when it began (monotonic)
    last_step: dict[str, float] = {}  # when each table's sweep last ran (monotonic)

    def sweep(state: StateTable, expired: Callable[[dict[str, Any]], bool], event: str) -> None:
        """Look at the next entries of ``state`` and tombstone the ``expired`` ones (values remember
        their partition): a bounded step per tick, so a large table never stalls the agents; not
        during recovery. The step is twice the keys written since the last one (at least SWEEP_MIN,
        at most SWEEP_SCAN a SWEEP_S): the cursor goes round the table faster than it grows, so an
        expired key goes within about half a window, and a quiet table costs a small scan a tick.
        A tick that comes late (a busy worker: timers drift by seconds on a loaded machine) looks
        at the entries of the ticks it missed too, up to SWEEP_CATCH_UP of them: otherwise the
        pass slows with the timer, expired keys wait longer, the table grows, and the pass slows
        again (at 5,000 keys/s and a 120 s window the table kept growing past 1.4 x rate x window).

        The keys it leaves are counted over a pass; at the end of each pass the count is the
        table's ``feedback_table_keys``, and the pass's duration ``feedback_table_sweep_pass_seconds``.
        A key written behind the cursor during the pass is not counted, so the table holds at
        least that many keys, and at most that many plus the keys written during the pass."""
        if app.in_recovery or app.rebalancing:
            return
        written = state.changes - changes_seen.get(state.name, 0)
        changes_seen[state.name] = state.changes
        now = time.monotonic()
        ticks = min(SWEEP_CATCH_UP, max(1.0, (now - last_step.get(state.name, now)) / SWEEP_S))
        last_step[state.name] = now
        step = min(int(SWEEP_SCAN * ticks), max(SWEEP_MIN, 2 * written))
        if cursors.get(state.name) is None:
            pass_began[state.name] = now
        entries, cursors[state.name] = state.scan_from(cursors.get(state.name), step)
        swept = kept = 0
        for key, value in entries:
            if value is None:
                continue
            if expired(value):
                state.delete(key, value.get("partition", 0))
                swept += 1
            else:
                kept += 1
        kept_in_pass[state.name] = kept_in_pass.get(state.name, 0) + kept
        if cursors[state.name] is None:  # the pass is complete
            metrics.table_keys.labels(state.name).set(kept_in_pass.pop(state.name))
            metrics.sweep_pass.labels(state.name).set(time.monotonic() - pass_began.pop(state.name))
        if swept:
            flush(state)
            log.info("%s count=%d", event, swept)

    # --- delayed feedback: interactions and the join --------------------------------

    def interaction_one(event: EventT) -> None:
        msg = event.message
        key = (msg.key or b"").decode(errors="replace")
        if msg.value is None:  # a tombstone (``feedback forget``): the interaction is erased
            if interactions.get(key, msg.partition) is not None:
                interactions.delete(key, msg.partition)
                metrics.erased.labels("interactions").inc()
            return
        record = interaction_serde.decode(msg.value)  # PoisonEvent → DLQ (stage "interactions")
        try:
            context = context_of(record, allow_text=config.allow_text)
        except InvalidEvent as exc:
            raise PoisonEvent(f"invalid interaction: {exc.field}: {exc.rule}") from None
        key = str(record["interaction_id"])
        if newer(interactions.get(key, msg.partition), context):
            interactions.set(key, {**context, "partition": msg.partition}, msg.partition)
            metrics.interactions.inc()

    def interactions_batch(events: list[EventT]) -> None:
        for event in events:
            guarded("interactions", event, lambda: interaction_one(event))  # noqa: B023
        flush(interactions)

    @app.agent(interactions_topic, name="interactions")
    async def interactions_agent(stream: faust.StreamT) -> None:
        await run(stream, interactions_batch)

    def enrich_item(event: EventT, body: bytes, tally: Tally) -> None:
        record = events_serde.decode(body)
        context = interactions.get(str(record["interaction_id"]), event.message.partition)
        enriched, status = enrich(record, context, ttl_s)
        tally.add(metrics.enriched, status)
        out.produce(clean_name, clean_key(enriched), events_serde.encode(enriched))

    def enrich_batch(events: list[EventT]) -> None:
        tally = Tally()
        for event in events:
            items = items_of(event)
            for index, body in enumerate(items or ()):
                enveloped = items is not None and (len(items) > 1 or body is not event.message.value)
                guarded(
                    "enrich", event, lambda: enrich_item(event, body, tally),  # noqa: B023
                    raw=body if enveloped else None, index=index if enveloped else None,
                )  # fmt: skip
        flush()
        tally.apply()

    @app.agent(enrich_topic, name="enrich")
    async def enrich_agent(stream: faust.StreamT) -> None:
        await run(stream, enrich_batch)

    @app.timer(interval=SWEEP_S)
    async def sweep_interactions() -> None:
        """Forget interactions twice the TTL old: until then late feedback is told apart as
        'expired'; after that it is 'unknown'."""
        horizon = time.time() - 2 * ttl_s
        sweep(interactions, lambda value: value["ts_s"] < horizon, "interactions_forgotten")

    # --- the triage queue -------------------------------------------------------------
    def triage_command(event: EventT, command: TriageCommand, index: int) -> None:
        msg = event.message
        partition = msg.partition
        stored = triage.get(command.triage_id, partition)
        if command.op == "erase":  # ``feedback forget``: the item goes, from the table and the compacted topic
            if stored is not None:
                triage.delete(command.triage_id, partition)
                metrics.erased.labels("triage").inc()
            out.produce(topics.triage, command.triage_id.encode(), None)
            return
        pos = position(msg.offset, index)
        new, noisy_source = triage_apply(stored, command, pos, rules)
        if new is not None:
            triage.set(command.triage_id, new, partition)
            metrics.triage.labels(command.op).inc()
        current = new if new is not None else stored
        replayed = stored is not None and pos <= stored["offset"]
        if current is not None and (new is not None or replayed):  # a replay republishes: compacted, idempotent
            item = TriageItem(**{k: v for k, v in current.items() if k != "offset"})
            out.produce(topics.triage, command.triage_id.encode(), item.to_bytes())
        if noisy_source is not None:
            assert current is not None
            outcome = Outcome(
                source=noisy_source, type=str(current["type"]), severity=str(current["severity"]), outcome="noise",
                kept=False, ts_s=command.at_s, model_version=None, partition=partition, offset=pos,
                origin="triage",
            )  # fmt: skip
            out.produce(topics.outcomes, noisy_source.encode(), outcome.to_bytes())

    def triage_one(event: EventT) -> None:
        try:
            commands = decode_commands(event.message.value)
        except ValueError as exc:
            raise PoisonEvent(f"not a triage command: {exc}") from None
        for index, command in enumerate(commands):
            triage_command(event, command, index)

    def triage_batch(events: list[EventT]) -> None:
        for event in events:
            guarded("triage", event, lambda: triage_one(event))  # noqa: B023
        flush(triage)

    @app.agent(commands_topic, name="triage")
    async def triage_agent(stream: faust.StreamT) -> None:
        await run(stream, triage_batch)

    # --- reputation ---------------------------------------------------------------
    reputation_out = Throttle(settings.bias_publish_interval_s)
    bias_out = Throttle(settings.bias_publish_interval_s)
    where: dict[str, dict[str, int]] = {"reputation": {}, "bias": {}}  # key → partition, for publishing

    def reputation_one(event: EventT, increments: list[BiasIncrement], tally: Tally) -> None:
        try:
            outcomes = decode_list(event.message.value, lambda data: Outcome(**data))
        except (TypeError, ValueError) as exc:
            raise PoisonEvent(f"not an outcome: {type(exc).__name__}") from None
        partition = event.message.partition
        for outcome in outcomes:
            new, increment = reputation_apply(reputation.get(outcome.source, partition), outcome, policy, bias_cfg)
            if new is None:
                tally.add(metrics.state_replays, "reputation")
            else:
                reputation.set(outcome.source, {**new, "partition": partition}, partition)
                reputation_out.mark(outcome.source)
                where["reputation"][outcome.source] = partition
                tally.add(metrics.state_updates, "reputation")
            if increment is not None:
                increments.append(increment)

    def reputation_batch(events: list[EventT]) -> None:
        increments: list[BiasIncrement] = []
        tally = Tally()
        for event in events:
            guarded("reputation", event, lambda: reputation_one(event, increments, tally))  # noqa: B023
        for key, value in group_increments(increments):
            out.produce(topics.bias_input, key, value)
        flush(reputation)
        tally.apply()

    @app.agent(outcomes_topic, name="reputation")
    async def reputation_agent(stream: faust.StreamT) -> None:
        await run(stream, reputation_batch)
        # (publishing happens in the timer below, throttled per key)

    # --- directive bias --------------------------------------------------------------
    def bias_one(event: EventT, tally: Tally) -> None:
        try:
            increments = decode_list(event.message.value, lambda data: BiasIncrement(**data))
        except (TypeError, ValueError) as exc:
            raise PoisonEvent(f"not a bias increment: {type(exc).__name__}") from None
        partition = event.message.partition
        for increment in increments:
            new = bias_apply(bias.get(increment.key, partition), increment, bias_cfg)
            if new is None:
                tally.add(metrics.state_replays, "directive-bias")
                continue
            bias.set(increment.key, {**new, "partition": partition}, partition)
            bias_out.mark(increment.key)
            where["bias"][increment.key] = partition
            tally.add(metrics.state_updates, "directive-bias")

    def bias_batch(events: list[EventT]) -> None:
        tally = Tally()
        for event in events:
            guarded("directive-bias", event, lambda: bias_one(event, tally))  # noqa: B023
        flush(bias)
        tally.apply()

    @app.agent(bias_input_topic, name="directive-bias")
    async def bias_agent(stream: faust.StreamT) -> None:
        await run(stream, bias_batch)

    def publish_state(force: bool = False) -> None:
        if app.in_recovery or app.rebalancing:
            return
        now = time.monotonic()
        for name, state, throttle, topic_name, record in (
            ("reputation", reputation, reputation_out, topics.reputation,
             lambda k, v: reputation_record(k, v, policy)),
            ("bias", bias, bias_out, topics.directive_bias, lambda k, v: bias_record(k, v, bias_cfg)),
        ):  # fmt: skip
            values = dict(state.scan()) if force else {}
            for key in throttle.due(now, force=force, known=list(values)):
                value = values.get(key)
                if value is None and key in where[name]:
                    value = state.get(key, where[name][key])
                if value is not None:
                    out.produce(topic_name, key.encode(), encode_record(record(key, value)))
                    metrics.published.labels("reputation" if name == "reputation" else "directive-bias").inc()
        out.poll()

    @app.timer(interval=max(0.1, settings.bias_publish_interval_s))
    async def publish_changed() -> None:
        publish_state()

    @app.timer(interval=REPUBLISH_S)
    async def republish_all() -> None:
        # Compacted topics: republishing is idempotent, and it heals an update lost in a crash.
        publish_state(force=True)

    # --- rewards for model routers (stream_processors.rewards) -------------------------
    # ``reward-items``: a batch of clean events → each event's reward items (origin partition,
    # position, reward, weight, time), one message per arm on feedback.rewards-input.v1 (keyed by
    # arm, so an arm lives in one partition whichever worker read its events). The clean topic
    # holds one event per message, which Faust hands over at a few thousand a second, so this
    # step reads it with a confluent-kafka consumer of its own (group ``<app id>-reward-items``),
    # a batch per timer tick, committed after its output is flushed. ``rewards`` (a Faust agent):
    # each arm's items folded into its table value, one table write per arm and batch, published
    # to feedback.rewards.v1 at most once per key and publish interval, like directive bias.
    reward_cfg = reward_config(settings)
    rewards_input_topic = topic(topics.rewards_input)
    rewards = table("rewards")
    fa.tables["rewards"] = rewards
    rewards_out = Throttle(settings.bias_publish_interval_s)
    rewards_where: dict[str, int] = {}  # arm → partition, for publishing
    # The sources' reputation weights. The reputation table is partitioned by source across the
    # workers, so each worker reads the whole of feedback.reputation.v1 (the published weights)
    # instead; a source not heard of yet weighs 1, as a new source does in the reputation step.
    source_weights: dict[str, float] = {}
    weights_reader: list[CompactedTopicReader[Any]] = []

    def note_weight(source: str, record: Any) -> None:
        if record is None:
            source_weights.pop(source, None)
        else:
            source_weights[source] = float(record.weight)

    def reward_weights_batch(events: list[EventT]) -> None:
        """Reputation records (feedback.reputation.v1 messages) into the weights (tests; the worker polls)."""
        for event in events:
            msg = event.message
            note_weight((msg.key or b"").decode(), None if msg.value is None else decode_reputation(msg.value))

    def poll_weights() -> None:
        if not weights_reader:
            weights_reader.append(CompactedTopicReader(settings, topics.reputation, decode_reputation, note_weight))
        try:
            for _ in range(10):  # at most 10,000 records a tick: catching up never stalls the agents
                if len(weights_reader[0].poll(0.0, 1000)) < 1000:
                    break
        except Exception as exc:  # Kafka or the topic missing: keep the weights known so far
            log.warning("reputation_weights_unavailable error=%s", type(exc).__name__)

    def reward_item(event: EventT, body: bytes, index: int, found: list[tuple[str, RewardItem]]) -> None:
        record = events_serde.decode(body)
        msg = event.message
        found += reward_items(
            record, partition=msg.partition, position=position(msg.offset, index),
            reputation_weight=source_weights.get(str(record["source"]), 1.0), config=reward_cfg,
        )  # fmt: skip

    def reward_items_batch(events: list[EventT]) -> None:
        found: list[tuple[str, RewardItem]] = []
        decode, weights = events_serde.decode, source_weights
        for event in events:
            msg = event.message
            value = msg.value
            if value is None:
                continue
            if not is_envelope(value):  # the clean topic's usual message: one event, no per-event closure
                try:
                    record = decode(value)
                    found += reward_items(
                        record, partition=msg.partition, position=position(msg.offset),
                        reputation_weight=weights.get(str(record["source"]), 1.0), config=reward_cfg,
                    )  # fmt: skip
                    continue
                except Exception:  # handled again below, where it is dead-lettered
                    pass
            items = items_of(event)
            for index, body in enumerate(items or ()):
                enveloped = items is not None and (len(items) > 1 or body is not event.message.value)
                guarded(
                    "reward-items", event, lambda: reward_item(event, body, index, found),  # noqa: B023
                    raw=body if enveloped else None, index=index if enveloped else None,
                )  # fmt: skip
        for key, value in group_reward_items(found):
            out.produce(topics.rewards_input, key, value)
        flush()

    reward_reader: list[Consumer] = []

    @app.timer(interval=REWARD_POLL_S)
    async def reward_items_tick() -> None:
        if not reward_reader:
            reader = Consumer({
                "bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{app.conf.id}-reward-items",
                "enable.auto.commit": False, "auto.offset.reset": "earliest",
                "queued.max.messages.kbytes": 8192,  # bounds the prefetched messages' memory
            })  # fmt: skip
            reader.subscribe([topics.clean])
            reward_reader.append(reader)
        polled = reward_reader[0].consume(REWARD_BATCH, timeout=0)  # what is fetched already: never waits
        batch = [_Polled(m) for m in polled if m.error() is None]
        if not batch:
            return
        try:
            reward_items_batch(batch)  # type: ignore[arg-type]  # the shape the agents' helpers read
        except Exception as exc:  # Kafka failed the flush: stop uncommitted, as an agent's batch does
            log.critical("batch_failed topic=%s error=%s: the worker stops", topics.clean, type(exc).__name__)
            on_fatal(exc)
            raise
        ends: dict[int, int] = {}
        for polled_event in batch:
            ends[polled_event.message.partition] = polled_event.message.offset + 1
        reward_reader[0].commit(offsets=[TopicPartition(topics.clean, p, o) for p, o in ends.items()],
                                asynchronous=True)  # fmt: skip

    @app.on_before_shutdown.connect
    async def close_reward_reader(_app: Any, **_kwargs: Any) -> None:
        if reward_reader:
            reward_reader.pop().close()  # leaves the group now: its partitions move without a timeout

    def rewards_collect(event: EventT, pending: dict[str, tuple[int, list[RewardItem]]]) -> None:
        msg = event.message
        key = (msg.key or b"").decode(errors="replace")
        try:
            split_arm_key(key)
            items = decode_items(msg.value)
        except ValueError as exc:
            raise PoisonEvent(f"not a rewards-input message: {exc}") from None
        pending.setdefault(key, (msg.partition, []))[1].extend(items)

    def rewards_batch(events: list[EventT]) -> None:
        pending: dict[str, tuple[int, list[RewardItem]]] = {}
        for event in events:
            guarded("rewards", event, lambda: rewards_collect(event, pending))  # noqa: B023
        tally = Tally()
        for key, (partition, arm_items) in pending.items():
            new = rewards_apply(rewards.get(key, partition), arm_items, reward_cfg)
            if new is None:
                tally.add(metrics.state_replays, "rewards")
                continue
            rewards.set(key, {**new, "partition": partition}, partition)
            rewards_out.mark(key)
            rewards_where[key] = partition
            tally.add(metrics.state_updates, "rewards")
        flush(rewards)
        tally.apply()

    @app.agent(rewards_input_topic, name="rewards")
    async def rewards_agent(stream: faust.StreamT) -> None:
        await run(stream, rewards_batch)

    def publish_rewards(force: bool = False) -> None:
        if app.in_recovery or app.rebalancing:
            return
        values = dict(rewards.scan()) if force else {}
        for key in rewards_out.due(time.monotonic(), force=force, known=list(values)):
            value = values.get(key)
            if value is None and key in rewards_where:
                value = rewards.get(key, rewards_where[key])
            if value is not None:
                out.produce(topics.rewards, key.encode(), encode_reward(reward_record(key, value, reward_cfg)))
                metrics.published.labels("rewards").inc()
        out.poll()

    def publish_all(force: bool = False) -> None:
        publish_state(force)
        publish_rewards(force)

    @app.timer(interval=max(0.1, settings.bias_publish_interval_s))
    async def publish_rewards_changed() -> None:
        poll_weights()
        publish_rewards()

    @app.timer(interval=REPUBLISH_S)
    async def republish_rewards() -> None:
        publish_rewards(force=True)

    fa.agents.update(
        {
            "gate": gate,
            "reputation": reputation_agent,
            "bias": bias_agent,
            "interactions": interactions_agent,
            "enrich": enrich_agent,
            "triage": triage_agent,
            "rewards": rewards_agent,
        }
    )
    fa.handlers.update(
        {
            "gate": gate_batch,
            "reputation": reputation_batch,
            "bias": bias_batch,
            "interactions": interactions_batch,
            "enrich": enrich_batch,
            "triage": triage_batch,
            "reward-items": reward_items_batch,
            "rewards": rewards_batch,
            "reward-weights": reward_weights_batch,
        }
    )
    fa.publish_state = publish_all
    return fa


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def bound_malloc() -> bool:
    """Keep freed memory from piling up in the process (glibc only; False elsewhere).

    A batch allocates and frees hundreds of megabytes of short-lived buffers (envelope values,
    decoded events, librdkafka copies). glibc raises its mmap threshold each time a large block is
    freed, so later large blocks come from the heap and their memory is kept, fragmented, after
    the batch: in the million-key run the worker's RSS was 700 MB while its live memory was
    about 330 MB. A fixed 128 KiB threshold (glibc's initial one) returns large blocks to the OS
    when they are freed, and a 16 MiB trim threshold gives back the heap's free top sooner.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024) and libc.mallopt(_M_TRIM_THRESHOLD, 16 << 20))
    except (OSError, AttributeError):  # not glibc: its allocator keeps its own defaults
        return False


def interaction_index(settings: Settings) -> InteractionIndex:
    """The worker's index of tracked interactions, reading feedback.interactions.v1 from the start
    (a consumer that never commits: no group offsets to keep) and asking for its watermarks."""
    from confluent_kafka import Consumer
    from confluent_kafka.admin import AdminClient

    topic = Topics(settings.topic_prefix).interactions
    conf = {"bootstrap.servers": settings.kafka_bootstrap, "client.id": f"feedback-index-{settings.worker_id}"}
    consumer_conf = {
        **conf,
        "group.id": f"{settings.topic_prefix}feedback-index",  # assigned, never joined nor committed
        "enable.auto.commit": False,
        "enable.partition.eof": True,  # the end of each partition, past compacted offsets
        "fetch.wait.max.ms": 20,
        "auto.offset.reset": "earliest",
    }
    return InteractionIndex(
        topic,
        lambda: Consumer(consumer_conf),
        lambda: AdminClient(conf),
        # Longer than the interactions table keeps an interaction (swept at twice the TTL by event
        # time; an event time may be up to max_future_s ahead), plus the sweep's own lag.
        keep_s=2 * settings.interaction_ttl_s + settings.max_future_s + 3600.0,
        capacity=settings.interaction_index_capacity,
        clock_skew_s=settings.interaction_clock_skew_ms / 1000.0,
    )


def run_worker(settings: Settings) -> None:
    """Run the worker until SIGTERM/SIGINT (blocking)."""
    index = interaction_index(settings) if settings.interaction_index else None
    fa = create_app(settings, interaction_index=index)
    # The tables' changelogs too: a changelog Faust creates itself is missing from the metadata of
    # its first rebalance, and an event that touches the table then fails (PartitionsMismatch).
    ensure_topics(settings, compacted=[t.changelog for t in fa.tables.values()])
    if index is not None:
        index.start()
    fa.metrics.serve(settings.worker_metrics_port)
    # A batch allocates tens of thousands of short-lived objects; with the default thresholds
    # the collector's full passes walk the whole long-lived heap (Faust, librdkafka wrappers,
    # the app) many times a second. Long-lived objects are frozen out of its view, and young
    # collections run less often.
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 50)
    bound_malloc()
    worker = faust.Worker(fa.app, loglevel=settings.log_level, quiet=True)
    worker.execute_from_commandline()

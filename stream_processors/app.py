"""The Faust app: thin agents around the pure stages in this package.

Three agents, each a loop over batches (``stream.take_events``) of raw bytes:

* ``gate``: feedback.raw.v1 → decode → :func:`gate_step` → feedback.clean.v1,
  feedback.rejected.v1 or feedback.dlq.v1, plus one :class:`Outcome` per event
  (keyed by source) on feedback.outcomes.v1. Tables: the subjects' token buckets
  and the dedup keys (expired keys are swept by a timer).
* ``reputation``: outcomes → the source's EWMA (table) → feedback.reputation.v1,
  and a :class:`BiasIncrement` per kept bad_output/latency/safety/veto event
  (keyed by directive) on feedback.bias-input.v1.
* ``directive-bias``: increments → the directive's decayed bias (table) →
  feedback.directive-bias.v1, at most one update per key per publish interval.
* ``interactions``: feedback.interactions.v1 (``track()``) → the interaction's context
  (table, keyed by interaction_id; swept after twice the TTL).
* ``triage``: feedback.triage-commands.v1 (the gate enqueues events that need a human;
  people label and resolve them) → the item (table ``triage``) → feedback.triage.v1;
  a ``noise`` label is reported to reputation as a ``noise`` outcome.
* ``enrich``: clean events that name an interaction go through feedback.enrich.v1,
  keyed by interaction_id (co-partitioned with the interactions), get the context
  joined (:mod:`stream_processors.enrich`) and go on to feedback.clean.v1.

Tables keep their changelogs in Kafka; every value remembers the last raw offset
it applied per origin, so a worker killed at any moment replays harmlessly.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
import faust.streams
from faust.types import EventT

from pipeline.errors import InvalidEvent, PoisonEvent
from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings
from schemas.dead_letter import dead_letter
from schemas.serde import AvroSerde
from schemas.state_records import encode_record
from schemas.topics import Topics
from schemas.triage_records import TriageItem, decode_command
from stream_processors.config import bias_config, gate_config, reputation_policy, triage_rules
from stream_processors.dedup import dedup_key
from stream_processors.enrich import context_of, enrich, newer
from stream_processors.gate_step import GateResult, gate_step, rejection_record, subject_key
from stream_processors.metrics import GateMetrics
from stream_processors.redact import pseudonymize
from stream_processors.state_steps import (
    REPUTATION_OUTCOMES,
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
    subject_to_json,
)
from stream_processors.triage import enqueue_command, needs_triage, triage_apply

__all__ = ["FeedbackApp", "create_app", "run_worker"]

log = logging.getLogger(__name__)

BATCH = 1000
WITHIN_S = 0.2
SEEN_SWEEP_S = 60.0
SEEN_SWEEP_MAX = 50_000  # tombstones per sweep, so one sweep never stalls the gate
REPUBLISH_S = 60.0


def _broker_urls(bootstrap: str) -> list[str]:
    return [f"kafka://{server.strip()}" for server in bootstrap.split(",") if server.strip()]


def _enter(event: EventT) -> None:
    """Make ``event`` current in this task: tables pick the changelog partition (and the
    RocksDB partition) from the current event, and ``take_events`` fills its buffer in
    another task, so the agent must say which event it is working on."""
    faust.streams._current_event.set(weakref.ref(event))


def _message_time(timestamp: float | None) -> datetime:
    # The message timestamp (producer create time): a replay sees the same "now".
    return datetime.fromtimestamp(timestamp, UTC) if timestamp else datetime.now(UTC)


@dataclass
class FeedbackApp:
    """The app and what tests and the CLI reach into."""

    app: faust.App
    settings: Settings
    topics: Topics
    metrics: GateMetrics
    tables: dict[str, Any] = field(default_factory=dict)
    agents: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, faust.TopicT] = field(default_factory=dict)
    publish_state: Callable[..., Awaitable[None]] | None = None

    async def send(self, topic: str, *, key: bytes | None, value: bytes | None) -> None:
        """Publish to one of the app's output topics (tests replace this to capture)."""
        await self.outputs[topic].send(key=key, value=value)


def create_app(settings: Settings, *, metrics: GateMetrics | None = None, **overrides: Any) -> FeedbackApp:
    """The worker's Faust app with the gate and state agents registered."""
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
    }
    conf.update(overrides)
    Path(conf["datadir"]).parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(f"{settings.topic_prefix}{settings.worker_id}", **conf)
    metrics = metrics or GateMetrics()
    fa = FeedbackApp(app, settings, topics, metrics)

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

    raw_topic, clean_topic, rejected_topic, dlq_topic = map(
        topic, (topics.raw, topics.clean, topics.rejected, topics.dlq)
    )
    outcomes_topic, bias_input_topic = topic(topics.outcomes), topic(topics.bias_input)
    reputation_topic, bias_topic = topic(topics.reputation), topic(topics.directive_bias)
    interactions_topic, enrich_topic = topic(topics.interactions), topic(topics.enrich)
    commands_topic, triage_topic = topic(topics.triage_commands), topic(topics.triage)

    json_schema = faust.Schema(key_serializer="json", value_serializer="json")

    def table(name: str) -> Any:
        return app.Table(name, default=None, schema=json_schema, partitions=settings.topic_partitions)

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

    async def to_dlq(stage: str, event: EventT, reason: str) -> None:
        msg = event.message
        metrics.dlq.labels(stage).inc()
        log.warning(
            "dead_lettered stage=%s topic=%s partition=%d offset=%d reason=%s",
            stage, msg.topic, msg.partition, msg.offset, reason,
        )  # fmt: skip
        letter = dead_letter(
            stage=stage, error=reason, topic=msg.topic, partition=msg.partition, offset=msg.offset,
            key=msg.key, raw=msg.value, now=datetime.now(UTC),
        )  # fmt: skip
        await fa.send(topics.dlq, key=msg.key, value=letters.encode(letter))

    async def each(stage: str, stream: faust.StreamT, handle: Callable[[EventT], Awaitable[None]]) -> None:
        """Batches from ``stream``; each event handled with its context set; a failure is dead-lettered."""
        async for batch in stream.take_events(BATCH, within=WITHIN_S):
            for event in batch:
                _enter(event)
                try:
                    await handle(event)
                except PoisonEvent as exc:
                    await to_dlq(stage, event, exc.reason)
                except Exception as exc:  # a bug must not stop the stream nor lose the message
                    log.exception("stage_failed stage=%s offset=%d", stage, event.message.offset)
                    await to_dlq(stage, event, f"{type(exc).__name__} in {stage}")
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
    async def gate_one(event: EventT) -> None:
        msg = event.message
        if msg.value is None:
            forget_subject(msg.key, msg.partition)
            return
        try:
            record = events_serde.decode(msg.value)
        except PoisonEvent as exc:
            await to_dlq("decode", event, exc.reason)
            return
        now = _message_time(msg.timestamp)
        subject = subject_key(record, config.pseudonym_key)
        key = dedup_key(record)
        result = gate_step(
            record, offset=msg.offset, now=now, config=config,
            subject_state=subject_from_json(subjects.get(subject)), seen=seen_from_json(seen.get(key)),
        )  # fmt: skip
        if result.subject_state is not None:
            # The partition too: an erasure marker may arrive on another partition (see forget_subject).
            subjects[subject] = {**subject_to_json(result.subject_state), "partition": msg.partition}
        if result.seen is not None and result.outcome in ("clean", "sampled_out"):
            seen[key] = seen_to_json(result.seen, msg.partition)
        await emit(event, record, result, now)

    async def emit(event: EventT, record: dict[str, Any], result: GateResult, now: datetime) -> None:
        msg = event.message
        source, etype = str(record["source"]), str(record["type"])
        for kind, count in result.redactions.items():
            metrics.redactions.labels(kind).inc(count)
        if result.outcome == "clean":
            assert result.event is not None
            out = result.event
            if out.get("interaction_id"):
                # Delayed feedback: meet the interaction's context in its partition first.
                await fa.send(topics.enrich, key=str(out["interaction_id"]).encode(), value=events_serde.encode(out))
            else:
                await fa.send(topics.clean, key=clean_key(out), value=events_serde.encode(out))
            metrics.feedback.labels(metrics.cap_source(source), metrics.cap_type(etype)).inc()
            metrics.text_dropped.inc(result.text_dropped)
            why = needs_triage(out, rules)
            if why is not None:
                command = enqueue_command(out, why, arrived_s=now.timestamp())
                await fa.send(topics.triage_commands, key=command.triage_id.encode(), value=command.to_bytes())
            if etype == "veto":
                metrics.veto.inc()
            elif etype in ("regret", "regret_signal"):
                metrics.regret.inc()
        elif result.outcome == "sampled_out":
            metrics.sampled_out.labels(metrics.cap_type(etype)).inc()
        else:
            reason = "duplicate" if result.outcome == "duplicate" else result.reason
            rejected = GateResult(result.outcome, reason=reason, field=result.field, rule=result.rule)
            row = rejection_record(
                record, rejected, topic=msg.topic, partition=msg.partition, offset=msg.offset, now=now
            )
            await fa.send(topics.rejected, key=source.encode(), value=rejections.encode(row))
            metrics.rejected.labels(reason).inc()
            if reason == "rate_limited":
                metrics.rate_limited.inc()
            elif reason == "duplicate":
                metrics.duplicates.inc()
        outcome = Outcome(
            source=source,
            type=etype,
            severity=str(record.get("severity") or "info"),
            outcome=REPUTATION_OUTCOMES.get(result.outcome, result.reason),
            kept=result.outcome == "clean",
            ts_s=record["ts"].timestamp() if isinstance(record.get("ts"), datetime) else now.timestamp(),
            model_version=record.get("model_version"),
            partition=msg.partition,
            offset=msg.offset,
        )
        await fa.send(topics.outcomes, key=source.encode(), value=outcome.to_bytes())

    @app.agent(raw_topic, name="gate")
    async def gate(stream: faust.StreamT) -> None:
        await each("gate", stream, gate_one)

    @app.timer(interval=SEEN_SWEEP_S)
    async def sweep_seen() -> None:
        """Tombstone dedup keys whose window has ended (an expired key is already ignored;
        this only keeps the table from growing)."""
        now_s = time.time()
        sweep(seen, lambda value: value["expires_s"] <= now_s, "dedup_keys_expired")

    def sweep(table: Any, expired: Callable[[dict[str, Any]], bool], event: str) -> None:
        """Tombstone up to SEEN_SWEEP_MAX ``expired`` entries of ``table`` (values remember their
        changelog partition), so one sweep never stalls the agents; not during recovery."""
        if app.in_recovery or app.rebalancing:
            return
        swept = 0
        for key, value in list(table.data.items()):
            if value is not None and expired(value):
                drop(table, key)
                swept += 1
                if swept >= SEEN_SWEEP_MAX:
                    break
        if swept:
            log.info("%s count=%d", event, swept)

    def drop(table: Any, key: str, partition: int | None = None) -> bool:
        """Remove ``key`` from ``table`` outside its partition's event (a timer, an erasure marker on
        another partition): the tombstone goes to the changelog partition the value remembers."""
        value = table.data.pop(key, None)
        if value is None:
            return False
        table.send_changelog(value.get("partition", partition), key, None, value_serializer="raw")
        return True

    def forget_subject(key: bytes | None, partition: int) -> None:
        """An erasure marker (``feedback forget``): a null value on the raw topic, keyed by the user id
        or its pseudonym, sent to every partition. Drop that subject's rate-limit entry and tombstone
        it in the changelog partition it was written to."""
        if not key:
            return
        given = key.decode(errors="replace")
        candidates = {given}
        if config.pseudonym_key is not None:
            candidates.add(pseudonymize(given, config.pseudonym_key))
        for candidate in candidates:
            if drop(subjects, candidate, partition):
                metrics.erased.labels("subjects").inc()

    def clean_key(record: dict[str, Any]) -> bytes:
        return str(record.get("user_id") or record["source"]).encode()

    # --- delayed feedback: interactions and the join --------------------------------
    ttl_s = settings.interaction_ttl_s

    async def interaction_one(event: EventT) -> None:
        msg = event.message
        if msg.value is None:  # a tombstone (``feedback forget``): the interaction is erased
            key = (msg.key or b"").decode(errors="replace")
            if interactions.get(key) is not None:
                del interactions[key]  # same partition as the record: the changelog gets the tombstone
                metrics.erased.labels("interactions").inc()
            return
        record = interaction_serde.decode(msg.value)  # PoisonEvent → DLQ (stage "interactions")
        try:
            context = context_of(record, allow_text=config.allow_text)
        except InvalidEvent as exc:
            raise PoisonEvent(f"invalid interaction: {exc.field}: {exc.rule}") from None
        key = str(record["interaction_id"])
        if newer(interactions.get(key), context):
            interactions[key] = {**context, "partition": msg.partition}
            metrics.interactions.inc()

    @app.agent(interactions_topic, name="interactions")
    async def interactions_agent(stream: faust.StreamT) -> None:
        await each("interactions", stream, interaction_one)

    async def enrich_one(event: EventT) -> None:
        record = events_serde.decode(event.message.value)
        enriched, status = enrich(record, interactions.get(str(record["interaction_id"])), ttl_s)
        metrics.enriched.labels(status).inc()
        await fa.send(topics.clean, key=clean_key(enriched), value=events_serde.encode(enriched))

    @app.agent(enrich_topic, name="enrich")
    async def enrich_agent(stream: faust.StreamT) -> None:
        await each("enrich", stream, enrich_one)

    @app.timer(interval=SEEN_SWEEP_S)
    async def sweep_interactions() -> None:
        """Forget interactions twice the TTL old: until then late feedback is told apart as
        'expired'; after that it is 'unknown'."""
        horizon = time.time() - 2 * ttl_s
        sweep(interactions, lambda value: value["ts_s"] < horizon, "interactions_forgotten")

    # --- the triage queue -------------------------------------------------------------
    async def triage_one(event: EventT) -> None:
        msg = event.message
        try:
            command = decode_command(msg.value)
        except ValueError as exc:
            raise PoisonEvent(f"not a triage command: {exc}") from None
        stored = triage.get(command.triage_id)
        if command.op == "erase":  # ``feedback forget``: the item goes, from the table and the compacted topic
            if stored is not None:
                del triage[command.triage_id]
                metrics.erased.labels("triage").inc()
            await fa.send(topics.triage, key=command.triage_id.encode(), value=None)
            return
        new, noisy_source = triage_apply(stored, command, msg.offset, rules)
        if new is not None:
            triage[command.triage_id] = new
            metrics.triage.labels(command.op).inc()
        current = new if new is not None else stored
        replayed = stored is not None and msg.offset <= stored["offset"]
        if current is not None and (new is not None or replayed):  # a replay republishes: compacted, idempotent
            item = TriageItem(**{k: v for k, v in current.items() if k != "offset"})
            await fa.send(topics.triage, key=command.triage_id.encode(), value=item.to_bytes())
        if noisy_source is not None:
            assert current is not None
            outcome = Outcome(
                source=noisy_source, type=str(current["type"]), severity=str(current["severity"]), outcome="noise",
                kept=False, ts_s=command.at_s, model_version=None, partition=msg.partition, offset=msg.offset,
                origin="triage",
            )  # fmt: skip
            await fa.send(topics.outcomes, key=noisy_source.encode(), value=outcome.to_bytes())

    @app.agent(commands_topic, name="triage")
    async def triage_agent(stream: faust.StreamT) -> None:
        await each("triage", stream, triage_one)

    # --- reputation ---------------------------------------------------------------
    reputation_out = Throttle(settings.bias_publish_interval_s)
    bias_out = Throttle(settings.bias_publish_interval_s)

    async def reputation_one(event: EventT) -> None:
        try:
            outcome = Outcome.from_bytes(event.message.value)
        except (TypeError, ValueError) as exc:
            raise PoisonEvent(f"not an outcome: {type(exc).__name__}") from None
        new, increment = reputation_apply(reputation.get(outcome.source), outcome, policy, bias_cfg)
        if new is None:
            metrics.state_replays.labels("reputation").inc()
        else:
            reputation[outcome.source] = new
            reputation_out.mark(outcome.source)
            metrics.state_updates.labels("reputation").inc()
        if increment is not None:
            await fa.send(topics.bias_input, key=increment.key.encode(), value=increment.to_bytes())

    @app.agent(outcomes_topic, name="reputation")
    async def reputation_agent(stream: faust.StreamT) -> None:
        await each("reputation", stream, reputation_one)
        # (publishing happens in the timer below, throttled per key)

    # --- directive bias --------------------------------------------------------------
    async def bias_one(event: EventT) -> None:
        try:
            increment = BiasIncrement.from_bytes(event.message.value)
        except (TypeError, ValueError) as exc:
            raise PoisonEvent(f"not a bias increment: {type(exc).__name__}") from None
        new = bias_apply(bias.get(increment.key), increment, bias_cfg)
        if new is None:
            metrics.state_replays.labels("directive-bias").inc()
            return
        bias[increment.key] = new
        bias_out.mark(increment.key)
        metrics.state_updates.labels("directive-bias").inc()

    @app.agent(bias_input_topic, name="directive-bias")
    async def bias_agent(stream: faust.StreamT) -> None:
        await each("directive-bias", stream, bias_one)

    async def publish_state(force: bool = False) -> None:
        if app.in_recovery or app.rebalancing:
            return
        now = time.monotonic()
        for source in reputation_out.due(now, force=force, known=list(reputation.keys()) if force else ()):
            value = reputation.get(source)
            if value is not None:
                record = reputation_record(source, value, policy)
                await fa.send(topics.reputation, key=source.encode(), value=encode_record(record))
                metrics.published.labels("reputation").inc()
        for key in bias_out.due(now, force=force, known=list(bias.keys()) if force else ()):
            value = bias.get(key)
            if value is not None:
                await fa.send(
                    topics.directive_bias, key=key.encode(), value=encode_record(bias_record(key, value, bias_cfg))
                )
                metrics.published.labels("directive-bias").inc()

    @app.timer(interval=max(0.1, settings.bias_publish_interval_s))
    async def publish_changed() -> None:
        await publish_state()

    @app.timer(interval=REPUBLISH_S)
    async def republish_all() -> None:
        # Compacted topics: republishing is idempotent, and it heals an update lost in a crash.
        await publish_state(force=True)

    fa.agents.update(
        {
            "gate": gate,
            "reputation": reputation_agent,
            "bias": bias_agent,
            "interactions": interactions_agent,
            "enrich": enrich_agent,
            "triage": triage_agent,
        }
    )
    fa.outputs.update(
        {
            t.get_topic_name(): t
            for t in (
                clean_topic,
                rejected_topic,
                dlq_topic,
                outcomes_topic,
                bias_input_topic,
                reputation_topic,
                bias_topic,
                enrich_topic,
                commands_topic,
                triage_topic,
            )
        }
    )
    fa.publish_state = publish_state
    return fa


def run_worker(settings: Settings) -> None:
    """Run the worker until SIGTERM/SIGINT (blocking)."""
    fa = create_app(settings)
    # The tables' changelogs too: a changelog Faust creates itself is missing from the metadata of
    # its first rebalance, and an event that touches the table then fails (PartitionsMismatch).
    ensure_topics(settings, compacted=[t.changelog_topic.get_topic_name() for t in fa.tables.values()])
    fa.metrics.serve(settings.worker_metrics_port)
    worker = faust.Worker(fa.app, loglevel=settings.log_level, quiet=True)
    worker.execute_from_commandline()

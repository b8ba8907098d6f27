"""The fault suite: the real worker and sink processes SIGKILLed under a steady load, then every
produced event id reconciled across every store.

``make test-faults`` runs every test here; ``make test`` runs the fast subset (the tests not
marked ``slow``). Each run ends with :func:`_reconcile`: every accepted id exactly once in
``feedback_events`` (``FINAL``, and plain after ``OPTIMIZE ... FINAL``) and in the JSONL files,
and in neither the rejected topic nor the DLQ; every refused id on the rejected topic and once
in ``rejected_events`` (``FINAL``), with its reason, and nowhere else; every poison message in
the DLQ topic and once in ``dlq_events``; every opinion (interaction, rater, type) once in
``feedback_current FINAL`` at its latest revision (the load revises some of its ratings and
thumbs in later rounds); and the worker's published state counting every decided event once
(reputation) and every accepted bad_output event once (the directive bias). The figures
(produced, accounted for, lost, duplicated, time to recover, revisions, state) are printed as one
JSON line (``pytest -s``); docs/reliability.md keeps the last run's.
"""

from __future__ import annotations

import contextlib
import random
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

from pipeline.errors import TransientError
from pipeline.kafka_admin import ensure_topics, topic_message_counts
from pipeline.settings import Settings
from producers.client import FeedbackClient
from producers.producer import DeliveryError, FeedbackProducer
from schemas.serde import AvroSerde
from schemas.topics import Topics
from sinks.clickhouse import connect
from tests.integration.kafka_read import read_topic
from tests.integration.pipeline_procs import pipeline_process, wait_for
from tests.integration.test_sink_crashes import _jsonl_ids

pytestmark = [pytest.mark.integration, pytest.mark.faults]

ROUND = 400  # events per producer round; a round every ROUND_S: a steady ~1,300 events/s
ROUND_S = 0.3
MAX_ROUNDS = 300  # the load is bounded however long the kills take
# Opinions: a rating at each i % 20 == 13 and a thumbs at each i % 40 == 20 of a round, on an
# interaction of its own; the slot's next two rounds revise it (its rater, interaction and type, a
# later ts, a changed value, a new idempotency key): chains of CHAIN, staggered by slot, so every
# round holds first opinions and revisions.
CHAIN = 3
STARS = (4, 2, 5)  # a chain's ratings, by step: each revision changes the value
DIRECTIONS = ("up", "down", "up")
_REPEATS = re.compile(rb"batch_written sink=jsonl rows=\d+ repeats=(\d+)")
EXIT_FATAL = 70  # the worker's exit code when a batch fails as a whole (stream_processors.app._exit_now)


@dataclass
class Produced:
    """What the load sent, by the place each item must end up."""

    accepted: set[str] = field(default_factory=set)
    duplicate: set[str] = field(default_factory=set)  # an idempotency key already used: new id, refused
    invalid: set[str] = field(default_factory=set)  # ts far in the future: refused
    poison: set[bytes] = field(default_factory=set)  # not Avro at all: dead-lettered whole
    # With the broker away (a tolerant Load): items the client was told failed (never "accepted",
    # but a send that failed on the client may have reached the log: once at most, where its kind
    # says, or nowhere), and acknowledged resends whose original failed (accepted if the original
    # never landed, else refused as duplicate: either way exactly once).
    failed: dict[str, str] = field(default_factory=dict)  # event id → its kind (accepted, duplicate, invalid)
    either: set[str] = field(default_factory=set)
    failed_poison: set[bytes] = field(default_factory=set)
    interaction: dict[str, str] = field(default_factory=dict)  # id (of any bucket) → the interaction it names
    # id (of any bucket) of an explicit signal on an interaction → ((interaction, user, type), round,
    # value): the opinion it gives or revises; the latest round's landed one must be current.
    opinion: dict[str, tuple[tuple[str, str, str], int, float]] = field(default_factory=dict)
    revisions: set[str] = field(default_factory=set)  # ids (of any bucket) that revise an earlier round's
    bad_output: set[str] = field(default_factory=set)  # ids (of any bucket) of a directive type (the bias)
    resends: dict[str, str] = field(default_factory=dict)  # a resend's id → its original's (one idempotency key)

    @property
    def total(self) -> int:
        return (
            len(self.accepted) + len(self.duplicate) + len(self.invalid) + len(self.poison)
            + len(self.failed) + len(self.either) + len(self.failed_poison)
        )  # fmt: skip


def _opinion_step(round_no: int, i: int) -> tuple[int, int] | None:
    """For an opinion slot of a round: (the round its chain began, this item's step in it: 0 is
    the first opinion, 1 and 2 revise the step before); None for any other slot."""
    if i % 20 != 13 and i % 40 != 20:
        return None
    step = (round_no + i) % CHAIN
    return (round_no - step, step) if step <= round_no else (0, round_no)


def _items(round_no: int, ts: str = "") -> list[dict[str, Any]]:
    """One round: ROUND events; the last 1% resend an earlier event of the round as a client
    retry does (the same fields and idempotency key, a new event id: refused as duplicates), and
    0.5% are stamped far in the future (refused as invalid). Every tenth, and a thumbs at each
    i % 40 == 20, names an interaction; the ratings and thumbs among them are opinions
    (:func:`_opinion_step`), stamped ``ts`` (later each round): a first opinion on an interaction
    of its own, or a revision of the same slot's opinion of an earlier round, which changes its
    value (STARS, DIRECTIONS). Revisions are events too: each is accepted once."""
    out: list[dict[str, Any]] = []
    for i in range(ROUND):
        if i >= ROUND - ROUND // 100:
            out.append(dict(out[i - ROUND // 2]))
            continue
        kind = ("thumbs", "rating", "implicit", "bad_output")[i % 4]
        payload = {"thumbs": {"direction": "up"}, "rating": {"stars": 4}, "implicit": {"signal": "copy"}}.get(kind, {})
        item: dict[str, Any] = {
            "type": kind, "user_id": f"user-{i % 500}", "payload": payload,
            "idempotency_key": f"r{round_no}-{i}",
        }  # fmt: skip
        if i % 200 == 7:
            item["ts"] = "2099-01-01T00:00:00Z"
        if i % 10 == 3:
            item["interaction_id"] = f"chat-r{round_no}-{i}"
        chain = _opinion_step(round_no, i)
        if chain is not None:
            first, step = chain
            item["interaction_id"] = f"chat-r{first}-{i}"  # the chain's: the same opinion each round
            item["payload"] = {"stars": STARS[step]} if kind == "rating" else {"direction": DIRECTIONS[step]}
            if ts:
                item["ts"] = ts
        out.append(item)
    return out


class Load:
    """A producer thread: a round of events every ROUND_S and one poison message every fifth
    round, until :meth:`stop` (or MAX_ROUNDS). ``produced`` says what each item must become.

    ``delivery_timeout_ms`` (with the broker away): the client's delivery timeout, and a round
    whose delivery fails is filed (``Produced.failed``, ``either``) instead of stopping the load."""

    def __init__(self, settings: Settings, seed: int, delivery_timeout_ms: int | None = None) -> None:
        self.settings = settings
        self.produced = Produced()
        self.rounds = 0
        self.delivery_timeout_ms = delivery_timeout_ms
        self._rng = random.Random(seed)
        self._last_ts = datetime.now(UTC) - timedelta(seconds=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> Produced:
        self._stop.set()
        self._thread.join(120 + (self.delivery_timeout_ms or 0) / 1000)
        assert not self._thread.is_alive(), "the load did not stop"
        if self.error is not None:
            raise self.error
        return self.produced

    def _flush(self, flush: Callable[[float], None], ids: list[str]) -> set[str]:
        """Flush; the ids whose delivery failed (all of them when some are still in flight)."""
        if self.delivery_timeout_ms is None:
            flush(60.0)
            return set()
        try:
            flush(self.delivery_timeout_ms / 1000 + 15)
        except DeliveryError as exc:
            return {event_id for event_id, _ in exc.failures} & set(ids)
        except TransientError:  # neither acknowledged nor failed: as uncertain as a failure
            return set(ids)
        return set()

    def _run(self) -> None:
        try:
            with FeedbackClient("faults", self.settings) as client, FeedbackProducer(self.settings) as raw:
                if self.delivery_timeout_ms is not None:
                    config = {"message.timeout.ms": self.delivery_timeout_ms}
                    client.producer.close()  # the same client, with a delivery timeout the test can wait out
                    client.producer = FeedbackProducer(self.settings, config=config)
                    raw.close()
                    raw = FeedbackProducer(self.settings, config=config)
                while not self._stop.is_set() and self.rounds < MAX_ROUNDS:
                    started = time.monotonic()
                    self._round(client, raw)
                    self.rounds += 1
                    self._stop.wait(max(0.0, ROUND_S - (time.monotonic() - started)))
                if self.delivery_timeout_ms is not None:
                    raw.close()
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def _round(self, client: FeedbackClient, raw: FeedbackProducer) -> None:
        self._last_ts = max(datetime.now(UTC), self._last_ts + timedelta(milliseconds=1))  # later each round
        items = _items(self.rounds, self._last_ts.isoformat().replace("+00:00", "Z"))
        results = client.emit_many(items)
        ids = [result.event_id for result in results]
        failed = self._flush(client.flush, ids)
        produced = self.produced
        buckets = {"accepted": produced.accepted, "duplicate": produced.duplicate, "invalid": produced.invalid}
        for i, (item, event_id) in enumerate(zip(items, ids, strict=True)):
            kind = "accepted"
            if item["idempotency_key"] != f"r{self.rounds}-{i}":
                kind = "duplicate"
            elif item.get("ts", "").startswith("2099"):
                kind = "invalid"
            if item.get("interaction_id"):
                produced.interaction[event_id] = item["interaction_id"]
            chain = _opinion_step(self.rounds, i) if kind == "accepted" else None
            if chain is not None:
                stars, up = item["payload"].get("stars", 0), item["payload"].get("direction") == "up"
                value = (stars - 3) / 2 if item["type"] == "rating" else 1.0 if up else -1.0  # normalize.py
                opinion = (item["interaction_id"], item["user_id"], item["type"])
                produced.opinion[event_id] = (opinion, self.rounds, value)
                if chain[1]:
                    produced.revisions.add(event_id)
            if item["type"] == "bad_output":
                produced.bad_output.add(event_id)
            if kind == "duplicate":
                produced.resends[event_id] = ids[i - ROUND // 2]
            if event_id in failed:
                produced.failed[event_id] = kind
            elif kind == "duplicate" and ids[i - ROUND // 2] in failed:
                produced.either.add(event_id)
            else:
                buckets[kind].add(event_id)
        if self.rounds % 5 == 2:
            poison = b"fault-poison " + self._rng.randbytes(64)
            raw.send_raw(poison, key=b"poison")
            (produced.failed_poison if self._flush(raw.flush, ["raw"]) else produced.poison).add(poison)


def _settings(isolated: Settings) -> Settings:
    return isolated.model_copy(
        update={
            "kafka_session_timeout_s": 6.0,
            "worker_metrics_port": 0,
            "rate_limit_per_minute": 1_000_000,
            "sink_batch_rows": 500,
            "sink_batch_ms": 100,
            "pseudonym_key": "fault-suite-key-0123456",
        }
    )


def _clean_messages(settings: Settings) -> int:
    topic = Topics(settings.topic_prefix).clean
    return topic_message_counts(settings, [topic])[topic]


def _jsonl_distinct(settings: Settings) -> int:
    return len(_jsonl_ids(settings, allow_partial=True))


def _final_ids(settings: Settings, table: str, column: str = "event_id") -> Counter[Any]:
    client = connect(settings)
    db = settings.clickhouse_database
    if not client.command(f"EXISTS TABLE `{db}`.{table}"):
        return Counter()
    return Counter(r[0] for r in client.query(f"SELECT {column} FROM `{db}`.{table} FINAL").result_rows)


def _kill_and_restart(
    stack: contextlib.ExitStack,
    proc: subprocess.Popen[bytes],
    restart: Callable[[], subprocess.Popen[bytes]],
    progress: Callable[[], int],
    others: list[subprocess.Popen[bytes]],
) -> tuple[subprocess.Popen[bytes], float]:
    """SIGKILL ``proc``, start its replacement at once, and wait until ``progress`` moves past
    its value once ``proc`` is gone; returns the new process and the seconds from kill to progress."""
    killed_at = time.monotonic()
    proc.kill()
    assert proc.wait(10) == -9
    at_kill = progress()  # after the exit: nothing the dead process had in flight counts as progress
    new = restart()
    wait_for(lambda: progress() > at_kill, 180, "progress after the restart", [new, *others])
    return new, time.monotonic() - killed_at


def _wait_count(
    count: Callable[[], int], want: int, what: str, procs: list[subprocess.Popen[bytes]], stall_s: float = 120
) -> None:
    """:func:`wait_for` ``count() >= want``, naming the last count when it fails: after ``stall_s``
    without the count growing, or after 300 s in all (a loaded machine drains a backlog slowly,
    a stuck store not at all)."""
    last, moved = [-1], [time.monotonic()]

    def reached() -> bool:
        now = count()
        if now > last[0]:
            last[0], moved[0] = now, time.monotonic()
        assert time.monotonic() - moved[0] < stall_s, f"{what}: no progress for {stall_s:.0f}s"
        return now >= want

    try:
        wait_for(reached, 300, what, procs)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {last[0]} of {want}") from None


def _settle(settings: Settings, produced: Produced, procs: list[subprocess.Popen[bytes]]) -> float:
    """Wait until every store holds what it should; returns the seconds it took. Items whose
    delivery failed are not waited for (they may never land)."""
    started = time.monotonic()
    refused = len(produced.duplicate) + len(produced.invalid)
    clean, either = produced.accepted, produced.either

    def landed(count: Callable[[], set[Any]], want: set[Any]) -> Callable[[], int]:
        return lambda: len(count() & want)

    events = lambda: set(_final_ids(settings, "feedback_events"))  # noqa: E731
    rejected = lambda: set(_final_ids(settings, "rejected_events"))  # noqa: E731
    _wait_count(landed(events, clean), len(clean), "ClickHouse", procs)
    _wait_count(landed(lambda: set(_jsonl_ids(settings, allow_partial=True)), clean), len(clean), "the JSONL files",
                procs)  # fmt: skip
    _wait_count(landed(rejected, produced.duplicate | produced.invalid), refused, "rejected_events", procs)
    _wait_count(lambda: len((events() | rejected()) & either), len(either), "the acknowledged resends", procs)
    _wait_count(
        lambda: len(_final_ids(settings, "dlq_events", "(partition, offset)")), len(produced.poison), "dlq", procs
    )
    time.sleep(3.0)  # anything a replay still had in flight lands now, to be counted below
    return time.monotonic() - started


def _extra(found: Counter[Any]) -> int:
    return sum(n - 1 for n in found.values() if n > 1)


def _rollups(settings: Settings) -> dict[str, int]:
    """What the rollups count (docs/stream.md, "Rollups exact after a crash"): events in
    feedback_daily and interaction_stats (views over their rows tables, FINAL), opinions in
    feedback_current FINAL, and each rows table and feedback_current counted plain after
    OPTIMIZE ... FINAL."""
    client = connect(settings)
    db = f"`{settings.clickhouse_database}`"
    one = lambda sql: int(client.command(sql.replace("{db}", db)))  # noqa: E731
    weighted = f"SELECT sum(weighted_events) FROM {db}.feedback_daily"
    out = {
        "feedback_daily": one("SELECT sum(events) FROM {db}.feedback_daily"),
        "feedback_daily_weighted": round(float(client.command(weighted))),
        "interaction_stats": one("SELECT sum(feedback_count) FROM {db}.interaction_stats"),
        "interactions": one("SELECT count() FROM {db}.interaction_stats"),
        "feedback_current": one("SELECT count() FROM {db}.feedback_current FINAL"),
    }
    for table in ("feedback_daily_rows", "interaction_stats_rows", "feedback_current"):
        client.command(f"OPTIMIZE TABLE {db}.{table} FINAL")
        out[f"{table}_optimized"] = one(f"SELECT count() FROM {{db}}.{table}")
    return out


def _state(settings: Settings, decided: int, feeding: int, procs: list[subprocess.Popen[bytes]]) -> dict[str, int]:
    """Wait (bounded) until the worker's published state counts what the load decided: the sum of
    reputation ``observations`` over the latest record per key of the reputation topic equals the
    ``decided`` events (accepted and refused), the directive bias ``events`` the ``feeding`` ones
    (the accepted bad_output events); asserted, after a run without kills as after any."""
    from schemas.state_records import decode_bias, decode_reputation
    from tests.integration.kafka_read import latest_by_key

    topics = Topics(settings.topic_prefix)

    def observations() -> int:
        return sum(decode_reputation(v).observations for v in latest_by_key(settings, topics.reputation).values())

    def bias_events() -> int:
        return sum(decode_bias(v).events for v in latest_by_key(settings, topics.directive_bias).values())

    with contextlib.suppress(AssertionError):  # judged below, with the figures
        wait_for(lambda: observations() == decided and bias_events() == feeding, 120, "the state", procs)
    state = {"reputation_observations": observations(), "decided": decided, "bias_events": bias_events(),
             "bad_output_accepted": feeding}  # fmt: skip
    assert state["reputation_observations"] == decided, f"reputation: every decided event once: {state}"
    assert state["bias_events"] == feeding, f"the directive bias: every accepted bad_output event once: {state}"
    return state


def _opinions(settings: Settings, produced: Produced, clean: set[str]) -> dict[str, int]:
    """Revisions (docs/stream.md, "Dedup and revisions"): every opinion of the load once in
    ``feedback_current FINAL``, holding its latest landed revision (event id, value, rater), and
    each revision whose predecessor was acknowledged naming it as ``supersedes`` in
    ``feedback_events``. Returns the counts."""
    from stream_processors.config import pseudonym_key
    from stream_processors.redact import pseudonymize

    client = connect(settings)
    db = f"`{settings.clickhouse_database}`"
    latest: dict[tuple[str, str, str], tuple[int, str, float]] = {}
    by_step: dict[tuple[tuple[str, str, str], int], str] = {}
    for event_id in clean & produced.opinion.keys():
        opinion, round_no, value = produced.opinion[event_id]
        by_step[opinion, round_no] = event_id
        if opinion not in latest or round_no > latest[opinion][0]:
            latest[opinion] = (round_no, event_id, value)
    rows = client.query(
        f"SELECT interaction_id, rater, type, event_id, value, supersedes FROM {db}.feedback_current FINAL "
        "WHERE opinion_key != event_id"
    ).result_rows
    current = Counter((r[0], r[2]) for r in rows)
    assert _extra(current) == 0, f"feedback_current: {_extra(current)} opinions with more than one row"
    secret = settings.pseudonym_key  # _settings sets it (a str: model_copy does not validate)
    key = secret.encode() if isinstance(secret, str) else pseudonym_key(settings)
    key = key if settings.pseudonymize_user_id else None
    raters = {user: pseudonymize(user, key) if key is not None else user for _, user, _ in latest}
    want = {(i, t): (raters[u], e, v) for (i, u, t), (_, e, v) in latest.items()}
    got = {(r[0], r[2]): (r[1], r[3], r[4]) for r in rows}
    wrong = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    assert not wrong and got.keys() == want.keys(), (
        f"feedback_current: {len(wrong)} opinions not at their latest revision (e.g. {list(wrong.items())[:3]}), "
        f"{len(got.keys() - want.keys())} that the load never gave"
    )
    supersedes = dict(client.query(
        f"SELECT event_id, ifNull(supersedes, '') FROM {db}.feedback_events FINAL WHERE ifNull(supersedes, '') != ''"
    ).result_rows)  # fmt: skip
    named = 0
    for (opinion, round_no), event_id in by_step.items():
        before = by_step.get((opinion, round_no - 1)) if event_id in produced.revisions else None
        if before is None or not {event_id, before} <= produced.accepted:
            continue  # a first opinion, or its predecessor's delivery failed: its order is not certain
        assert supersedes.get(event_id) == before, f"revision {event_id} supersedes {supersedes.get(event_id)!r}"
        named += 1
    assert not supersedes.keys() - produced.revisions, "an event supersedes another that is not a revision"
    return {"revisions": len(clean & produced.revisions), "opinions": len(want), "supersedes_checked": named}


def _reconcile(settings: Settings, produced: Produced, procs: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    """Every produced item in exactly the places the rules say (asserted), the rollups summing to
    the accepted events, every opinion at its latest revision in feedback_current, and the worker's
    state counting every decided event once (``procs``: the running worker(s) and sink); the
    figures."""
    topics = Topics(settings.topic_prefix)
    client = connect(settings)
    db = settings.clickhouse_database
    refused = produced.duplicate | produced.invalid
    uncertain = set(produced.failed) | produced.either  # accepted, refused or (failed) nowhere

    final = _final_ids(settings, "feedback_events")
    client.command(f"OPTIMIZE TABLE `{db}`.feedback_events FINAL")
    plain = Counter(r[0] for r in client.query(f"SELECT event_id FROM `{db}`.feedback_events").result_rows)
    lines = _jsonl_ids(settings)
    rejections = [AvroSerde("rejected_v1").decode(v) for _, v in read_topic(settings, topics.rejected) if v]
    reasons = {r["event_id"]: r["reason"] for r in rejections}
    rejected_rows = _final_ids(settings, "rejected_events")
    letters = [AvroSerde("dead_letter_v1").decode(v) for _, v in read_topic(settings, topics.dlq) if v]
    dead = {bytes(letter["raw"]) for letter in letters}
    dlq_rows = _final_ids(settings, "dlq_events", "(partition, offset)")

    landed_clean = uncertain & set(final)  # what of the uncertain landed, and where
    landed_refused = uncertain & set(reasons)
    clean = produced.accepted | landed_clean
    stores = {"clickhouse_final": final, "clickhouse_optimized": plain, "jsonl": lines}
    for name, found in stores.items():
        assert set(found) == clean, f"{name}: {len(clean - set(found))} lost, "
        f"{len(set(found) - clean)} that do not belong"
        assert _extra(found) == 0, f"{name}: {_extra(found)} duplicated"
    assert not landed_clean & landed_refused, "an event both accepted and refused"
    assert produced.either <= landed_clean | landed_refused, "an acknowledged resend is nowhere"
    assert set(reasons) == refused | landed_refused, "the rejected topic holds exactly the refused ids"
    assert {reasons[i] for i in produced.duplicate | produced.either & landed_refused} <= {"duplicate"}
    assert {reasons[i] for i in produced.invalid} <= {"invalid"}
    for event_id in landed_refused & set(produced.failed):
        assert reasons[event_id] == ("invalid" if produced.failed[event_id] == "invalid" else "duplicate"), event_id
    assert not {i for i in landed_clean if produced.failed.get(i) == "invalid"}, "an invalid event accepted"
    for resend, original in produced.resends.items():  # one idempotency key: accepted once, if at all
        accepted_of_key = (resend in clean) + (original in clean)
        assert accepted_of_key <= 1, f"an idempotency key accepted twice: {original}, {resend}"
        assert accepted_of_key == 1 or {resend, original} <= set(produced.failed), "an acknowledged key is lost"
    assert set(rejected_rows) == set(reasons) and _extra(rejected_rows) == 0
    assert produced.poison <= dead <= produced.poison | produced.failed_poison
    assert {letter["stage"] for letter in letters} <= {"decode"}
    assert len(dlq_rows) == len(dead) and _extra(dlq_rows) == 0

    # The rollups: every accepted event counted once, revisions included (they are events too);
    # feedback_current one row per opinion (a revision replaces its opinion's row), the other events
    # one row each; interaction_stats a row per interaction named, its revisions' too.
    opinions = _opinions(settings, produced, clean)
    rollups = _rollups(settings)
    named = clean & produced.interaction.keys()
    with_interaction, interactions = len(named), len({produced.interaction[i] for i in named})
    current = len(clean - produced.opinion.keys()) + opinions["opinions"]
    want = {
        "feedback_daily": len(clean), "feedback_daily_weighted": len(clean), "interaction_stats": with_interaction,
        "interactions": interactions, "feedback_current": current, "feedback_daily_rows_optimized": len(clean),
        "interaction_stats_rows_optimized": with_interaction, "feedback_current_optimized": current,
    }  # fmt: skip
    assert rollups == want, f"rollups {rollups} != accepted {want}"
    decided = len(clean) + len(reasons)  # accepted and refused (the failed that landed as either included)
    state = _state(settings, decided, len(clean & produced.bad_output), procs)

    acknowledged = produced.accepted | refused | produced.either
    accounted = len(produced.accepted & set(final) & set(lines)) + len(refused & set(rejected_rows))
    accounted += len(produced.either & (landed_clean | landed_refused)) + len(produced.poison & dead)
    failed_landed = len((landed_clean | landed_refused) & set(produced.failed)) + len(dead - produced.poison)
    return {
        "produced": produced.total,
        "accepted": len(produced.accepted),
        "accepted_landed": len(clean),  # with the failed that landed as accepted
        "refused": len(refused),
        "poison": len(produced.poison),
        "failed": len(produced.failed) + len(produced.failed_poison),
        "failed_landed": failed_landed,
        "acked_resends_of_failed": len(produced.either),
        "accounted_for": accounted,
        "lost": len(acknowledged) + len(produced.poison) - accounted,
        "duplicated": sum(_extra(c) for c in (final, plain, lines, rejected_rows, dlq_rows)),
        "repeats_on_topics": len(rejections) - len(reasons) + len(letters) - len(dead),
        "rollups": {"feedback_daily": rollups["feedback_daily"], "interaction_stats": rollups["interaction_stats"],
                    "feedback_current": rollups["feedback_current"]},
        **opinions,
        "state": state,
    }  # fmt: skip


def _kills(settings: Settings, tmp_path: Path, victims: list[str], seed: int) -> dict[str, Any]:
    """The worker and the sink under the load; each of ``victims`` (``worker`` or ``sink``)
    SIGKILLed in turn at a seeded moment, once it has made progress since the last kill.
    Returns the reconciled figures."""
    ensure_topics(settings)
    rng = random.Random(seed)
    logs = iter(range(100))

    def start(command: str) -> subprocess.Popen[bytes]:
        return stack.enter_context(pipeline_process(settings, command, tmp_path / f"{command}-{next(logs)}.log"))

    progress = {"worker": lambda: _clean_messages(settings), "sink": lambda: _jsonl_distinct(settings)}
    recoveries: list[float] = []
    tmp_path.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        procs = {"worker": start("worker"), "sink": start("sink")}
        load = Load(settings, seed).start()
        wait_for(lambda: _jsonl_distinct(settings) >= ROUND, 180, "the first events end to end", list(procs.values()))
        for victim in victims:
            moved = progress[victim]
            before = moved()
            wait_for(lambda b=before, m=moved: m() >= b + ROUND, 180, "progress before the kill", list(procs.values()))
            time.sleep(rng.uniform(0.0, 1.5))  # somewhere inside a batch, or between two
            other = [p for name, p in procs.items() if name != victim]
            procs[victim], took = _kill_and_restart(stack, procs[victim], lambda v=victim: start(v), moved, other)
            recoveries.append(round(took, 1))
        produced = load.stop()
        assert produced.total and load.rounds < MAX_ROUNDS, "the load ended before the kills: they proved nothing"
        settle_s = _settle(settings, produced, list(procs.values()))
        figures = _reconcile(settings, produced, list(procs.values()))
        assert all(p.poll() is None for p in procs.values()), "a pipeline process died on its own"
        resent = _clean_messages(settings) - len(produced.accepted)  # what the worker sent twice
    logs = {log.name: log.read_bytes() for log in tmp_path.glob("*.log")}
    assert not any(b"batch_failed" in text for text in logs.values()), "the kills were the only faults"
    skipped = sum(int(n) for name, text in logs.items() if name.startswith("sink") for n in _REPEATS.findall(text))
    figures.update(
        {
            "killed": victims,
            "recover_s": recoveries,
            "settle_s": round(settle_s, 1),
            "clean_messages_resent": resent,
            "jsonl_repeats_skipped": skipped,
        }
    )
    print("fault_figures", orjson.dumps(figures).decode())
    return figures


@pytest.mark.slow
def test_worker_sigkilled_three_times(isolated: Settings, tmp_path: Path) -> None:
    figures = _kills(_settings(isolated), tmp_path, ["worker"] * 3, seed=31)
    assert figures["lost"] == 0 and figures["duplicated"] == 0


@pytest.mark.slow
def test_sink_sigkilled_three_times(isolated: Settings, tmp_path: Path) -> None:
    figures = _kills(_settings(isolated), tmp_path, ["sink"] * 3, seed=32)
    assert figures["lost"] == 0 and figures["duplicated"] == 0


def test_worker_and_sink_sigkilled_once_each(isolated: Settings, tmp_path: Path) -> None:
    """The fast subset's kill test: the worker killed, then the sink, the same reconciliation."""
    figures = _kills(_settings(isolated), tmp_path, ["worker", "sink"], seed=33)
    assert figures["lost"] == 0 and figures["duplicated"] == 0


def _set_topic_config(settings: Settings, topic: str, name: str, value: str | None) -> None:
    """Set one config of ``topic`` (None: back to the broker's default), leaving the others."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    op = AlterConfigOpType.SET if value is not None else AlterConfigOpType.DELETE
    entry = ConfigEntry(name, value or "", incremental_operation=op)
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)


def test_a_failing_dead_letter_stops_the_worker_and_nothing_is_acknowledged(isolated: Settings, tmp_path: Path) -> None:
    """No silent acknowledgement: the DLQ refuses a letter (over its max.message.bytes), so the
    batch fails as a whole; the worker exits non-zero without acknowledging it, and after the
    DLQ is fixed a restarted worker handles the batch again: every event is accounted for."""
    settings = _settings(isolated)
    ensure_topics(settings)
    topics = Topics(settings.topic_prefix)
    _set_topic_config(settings, topics.dlq, "max.message.bytes", "2000")
    before = [{"type": "thumbs", "user_id": f"u{i}", "payload": {"direction": "up"}, "idempotency_key": f"b{i}"}
              for i in range(300)]  # fmt: skip
    after = [{**item, "idempotency_key": f"a{i}"} for i, item in enumerate(before)]
    poison = b"fault-poison " + random.Random(5).randbytes(4000)  # its letter is over 2,000 bytes
    with FeedbackClient("faults", settings) as client, FeedbackProducer(settings) as raw:
        first = client.emit_many(before)
        client.flush()
        raw.send_raw(poison, key=b"poison")
        raw.flush()
        second = client.emit_many(after)
        client.flush()
    produced = Produced(accepted={a.event_id for a in first + second}, poison={poison})

    with pipeline_process(settings, "sink", tmp_path / "sink.log") as sink:
        with pipeline_process(settings, "worker", tmp_path / "worker-1.log") as worker:
            deadline = time.monotonic() + 180
            while worker.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            assert worker.poll() == EXIT_FATAL, "the worker must stop when a dead letter cannot be sent"
        log = (tmp_path / "worker-1.log").read_bytes()
        assert b"batch_failed" in log
        assert b"fault-poison" not in log  # coordinates and reasons, never the bytes
        _set_topic_config(settings, topics.dlq, "max.message.bytes", None)
        with pipeline_process(settings, "worker", tmp_path / "worker-2.log") as worker:
            _settle(settings, produced, [worker, sink])
            figures = _reconcile(settings, produced, [worker, sink])
            assert worker.poll() is None
    assert figures["lost"] == 0 and figures["duplicated"] == 0
    print("fault_figures", orjson.dumps({**figures, "test": "dead letter refused"}).decode())


def test_poison_of_every_kind_is_dead_lettered_or_rejected_and_the_rest_lands(
    isolated: Settings, tmp_path: Path
) -> None:
    """Random bytes, truncated Avro, an unknown fingerprint, an envelope nested in an envelope,
    NaN and infinities, far-future and ancient timestamps, and a 2 MB message, between good
    events: each bad one ends where the rules say (the DLQ with its decode reason, or
    rejected_events as invalid with its field and rule), the 2 MB one is refused to its
    producer, every good event lands once, and the worker never stops."""
    import math
    from datetime import UTC, datetime

    from confluent_kafka import KafkaException

    from producers.producer import DeliveryError
    from schemas import FeedbackEvent
    from schemas.envelope import pack
    from schemas.serde import SINGLE_OBJECT_MAGIC

    settings = _settings(isolated)
    ensure_topics(settings)
    serde = AvroSerde()
    rng = random.Random(11)
    now = datetime.now(UTC).replace(microsecond=0)

    def encoded(event_id: str, **over: Any) -> bytes:
        record = FeedbackEvent.model_validate(
            {"event_id": event_id, "source": "faults", "type": "rating", "ts": now, "payload": {"stars": 3}}
        ).to_avro()
        return serde.encode({**record, **over})

    valid = encoded("00000000-0000-4000-8000-000000000001")
    undecodable = {  # what the DLQ must hold for each (its decode reason starts with this)
        b"fault-poison " + rng.randbytes(64): "unknown framing",
        valid[: len(valid) // 2]: "avro decode failed",
        SINGLE_OBJECT_MAGIC + rng.randbytes(8) + valid[10:]: "unknown schema fingerprint",
    }
    nested_item = pack([valid])  # an envelope as an envelope's item: dead-lettered as that item
    invalid = {  # event id → (field, rule) of the rejection
        "00000000-0000-4000-8000-0000000000a1": ("value", "finite", {"value": math.nan}),
        "00000000-0000-4000-8000-0000000000a2": ("value", "finite", {"value": math.inf}),
        "00000000-0000-4000-8000-0000000000a3": ("confidence", "finite", {"confidence": -math.inf}),
        "00000000-0000-4000-8000-0000000000a4": ("ts", "future", {"ts": datetime(2099, 1, 1, tzinfo=UTC)}),
        "00000000-0000-4000-8000-0000000000a5": ("ts", "older", {"ts": datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)}),
    }
    good = [{"type": "thumbs", "user_id": f"u{i}", "payload": {"direction": "up"}, "idempotency_key": f"g{i}"}
            for i in range(400)]  # fmt: skip
    with FeedbackClient("faults", settings) as client, FeedbackProducer(settings) as raw:
        accepted = {a.event_id for a in client.emit_many(good[:200])}
        client.flush()
        for value in undecodable:
            raw.send_raw(value, key=b"poison")
        raw.send_raw(pack([nested_item]), key=b"poison")
        for event_id, (_, _, over) in invalid.items():
            raw.send_raw(encoded(event_id, **over), key=b"invalid")
        raw.flush()
        with pytest.raises((DeliveryError, KafkaException)):  # over the broker's limit: never accepted
            raw.send_raw(rng.randbytes(2 * 1024 * 1024), key=b"big")
            raw.flush()
        accepted |= {a.event_id for a in client.emit_many(good[200:])}
        client.flush()

    with (
        pipeline_process(settings, "sink", tmp_path / "sink.log") as sink,
        pipeline_process(settings, "worker", tmp_path / "worker.log") as worker,
    ):
        procs = [worker, sink]
        _wait_count(lambda: len(_final_ids(settings, "feedback_events")), len(accepted), "ClickHouse", procs)
        _wait_count(lambda: len(_final_ids(settings, "rejected_events")), len(invalid), "rejected_events", procs)
        _wait_count(lambda: len(_final_ids(settings, "dlq_events", "(partition, offset)")), 4, "dlq_events", procs)
        time.sleep(2.0)  # anything still in flight lands now, to be counted below
        assert worker.poll() is None and sink.poll() is None, "poison must never stop the pipeline"
        state = _state(settings, len(accepted) + len(invalid), 0, procs)  # the undecodable decide nothing

    final = _final_ids(settings, "feedback_events")
    assert set(final) == accepted and _extra(final) == 0
    client = connect(settings)
    db = settings.clickhouse_database
    rows = client.query(f"SELECT event_id, reason, field, rule FROM `{db}`.rejected_events FINAL").result_rows
    assert {r[0] for r in rows} == set(invalid)
    for event_id, reason, field_, rule in rows:
        want_field, want_rule, _ = invalid[event_id]
        assert (reason, field_) == ("invalid", want_field) and want_rule in rule, (event_id, field_, rule)
    letters = [AvroSerde("dead_letter_v1").decode(v) for _, v in read_topic(settings, Topics(settings.topic_prefix).dlq)
               if v]  # fmt: skip
    assert {letter["stage"] for letter in letters} == {"decode"} and len(letters) == 4
    by_raw = {bytes(letter["raw"]): letter["error"] for letter in letters}
    for value, reason in undecodable.items():
        assert by_raw[value].startswith(reason), (reason, by_raw[value])
    assert "envelope item 0" in by_raw[nested_item]
    log = (tmp_path / "worker.log").read_bytes()
    assert b"fault-poison" not in log  # coordinates and reasons, never the bytes
    print("fault_figures", orjson.dumps({"test": "poison of every kind", "accepted": len(accepted),
                                         "rejected": len(rows), "dead_lettered": len(letters),
                                         "state": state}).decode())  # fmt: skip


def _raw_committed(settings: Settings) -> dict[int, int]:
    """The workers' group's committed offset of each raw partition (-1: none yet)."""
    from confluent_kafka import Consumer, TopicPartition

    group = f"{settings.topic_prefix}{settings.worker_id}"
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        raw = Topics(settings.topic_prefix).raw
        parts = consumer.committed([TopicPartition(raw, p) for p in range(settings.topic_partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in parts}
    finally:
        consumer.close()


@pytest.mark.slow
def test_two_workers_one_sigkilled_during_a_rebalance(isolated: Settings, tmp_path: Path) -> None:
    """Two workers of one group on a 12-partition raw topic (a state folder each, as two hosts
    would have) under the load; a third joins, and once it has asked to join (the group is
    rebalancing) one of the first two is SIGKILLed: no commit, no flush, in the middle of the
    handover. Recovery: until every raw partition's committed offset has moved past where it
    was at the kill (the dead worker's partitions taken over). Every store reconciles;
    reputation counts every decided event once and the directive bias every accepted
    bad_output event once."""
    settings = _settings(isolated).model_copy(update={"topic_partitions": 12, "bias_publish_interval_s": 0.2})
    ensure_topics(settings)
    rng = random.Random(34)
    figures: dict[str, Any] = {"test": "two workers, one killed in a rebalance"}
    with contextlib.ExitStack() as stack:

        def start(name: str) -> subprocess.Popen[bytes]:
            own = settings.model_copy(update={"state_dir": tmp_path / f"state-{name}"})
            return stack.enter_context(pipeline_process(own, "worker", tmp_path / f"{name}.log"))

        a, b = start("worker-a"), start("worker-b")
        sink = stack.enter_context(pipeline_process(settings, "sink", tmp_path / "sink.log"))
        load = Load(settings, seed=34).start()
        wait_for(lambda: _jsonl_distinct(settings) >= ROUND, 180, "the first events end to end", [a, b, sink])
        both = lambda: b"Joined group" in (tmp_path / "worker-b.log").read_bytes()  # noqa: E731
        wait_for(both, 120, "the second worker in the group", [a, b, sink])
        before = _clean_messages(settings)
        wait_for(lambda: _clean_messages(settings) >= before + 2 * ROUND, 180, "two workers deciding", [a, b, sink])

        c = start("worker-c")  # joins: the group rebalances
        joining = lambda: b"(Re-)joining group" in (tmp_path / "worker-c.log").read_bytes()  # noqa: E731
        wait_for(joining, 120, "the third worker asking to join", [a, b, c, sink])
        time.sleep(rng.uniform(0.0, 1.0))  # inside the rebalance: the group waits for every member
        killed_at = time.monotonic()
        b.kill()
        assert b.wait(10) == -9
        at_kill = _raw_committed(settings)  # the dead worker's partitions stay here until taken over

        def every_partition_moved() -> bool:
            now = _raw_committed(settings)
            return all(now.get(p, -1) > at_kill.get(p, -1) for p in range(settings.topic_partitions))

        wait_for(every_partition_moved, 240, "every raw partition committed past the kill", [a, c, sink])
        figures["recover_s"] = round(time.monotonic() - killed_at, 1)
        produced = load.stop()
        assert load.rounds < MAX_ROUNDS, "the load ended before the kill: it proved nothing"
        figures["settle_s"] = round(_settle(settings, produced, [a, c, sink]), 1)
        figures.update(_reconcile(settings, produced, [a, c, sink]))  # the state too: see _state
        assert all(p.poll() is None for p in (a, c, sink)), "a pipeline process died on its own"
        figures["clean_messages_resent"] = _clean_messages(settings) - len(produced.accepted)
    logs = {log.name: log.read_bytes() for log in tmp_path.glob("*.log")}
    assert not any(b"batch_failed" in text for text in logs.values()), "the kill was the only fault"
    print("fault_figures", orjson.dumps(figures).decode())
    assert figures["lost"] == 0 and figures["duplicated"] == 0

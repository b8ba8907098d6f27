"""A three-broker cluster losing brokers under load (`feedback up --brokers 3`).

The test starts its own cluster (``LocalKafka`` with three brokers, its own state folder and
free ports; ClickHouse is the session's), the real ``feedback worker`` and ``feedback sink``
processes, and a producer thread sending a round of events at a steady rate through the
Python client. Then:

1. one broker is SIGKILLed mid-stream: every round keeps being acknowledged (three replicas,
   min.insync.replicas 2) and the pipeline carries on;
2. a second broker is SIGKILLed: the client reports delivery errors and the HTTP gateway
   answers 503;
3. both are restarted: the pipeline recovers and drains.

It ends by reconciling: every event id the client got an acknowledgement for is exactly once
in ``feedback_events`` (``FINAL``, and plain after ``OPTIMIZE ... FINAL``) and in the JSONL
files; nothing lands that was never sent. An event whose delivery failed may still land (a
send that timed out on the client can have reached the log), once at most. The figures
(produced, acknowledged, failed, lost, duplicated, time to recover) are printed as one JSON
line (``pytest -s``); docs/reliability.md keeps the last run's. Marked ``slow``: it takes
two minutes or more on a busy machine, so it runs in ``make test-faults``, not in ``make test``.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType
from fastapi.testclient import TestClient

from pipeline.errors import TransientError
from pipeline.kafka_admin import ensure_topics
from pipeline.localstack import LocalKafka
from pipeline.settings import PROJECT_ROOT, Settings
from producers.client import FeedbackClient
from producers.gateway import create_gateway
from producers.producer import DeliveryError, FeedbackProducer
from schemas.envelope import is_envelope, unpack
from schemas.serde import AvroSerde
from schemas.topics import Topics
from sinks.clickhouse import connect
from tests.integration.kafka_read import read_topic
from tests.integration.pipeline_procs import pipeline_process, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

ROUND = 200  # events per round, a round every ROUND_S: ~400 events/s while Kafka acknowledges
ROUND_S = 0.5
MAX_ROUNDS = 1200  # the load is bounded however long the faults take
DELIVERY_TIMEOUT_MS = 30_000  # > the brokers' session timeout (9 s) plus an election: one loss costs no error
SOURCE = "failover"  # the load's events; the gateway's probe is failover-gw
TOKEN = "failover-token-0123456789-abcdefghij"
EXIT_FATAL = 70  # the worker's exit when a batch fails as a whole (Kafka refusing for good)


def _free_block(size: int, attempts: int = 50) -> int:
    """A base port with ``size`` consecutive free ports after it (bounded attempts)."""
    for _ in range(attempts):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + size > 65535:
            continue
        held: list[socket.socket] = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise AssertionError(f"no block of {size} free ports in {attempts} attempts")


@dataclass
class Ledger:
    """What the load sent, by what the client was told about each event."""

    acked: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)  # DeliveryError: not acknowledged
    unknown: set[str] = field(default_factory=set)  # still in flight when flush gave up
    rounds: list[tuple[float, int, int]] = field(default_factory=list)  # (started, acked, failed)

    @property
    def sent(self) -> set[str]:
        return self.acked | self.failed | self.unknown


class Load:
    """Rounds of ROUND events every ROUND_S through :class:`FeedbackClient`, each flushed, until
    :meth:`stop` or MAX_ROUNDS; every event id is filed by its outcome."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ledger = Ledger()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> Ledger:
        self._stop.set()
        self._thread.join(DELIVERY_TIMEOUT_MS / 1000 + 60)
        assert not self._thread.is_alive(), "the load did not stop"
        if self.error is not None:
            raise self.error
        return self.ledger

    def acked_rounds_since(self, since: float) -> int:
        """Rounds started after ``since`` (monotonic) that were acknowledged whole."""
        with self._lock:
            return sum(1 for started, _, failed in self.ledger.rounds if started > since and failed == 0)

    def failed_since(self, since: float) -> int:
        with self._lock:
            return sum(failed for started, _, failed in self.ledger.rounds if started > since)

    def _run(self) -> None:
        try:
            with FeedbackClient(SOURCE, self.settings) as client:
                client.producer.close()  # the same client, with a delivery timeout the test can wait out
                client.producer = FeedbackProducer(self.settings, config={"message.timeout.ms": DELIVERY_TIMEOUT_MS})
                for round_no in range(MAX_ROUNDS):
                    if self._stop.is_set():
                        break
                    started = time.monotonic()
                    items = [
                        {"type": "thumbs", "user_id": f"user-{i % 300}", "payload": {"direction": "up"},
                         "idempotency_key": f"r{round_no}-{i}"}
                        for i in range(ROUND)
                    ]  # fmt: skip
                    ids = [accepted.event_id for accepted in client.emit_many(items)]
                    failed: set[str] = set()
                    unknown: set[str] = set()
                    try:
                        client.flush(DELIVERY_TIMEOUT_MS / 1000 + 15)
                    except DeliveryError as exc:
                        failed = {event_id for event_id, _ in exc.failures}
                    except TransientError:  # some still in flight: neither acknowledged nor failed
                        unknown = set(ids)
                    with self._lock:
                        self.ledger.failed |= failed
                        self.ledger.unknown |= unknown - failed
                        self.ledger.acked |= set(ids) - failed - unknown
                        self.ledger.rounds.append((started, len(set(ids) - failed - unknown), len(failed | unknown)))
                    self._stop.wait(max(0.0, ROUND_S - (time.monotonic() - started)))
        except BaseException as exc:  # reported by stop()
            self.error = exc


def _final_count(settings: Settings) -> int:
    client = connect(settings)
    db = settings.clickhouse_database
    if not client.command(f"EXISTS TABLE `{db}`.feedback_events"):
        return 0
    return int(client.command(f"SELECT count() FROM `{db}`.feedback_events FINAL WHERE source = '{SOURCE}'"))


def _ids(settings: Settings, final: bool = True) -> Counter[str]:
    """The load's event ids in feedback_events (the gateway's probe has its own source)."""
    table = f"`{settings.clickhouse_database}`.feedback_events{' FINAL' if final else ''}"
    rows = connect(settings).query(f"SELECT event_id FROM {table} WHERE source = '{SOURCE}'")
    return Counter(r[0] for r in rows.result_rows)


def _jsonl(settings: Settings, *, allow_partial: bool = False) -> Counter[str]:
    """The load's event ids in the JSONL files, with how often each appears."""
    ids: Counter[str] = Counter()
    for path in sorted(settings.path.glob("feedback-*.jsonl*")):
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        if allow_partial:
            data = data[: data.rfind(b"\n") + 1]
        assert not data or data.endswith(b"\n"), f"partial last line in {path.name}"
        ids.update(row["event_id"] for row in map(orjson.loads, data.splitlines()) if row["source"] == SOURCE)
    return ids


def _extra(found: Counter[str]) -> int:
    return sum(n - 1 for n in found.values() if n > 1)


def _raw_ids(settings: Settings) -> set[str]:
    """Every event id on the raw topic (envelopes unpacked)."""
    serde = AvroSerde()
    ids: set[str] = set()
    for _, value in read_topic(settings, Topics(settings.topic_prefix).raw, timeout=60):
        if value is not None:
            ids.update(serde.decode(e)["event_id"] for e in (unpack(value) if is_envelope(value) else [value]))
    return ids


def _where_missing(settings: Settings, missing: set[str]) -> str:
    """Where acknowledged events missing from ClickHouse got to (for the failure message)."""
    return (
        f"{len(missing)} acknowledged events not in ClickHouse: {len(missing & _raw_ids(settings))} of them on "
        f"the raw topic, {len(missing & set(_jsonl(settings, allow_partial=True)))} in the JSONL files"
    )


def _pid(kafka: LocalKafka, node_id: int) -> int:
    pid = kafka.nodes[node_id - 1].process.pid()
    assert pid is not None, f"broker {node_id} is not running"
    return pid


def _leader_of(settings: Settings, topic: str, partition: int) -> int:
    metadata = AdminClient({"bootstrap.servers": settings.kafka_bootstrap}).list_topics(topic, timeout=10)
    return int(metadata.topics[topic].partitions[partition].leader)


def _sigkill(kafka: LocalKafka, node_id: int) -> None:
    """SIGKILL one broker by the PID its file records (never by name); reaped at once."""
    pid = _pid(kafka, node_id)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while kafka.nodes[node_id - 1].process.is_running() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    assert not kafka.nodes[node_id - 1].process.is_running(), f"broker {node_id} survived SIGKILL"


@pytest.fixture
def cluster(isolated: Settings, tmp_path: Path) -> Iterator[tuple[Settings, LocalKafka]]:
    """Three local brokers of their own (state folder, ports), the session's ClickHouse."""
    state = tmp_path / "state"
    (state / "kafka").mkdir(parents=True)
    (state / "kafka" / "libs").symlink_to(PROJECT_ROOT / ".local" / "kafka" / "libs")
    base = _free_block(6)
    settings = isolated.model_copy(
        update={
            "bootstrap_servers": None,
            "state_dir": state,
            "kafka_brokers": 3,
            "kafka_port": base,
            "kafka_controller_port": base + 1,
            "clickhouse_password": isolated.clickhouse_secret(),  # its file stays in the session's state folder
            "kafka_session_timeout_s": 10.0,
            "worker_metrics_port": 0,
            "rate_limit_per_minute": 1_000_000,
            "sink_batch_rows": 500,
            "sink_batch_ms": 100,
            "pseudonym_key": "failover-suite-key-0123",
            "internal_tokens": TOKEN,
            "gateway_publish_timeout_s": 5.0,
        }
    )
    kafka = LocalKafka(settings)
    kafka.start()
    try:
        yield settings, kafka
    finally:
        kafka.stop()


def test_three_brokers_lose_one_then_two_and_nothing_acknowledged_is_lost(
    cluster: tuple[Settings, LocalKafka], tmp_path: Path
) -> None:
    settings, kafka = cluster
    topics = Topics(settings.topic_prefix)
    assert [s.running for s in kafka.status()] == [True, True, True]
    ensure_topics(settings)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    wait_for(lambda: {topics.raw, topics.clean} <= set(admin.list_topics(timeout=10).topics), 30, "the topics")
    metadata = admin.list_topics(timeout=10)
    for name in (topics.raw, topics.clean):
        assert all(len(p.replicas) == 3 for p in metadata.topics[name].partitions.values()), name
        resource = ConfigResource(ResourceType.TOPIC, name)
        assert admin.describe_configs([resource])[resource].result(10)["min.insync.replicas"].value == "2"

    figures: dict[str, Any] = {"test": "three-broker failover"}
    logs = iter(range(100))
    with contextlib.ExitStack() as stack:

        def start(command: str) -> Any:
            return stack.enter_context(pipeline_process(settings, command, tmp_path / f"{command}-{next(logs)}.log"))

        procs = {"worker": start("worker"), "sink": start("sink")}
        load = Load(settings).start()
        wait_for(lambda: _final_count(settings) >= 4 * ROUND, 180, "the first events end to end", [*procs.values()])

        # 1. One broker down (the leader of the raw topic's partition 0): the pipeline carries on.
        first = _leader_of(settings, topics.raw, 0)
        at_kill = len(_jsonl(settings, allow_partial=True))
        clickhouse_at_kill = _final_count(settings)
        killed_at = time.monotonic()
        _sigkill(kafka, first)
        wait_for(lambda: load.acked_rounds_since(killed_at) >= 4, 120, "rounds acknowledged with one broker down",
                 [*procs.values()])  # fmt: skip
        acked_again = time.monotonic()
        wait_for(lambda: len(_jsonl(settings, allow_partial=True)) >= at_kill + 4 * ROUND, 180,
                 "events landing with one broker down", [*procs.values()])  # fmt: skip
        figures["one_down"] = {
            "broker": first,
            "acked_again_s": round(acked_again - killed_at, 1),
            "landing_again_s": round(time.monotonic() - killed_at, 1),
            "delivery_errors": load.failed_since(killed_at),
            "clickhouse_rows_since_kill": _final_count(settings) - clickhouse_at_kill,  # judged at the end
        }
        assert load.failed_since(killed_at) == 0, "one broker of three lost must cost no acknowledged write"

        # 2. A second broker down: below min.insync.replicas (and the controller quorum), writes fail.
        second = min(n.spec.node_id for n in kafka.nodes if n.spec.node_id != first)
        two_down_at = time.monotonic()
        _sigkill(kafka, second)
        with TestClient(create_gateway(settings)) as gateway:
            answer = gateway.post(
                "/internal/feedback",
                content=orjson.dumps({"source": "failover-gw", "type": "thumbs", "user_id": "u-gw",
                                      "payload": {"direction": "up"}, "idempotency_key": "gw-1"}),
                headers={"X-Internal-Token": TOKEN, "Content-Type": "application/json"},
            )  # fmt: skip
        assert answer.status_code == 503, answer.text
        assert int(answer.headers["Retry-After"]) >= 1
        wait_for(lambda: load.failed_since(two_down_at) >= ROUND, DELIVERY_TIMEOUT_MS / 1000 + 60,
                 "delivery errors with two brokers down")  # fmt: skip
        figures["two_down"] = {"broker": second, "gateway_status": answer.status_code}

        # 3. Both back: the pipeline recovers. A process Kafka failed for good (the worker exits 70
        # rather than acknowledge a batch it could not send) is restarted, as a supervisor would.
        restart_at = time.monotonic()
        kafka.start()
        figures["brokers_back_s"] = round(time.monotonic() - restart_at, 1)
        exits = {name: proc.poll() for name, proc in procs.items()}
        for name, code in exits.items():
            assert code in (None, EXIT_FATAL), f"{name} exited with {code}"
            if code is not None:
                procs[name] = start(name)
        figures["restarted_after_two_down"] = sorted(name for name, code in exits.items() if code is not None)
        wait_for(lambda: load.acked_rounds_since(restart_at) >= 4, 180, "rounds acknowledged after the restart",
                 [*procs.values()])  # fmt: skip
        figures["acked_again_after_restart_s"] = round(time.monotonic() - restart_at, 1)
        ledger = load.stop()

        # Drain: every acknowledged event lands (bounded). The JSONL files first: they must.
        settle_started = time.monotonic()
        wait_for(lambda: set(_jsonl(settings, allow_partial=True)) >= ledger.acked, 300,
                 "every acknowledged event in the JSONL files", [*procs.values()])  # fmt: skip
        figures["jsonl_drained_s"] = round(time.monotonic() - settle_started, 1)
        with contextlib.suppress(AssertionError):  # judged below, after the figures are printed
            wait_for(lambda: set(_ids(settings)) >= ledger.acked, 120, "ClickHouse", [*procs.values()])
        time.sleep(3.0)  # anything still in flight lands now, to be counted below
        figures["recover_s"] = round(time.monotonic() - restart_at, 1)

        final = _ids(settings)
        db = settings.clickhouse_database
        connect(settings).command(f"OPTIMIZE TABLE `{db}`.feedback_events FINAL")
        plain = _ids(settings, final=False)
        lines = _jsonl(settings)
        assert all(p.poll() is None for p in procs.values()), "a pipeline process died after the recovery"

    stores = {"clickhouse_final": final, "clickhouse_optimized": plain, "jsonl": lines}
    figures.update(
        {
            "produced": len(ledger.sent),
            "acknowledged": len(ledger.acked),
            "failed": len(ledger.failed),
            "unknown": len(ledger.unknown),
            "failed_but_landed": len((ledger.failed | ledger.unknown) & set(lines)),
            "lost_jsonl": len(ledger.acked - set(lines)),
            "missing_clickhouse": len(ledger.acked - set(final)),
            "duplicated": sum(_extra(found) for found in stores.values()),
            "rounds": len(ledger.rounds),
        }
    )
    print("fault_figures", orjson.dumps(figures).decode())
    assert figures["failed"] >= ROUND, "two brokers down must fail writes"
    for name, found in stores.items():
        assert set(found) <= ledger.sent, f"{name}: {len(set(found) - ledger.sent)} events never sent"
        assert _extra(found) == 0, f"{name}: {_extra(found)} duplicated"
    assert ledger.acked <= set(lines), f"jsonl: {len(ledger.acked - set(lines))} acknowledged events lost"
    assert ledger.acked <= set(final), _where_missing(settings, ledger.acked - set(final))
    assert ledger.acked <= set(plain), f"clickhouse_optimized: {len(ledger.acked - set(plain))} lost"

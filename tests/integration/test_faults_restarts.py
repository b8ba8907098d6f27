"""The fault suite, part two: a service under the pipeline SIGKILLed and started again.

* **the Kafka broker**: a private single broker (its own state folder and free ports, as
  ``feedback up`` runs it; ClickHouse is the session's) is SIGKILLed under the suite's steady
  load, with the worker and the sink running, and started again on the same ports and data;
* **the embedded ClickHouse**: a private chDB HTTP server (``pipeline/localstack.py``; Kafka is
  the session's) is SIGKILLed under the load and started again on the same data directory.

Both end with :func:`tests.integration.test_faults._reconcile`: every produced id in exactly the
places the rules say, in every store, and the rollups summing to the accepted events. While the
broker is away the load's client gets delivery errors: an item it was told failed is never
"accepted", but it may have reached the log (a send can time out on the client after the broker
wrote it), so it is counted as failed and must land once at most, where its kind says. The
broker test is marked ``slow`` (``make test-faults`` only); the ClickHouse one (under a minute)
is in ``make test``'s fast subset too.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.kafka_admin import ensure_topics
from pipeline.localstack import EmbeddedClickHouse, LocalKafka, ManagedProcess
from pipeline.settings import PROJECT_ROOT, Settings
from tests.integration.pipeline_procs import pipeline_process
from tests.integration.test_cluster_failover import _free_block
from tests.integration.test_faults import (
    EXIT_FATAL,
    MAX_ROUNDS,
    ROUND,
    Load,
    _clean_messages,
    _final_ids,
    _jsonl_distinct,
    _reconcile,
    _settings,
    _settle,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

DELIVERY_TIMEOUT_MS = 10_000  # shorter than a broker restart: rounds sent while it is away fail


def _sigkill(process: ManagedProcess) -> None:
    """SIGKILL a local service by the PID its file records (never by name); reaped at once."""
    pid = process.pid()
    assert pid is not None, f"{process.name} is not running"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process.is_running() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    assert not process.is_running(), f"{process.name} survived SIGKILL"


@pytest.fixture
def private_kafka(isolated: Settings, tmp_path: Path) -> Iterator[tuple[Settings, LocalKafka]]:
    """One local broker of its own (state folder, ports), the session's ClickHouse."""
    state = tmp_path / "state"
    (state / "kafka").mkdir(parents=True)
    (state / "kafka" / "libs").symlink_to(PROJECT_ROOT / ".local" / "kafka" / "libs")
    base = _free_block(2)
    settings = _settings(isolated).model_copy(
        update={
            "bootstrap_servers": None,
            "state_dir": state,
            "kafka_brokers": 1,
            "kafka_port": base,
            "kafka_controller_port": base + 1,
            "clickhouse_password": isolated.clickhouse_secret(),  # its file stays in the session's state folder
        }
    )
    kafka = LocalKafka(settings)
    kafka.start()
    try:
        yield settings, kafka
    finally:
        kafka.stop()


@pytest.fixture
def private_clickhouse(isolated: Settings, tmp_path: Path) -> Iterator[tuple[Settings, EmbeddedClickHouse]]:
    """An embedded ClickHouse of its own (data folder, port), the session's Kafka."""
    port = _free_block(1)
    settings = _settings(isolated).model_copy(
        update={
            "state_dir": tmp_path / "ch-state",
            "clickhouse_url": None,
            "clickhouse_port": port,
            "clickhouse_user": Settings.model_fields["clickhouse_user"].default,
            "clickhouse_password": None,  # generated in the private state folder
        }
    )
    clickhouse = EmbeddedClickHouse(settings)
    clickhouse.start()
    try:
        yield settings, clickhouse
    finally:
        clickhouse.stop()


class _Procs:
    """The worker and the sink as processes; one that exits 70 (Kafka refused for good: it stops
    rather than acknowledge what it could not send) is restarted, as a supervisor would, and named."""

    def __init__(self, stack: contextlib.ExitStack, settings: Settings, tmp_path: Path) -> None:
        self.stack, self.settings, self.tmp_path = stack, settings, tmp_path
        self.logs = iter(range(100))
        self.restarted: list[str] = []
        self.procs = {name: self._start(name) for name in ("worker", "sink")}

    def _start(self, name: str) -> subprocess.Popen[bytes]:
        log = self.tmp_path / f"{name}-{next(self.logs)}.log"
        return self.stack.enter_context(pipeline_process(self.settings, name, log))

    def all(self) -> list[subprocess.Popen[bytes]]:
        return list(self.procs.values())

    def supervise(self) -> None:
        for name, proc in self.procs.items():
            code = proc.poll()
            assert code in (None, EXIT_FATAL), f"{name} exited with {code}"
            if code is not None:
                self.procs[name] = self._start(name)
                self.restarted.append(name)

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """:func:`wait_for`, restarting a process that exited 70 (bounded: 100 log names)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
            self.supervise()
            time.sleep(0.5)


def _progress_then(procs: _Procs, moved: Callable[[], int], rng: random.Random) -> None:
    """Wait until ``moved`` grows by a round (the pipeline is busy), then a seeded pause: the
    fault lands inside a batch, or between two."""
    before = moved()
    procs.wait(lambda: moved() >= before + ROUND, 180, "progress before the fault")
    time.sleep(rng.uniform(0.0, 1.5))


@pytest.mark.slow
def test_the_broker_sigkilled_and_restarted(private_kafka: tuple[Settings, LocalKafka], tmp_path: Path) -> None:
    """The single broker SIGKILLed under load and started again on its ports and data: the
    producers get errors meanwhile, the worker and sink carry on, and every store reconciles."""
    settings, kafka = private_kafka
    ensure_topics(settings)
    rng = random.Random(41)
    figures: dict[str, Any] = {"test": "broker restart"}
    with contextlib.ExitStack() as stack:
        procs = _Procs(stack, settings, tmp_path)
        load = Load(settings, seed=41, delivery_timeout_ms=DELIVERY_TIMEOUT_MS).start()
        procs.wait(lambda: _jsonl_distinct(settings) >= ROUND, 180, "the first events end to end")
        _progress_then(procs, lambda: _jsonl_distinct(settings), rng)

        killed_at = time.monotonic()
        _sigkill(kafka.nodes[0].process)
        at_kill = _jsonl_distinct(settings)
        time.sleep(rng.uniform(3.0, 6.0))  # away long enough for every client to notice
        kafka.start()  # the same ports and data folder
        figures["broker_down_s"] = round(time.monotonic() - killed_at, 1)
        acked_at_back = len(load.produced.accepted)
        procs.wait(lambda: _jsonl_distinct(settings) >= at_kill + ROUND, 240, "events landing after the restart")
        figures["recover_s"] = round(time.monotonic() - killed_at, 1)
        procs.wait(lambda: len(load.produced.accepted) >= acked_at_back + 4 * ROUND, 120, "rounds acknowledged again")
        produced = load.stop()
        assert load.rounds < MAX_ROUNDS, "the load ended before the restart was over: it proved nothing"
        figures["settle_s"] = round(_settle(settings, produced, procs.all()), 1)
        figures.update(_reconcile(settings, produced, procs.all()))
        procs.supervise()
        figures["restarted_exit_70"] = procs.restarted
        figures["clean_messages_resent"] = _clean_messages(settings) - figures["accepted_landed"]
    print("fault_figures", orjson.dumps(figures).decode())
    assert figures["lost"] == 0 and figures["duplicated"] == 0


def test_the_embedded_clickhouse_sigkilled_and_restarted(
    private_clickhouse: tuple[Settings, EmbeddedClickHouse], tmp_path: Path
) -> None:
    """The chDB HTTP server SIGKILLed under load and started again on its data directory: the
    ClickHouse sinks retry, nothing is lost or stored twice (feedback_events FINAL and after
    OPTIMIZE, rejected_events, dlq_events, the rollups)."""
    settings, clickhouse = private_clickhouse
    ensure_topics(settings)
    rng = random.Random(42)
    figures: dict[str, Any] = {"test": "clickhouse restart"}

    def in_clickhouse() -> int:
        with contextlib.suppress(Exception):  # away: no progress
            return len(_final_ids(settings, "feedback_events"))
        return 0

    with contextlib.ExitStack() as stack:
        procs = _Procs(stack, settings, tmp_path)
        load = Load(settings, seed=42).start()
        procs.wait(lambda: in_clickhouse() >= ROUND, 180, "the first events in ClickHouse")
        _progress_then(procs, in_clickhouse, rng)

        before_kill = in_clickhouse()
        killed_at = time.monotonic()
        _sigkill(clickhouse.process)
        jsonl_at_kill = _jsonl_distinct(settings)
        time.sleep(rng.uniform(3.0, 6.0))  # the sinks retry with backoff; events keep arriving
        procs.wait(lambda: _jsonl_distinct(settings) >= jsonl_at_kill + ROUND, 120, "the JSONL sink meanwhile")
        clickhouse.start()  # the same port and data folder
        figures["clickhouse_down_s"] = round(time.monotonic() - killed_at, 1)
        procs.wait(lambda: in_clickhouse() >= before_kill + ROUND, 240, "rows inserted after the restart")
        figures["recover_s"] = round(time.monotonic() - killed_at, 1)
        time.sleep(2.0)  # a few more rounds with ClickHouse back
        produced = load.stop()
        assert load.rounds < MAX_ROUNDS, "the load ended before the restart was over: it proved nothing"
        figures["settle_s"] = round(_settle(settings, produced, procs.all()), 1)
        figures.update(_reconcile(settings, produced, procs.all()))
        procs.supervise()
        assert not procs.restarted, f"{procs.restarted} exited 70 with only ClickHouse away"
    print("fault_figures", orjson.dumps(figures).decode())
    assert figures["lost"] == 0 and figures["duplicated"] == 0

"""The local stack's lifecycle: idempotent start, status, stop by PID, data kept across restarts."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.errors import StackError
from pipeline.localstack import EmbeddedClickHouse, LocalStack
from pipeline.settings import PROJECT_ROOT, Settings
from tests.conftest import _free_port

pytestmark = pytest.mark.integration


def _settings(tmp_path: Path) -> Settings:
    (tmp_path / "kafka").mkdir(parents=True)
    (tmp_path / "kafka" / "libs").symlink_to(PROJECT_ROOT / ".local" / "kafka" / "libs")
    return Settings(
        state_dir=tmp_path, kafka_port=_free_port(), kafka_controller_port=_free_port(), clickhouse_port=_free_port()
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_up_status_down_and_restart_keeps_data(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    stack = LocalStack(settings)
    stack.up()
    try:
        kafka, clickhouse = stack.status()
        assert kafka.running and clickhouse.running
        first_pids = (kafka.pid, clickhouse.pid)
        stack.up()  # idempotent: same processes
        assert tuple(s.pid for s in stack.status()) == first_pids

        admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
        admin.create_topics([NewTopic("kept", num_partitions=1, replication_factor=1)])["kept"].result(30)
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all"})
        producer.produce("kept", b"hello")
        assert producer.flush(30) == 0
        with urllib.request.urlopen(f"{settings.clickhouse_endpoint}/ping", timeout=5) as r:
            assert r.read() == b"Ok.\n"

        stack.down()
        assert not any(s.running for s in stack.status())
        assert not any(_alive(pid) for pid in first_pids if pid)
        stack.down()  # idempotent

        stack.up()
        consumer = Consumer(
            {"bootstrap.servers": settings.kafka_bootstrap, "group.id": "g", "auto.offset.reset": "earliest"}
        )
        consumer.subscribe(["kept"])
        values = []
        for _ in range(30):
            values += [m.value() for m in consumer.consume(10, timeout=1.0) if m.error() is None]
            if values:
                break
        consumer.close()
        assert values == [b"hello"]
    finally:
        stack.down()


def test_clickhouse_port_taken_names_the_setting(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        settings = Settings(state_dir=tmp_path, clickhouse_port=s.getsockname()[1])
        with pytest.raises(StackError, match="FEEDBACK_CLICKHOUSE_PORT"):
            EmbeddedClickHouse(settings).start()

"""Session fixtures: the real services the integration tests run against.

Where they come from, in order:
1. ``FEEDBACK_TEST_BOOTSTRAP_SERVERS`` (and optionally ``FEEDBACK_TEST_CLICKHOUSE_URL``):
   an existing cluster;
2. a reachable Docker engine: testcontainers' Kafka and ClickHouse containers;
3. otherwise the project's local stack (real Kafka KRaft from the Maven jars and the
   embedded chDB ClickHouse server), started in a temporary folder on free ports.

Integration tests never skip: if the services cannot start, they fail. Under CI
(``CI=true``) any skipped test fails the run, so nothing is silently left out.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.settings import PROJECT_ROOT, Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings pointing at running Kafka and ClickHouse for the whole session."""
    state = tmp_path_factory.mktemp("stack")
    bootstrap = os.environ.get("FEEDBACK_TEST_BOOTSTRAP_SERVERS")
    if bootstrap:
        yield Settings(
            bootstrap_servers=bootstrap,
            clickhouse_url=os.environ.get("FEEDBACK_TEST_CLICKHOUSE_URL"),
            clickhouse_port=_free_port(),
            state_dir=state,
        )
        return
    if _docker_available():
        yield from _containers(state)
        return
    yield from _local_stack(state)


def _local_stack(state: Path) -> Iterator[Settings]:
    from pipeline.localstack import LocalStack

    # Share the jars the Makefile fetched instead of downloading them per session.
    libs = PROJECT_ROOT / ".local" / "kafka" / "libs"
    (state / "kafka").mkdir(parents=True, exist_ok=True)
    if libs.is_dir():
        (state / "kafka" / "libs").symlink_to(libs)
    settings = Settings(
        state_dir=state,
        kafka_port=_free_port(),
        kafka_controller_port=_free_port(),
        clickhouse_port=_free_port(),
    )
    stack = LocalStack(settings)
    stack.up()
    try:
        yield settings
    finally:
        stack.down()


def _containers(state: Path) -> Iterator[Settings]:  # pragma: no cover - needs a Docker engine
    from testcontainers.clickhouse import ClickHouseContainer
    from testcontainers.kafka import KafkaContainer

    with KafkaContainer().with_kraft() as kafka, ClickHouseContainer() as clickhouse:
        url = f"http://{clickhouse.get_container_host_ip()}:{clickhouse.get_exposed_port(8123)}"
        yield Settings(
            bootstrap_servers=kafka.get_bootstrap_server(),
            clickhouse_url=url,
            clickhouse_user=clickhouse.username,
            clickhouse_password=clickhouse.password,
            state_dir=state,
        )


@pytest.fixture
def isolated(stack_settings: Settings, tmp_path: Path) -> Settings:
    """Per-test settings: unique topics, ClickHouse database, JSONL folder and groups."""
    tag = uuid.uuid4().hex[:10]
    return stack_settings.model_copy(
        update={
            "topic_prefix": f"t{tag}.",
            "clickhouse_database": f"t_{tag}",
            "path": tmp_path / "jsonl",
            "sink_group": f"t{tag}-sink",
            "topic_partitions": 3,
        }
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI, a skipped test is a failure: integration tests must really run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if os.environ.get("CI") and skipped and exitstatus == 0:
        reporter.write_line(f"CI: {skipped} test(s) skipped; failing the run (integration tests must run)", red=True)
        session.exitstatus = 1

"""Shared benchmark plumbing: a private local stack on free ports, and result files."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import orjson

from pipeline.localstack import LocalStack
from pipeline.settings import PROJECT_ROOT, Settings

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stack(state: Path, **settings: Any) -> tuple[LocalStack, Settings]:
    """Kafka + embedded ClickHouse under ``state`` on free ports, started; the caller stops it."""
    libs = PROJECT_ROOT / ".local" / "kafka" / "libs"
    (state / "kafka").mkdir(parents=True)
    if libs.is_dir():
        (state / "kafka" / "libs").symlink_to(libs)
    configured = Settings(
        state_dir=state,
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        clickhouse_port=free_port(),
        path=state / "jsonl",
        log_level="WARNING",
        **settings,
    )
    local = LocalStack(configured)
    try:
        local.up()
    except BaseException:  # a service that failed to start must not leave the others running
        local.down()
        raise
    return local, configured


def record_result(name: str, result: dict[str, Any]) -> None:
    """Append ``result`` to ``benchmarks/results/<name>.jsonl`` and print it."""
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / f"{name}.jsonl").open("ab") as fh:
        fh.write(orjson.dumps(result) + b"\n")
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())

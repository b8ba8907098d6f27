"""Baseline: the least a Faust agent does per event, run as its own process.

One agent reads the raw topic in batches (``stream.take_events(1000, within=0.2 s)``, as the
worker's agents do) and forwards each event with one ``await topic.send(value=...)`` to an
output topic: no decoding, no tables, no other topics. An envelope (many events in one
message, ``schemas.envelope``) is opened and each of its events sent on its own, since the
worker too decides and publishes every event by itself. Whatever the worker does beyond
this is the cost of its rules, state and outputs.

Configured by environment (``feedback bench`` starts it): ``BENCH_BOOTSTRAP``,
``BENCH_SOURCE``, ``BENCH_TARGET``, ``BENCH_APP_ID``, ``BENCH_DATADIR``, ``BENCH_PARTITIONS``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import faust

BATCH = 1000
WITHIN_S = 0.2
BUFFER = 65_536  # stream_buffer_maxsize: generous, so the consumer never waits for the agent's buffer


def splitter() -> Callable[[bytes | None], list[bytes]]:
    """value → the event values it carries (itself, or an envelope's items)."""
    try:
        from schemas.envelope import is_envelope, unpack
    except ImportError:  # a tree without envelopes: every message is one event
        return lambda value: [] if value is None else [value]

    def split(value: bytes | None) -> list[bytes]:
        if value is None:
            return []
        return unpack(value) if is_envelope(value) else [value]

    return split


def build(bootstrap: str, source: str, target: str, app_id: str, datadir: str, partitions: int) -> faust.App:
    app = faust.App(
        app_id,
        broker=[f"kafka://{s.strip()}" for s in bootstrap.split(",") if s.strip()],
        value_serializer="raw",
        key_serializer="raw",
        topic_partitions=partitions,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        web_enabled=False,
        datadir=datadir,
        stream_buffer_maxsize=BUFFER,
    )
    src = app.topic(source, value_serializer="raw", key_serializer="raw")
    out = app.topic(target, value_serializer="raw", key_serializer="raw")
    split = splitter()

    @app.agent(src, name="passthrough")
    async def passthrough(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(BATCH, within=WITHIN_S):
            for event in batch:
                for value in split(event.message.value):
                    await out.send(value=value)

    return app


def main() -> None:
    env = os.environ
    Path(env["BENCH_DATADIR"]).parent.mkdir(parents=True, exist_ok=True)
    app = build(env["BENCH_BOOTSTRAP"], env["BENCH_SOURCE"], env["BENCH_TARGET"], env["BENCH_APP_ID"],
                env["BENCH_DATADIR"], int(env.get("BENCH_PARTITIONS", "6")))  # fmt: skip
    faust.Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main()

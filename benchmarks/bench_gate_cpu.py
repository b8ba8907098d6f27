"""CPU per event of the worker's agents in-process, without Kafka: ``python -m benchmarks.bench_gate_cpu``.

The benchmark's event mix (:mod:`benchmarks.workload`) is encoded as the client's bulk path
encodes it, packed into envelopes of 500, and handed to the gate's batch handler
(``FeedbackApp.handlers["gate"]``) as Faust would hand it; its outputs are captured in memory
and the tables use the memory store. The gate's own outputs then go through the agents
downstream of it (reputation, bias, triage, and whatever else consumes the gate's topics).

What it measures is the CPU time (``time.process_time``) of this process per event: the
Python work of the worker's agents, which is what a worker's throughput on one core rests on,
without the broker, librdkafka's threads or Faust's consumer. It is not a throughput figure
(``feedback bench --stages worker`` is), but it barely moves with the machine's load, so it
can compare two versions of the code on a busy machine. A ``--profile`` file (cProfile) says
where the time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from benchmarks import workload
from pipeline.settings import Settings
from schemas.bulk import BulkEncoder
from schemas.envelope import pack_many
from schemas.serde import AvroSerde
from schemas.topics import Topics
from stream_processors.app import create_app
from stream_processors.outputs import CapturedOutputs

__all__ = ["measure"]


def _events(topic: str, values: list[tuple[bytes, bytes]], first_offset: int, ts: float) -> list[Any]:
    """Faust-like events: what the batch handlers read of one (``event.message.*``)."""
    message = SimpleNamespace
    return [
        SimpleNamespace(
            message=message(topic=topic, partition=0, offset=first_offset + i, key=k, value=v, timestamp=ts)
        )
        for i, (k, v) in enumerate(values)
    ]


def _raise(exc: BaseException) -> None:
    """A batch that fails as a whole fails the measurement (the worker would stop)."""
    raise exc


def measure(n: int = 50_000, *, envelope: int = 500, seed: int = 3) -> dict[str, Any]:
    """CPU µs per event for the gate alone and for the agents downstream of it."""
    with tempfile.TemporaryDirectory(prefix="gate-cpu-") as tmp:
        settings = Settings(
            table_store="memory", state_dir=Path(tmp), pseudonym_key="bench-gate-cpu-key", worker_metrics_port=0,
            rate_limit_per_minute=1e9, bias_publish_interval_s=3600.0,
        )  # fmt: skip
        outputs = CapturedOutputs()
        fa = create_app(settings, outputs=outputs, on_fatal=_raise)
        fa.app.finalize()
        topics = Topics(settings.topic_prefix)
        encoder = BulkEncoder(AvroSerde())
        accepted = encoder.encode(list(workload.events(n, seed=seed)), defaults={"source": "bench"})
        values = [a.value for a in accepted]  # type: ignore[union-attr]
        envelopes = [(b"k", env) for env, _ in pack_many_of(values, envelope)]
        batch = _events(topics.raw, envelopes, 0, time.time())
        gate = fa.handlers["gate"]
        began = time.process_time()
        for at in range(0, len(batch), 2):  # two envelopes (1,000 events) a batch, as a busy worker takes them
            gate(batch[at : at + 2])
        gate_s = time.process_time() - began
        sent = {t: [(k, v) for k, v, _ in msgs] for t, msgs in outputs.sent.items()}
        downstream: dict[str, float] = {}
        for agent, topic in (("reputation", topics.outcomes), ("bias", topics.bias_input),
                             ("triage", topics.triage_commands), ("enrich", topics.enrich)):  # fmt: skip
            handler = fa.handlers.get(agent)
            messages = sent.get(topic, [])
            if handler is None or not messages:
                continue
            began = time.process_time()
            events = _events(topic, messages, 0, time.time())
            for at in range(0, len(events), 1000):
                handler(events[at : at + 1000])
            downstream[agent] = round((time.process_time() - began) * 1e6 / n, 2)
        return {
            "events": n,
            "gate_cpu_us_per_event": round(gate_s * 1e6 / n, 2),
            "downstream_cpu_us_per_event": downstream,
            "clean_messages": len(sent.get(topics.clean, [])),
            "enrich_messages": len(sent.get(topics.enrich, [])),
        }


def pack_many_of(values: list[bytes], size: int) -> list[tuple[bytes, int]]:
    """Envelopes of at most ``size`` events, as ``emit_many`` sends them per partition."""
    out: list[tuple[bytes, int]] = []
    for at in range(0, len(values), size):
        out.extend(pack_many(values[at : at + size]))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=50_000)
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    p.add_argument("--profile", type=Path, help="write a cProfile of one run here")
    args = p.parse_args(argv)
    if args.profile:
        cProfile.runctx("measure(args.events)", globals(), {"args": args, "measure": measure}, str(args.profile))
    runs = [measure(args.events) for _ in range(args.repeat)]
    best = min(runs, key=lambda r: r["gate_cpu_us_per_event"])
    sys.stdout.write(json.dumps({**best, "gate_runs": [r["gate_cpu_us_per_event"] for r in runs]}) + "\n")


if __name__ == "__main__":
    main()

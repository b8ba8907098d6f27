"""Every example in examples/ runs against the real stack."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Producer

from pipeline.kafka_admin import ensure_topics, topic_message_counts
from pipeline.settings import PROJECT_ROOT, Settings
from schemas.state_records import BiasRecord, encode_record
from schemas.topics import Topics
from tests.conftest import _free_port
from tests.integration.pipeline_procs import pipeline_process

pytestmark = pytest.mark.integration

EXAMPLES = PROJECT_ROOT / "examples"


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {**os.environ, **settings.to_env(), "PYTHONPATH": str(PROJECT_ROOT), **extra}


def test_emit_feedback_example_publishes_acknowledged_events(isolated: Settings) -> None:
    ensure_topics(isolated)
    out = subprocess.run([sys.executable, str(EXAMPLES / "emit_feedback.py")], env=_env(isolated),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 8 and lines[-1].startswith("regret_signal")
    raw = Topics(isolated.topic_prefix).raw
    assert topic_message_counts(isolated, [raw])[raw] == 8


def test_steer_model_example_follows_directive_bias(isolated: Settings) -> None:
    ensure_topics(isolated)
    topic = Topics(isolated.topic_prefix).directive_bias
    producer = Producer({"bootstrap.servers": isolated.kafka_bootstrap})
    now = time.time()
    for record in (BiasRecord("increase_grounding", None, 0.8, now, 3600.0, 9),
                   BiasRecord("reduce_novelty", None, 0.5, now, 3600.0, 4)):  # fmt: skip
        producer.produce(topic, key=record.key.encode(), value=encode_record(record))
    assert producer.flush(30) == 0
    out = subprocess.run([sys.executable, str(EXAMPLES / "steer_model.py"), "--max-seconds", "2"],
                         env=_env(isolated), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert first == "temperature=0.63 grounding=True strict_safety=False"


def test_gateway_curl_session(isolated: Settings, tmp_path: Path) -> None:
    ensure_topics(isolated)
    port = _free_port()
    token = "example-token-0123456789-abcdefghijk"
    settings = isolated.model_copy(update={"internal_tokens": token, "gateway_port": port})
    with pipeline_process(settings, "serve", tmp_path / "gateway.log") as gateway:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert gateway.poll() is None and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.2)
        out = subprocess.run(["sh", str(EXAMPLES / "gateway_session.sh")], capture_output=True, text=True, timeout=60,
                             env=_env(settings, GATEWAY_URL=f"http://127.0.0.1:{port}", TOKEN=token))  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines())
    assert '"ready"' in lines["ready"]
    assert lines["single"].strip().startswith("202")
    assert lines["batch"].strip().startswith("207") and '"status":422' in lines["batch"]
    assert lines["invalid"].strip().startswith("422") and lines["no auth"].strip().startswith("401")

"""The real gateway (``feedback serve``, real Kafka) under hostile requests: a field over the
gate's size limit is refused before redaction, a request with much to redact does not hold
up /healthz, a body's ``client_ip`` counts only from a trusted proxy, short tokens refuse to
start."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings
from schemas.envelope import is_envelope, unpack
from schemas.serde import AvroSerde
from schemas.topics import Topics
from tests.conftest import _free_port
from tests.integration.kafka_read import read_topic

pytestmark = pytest.mark.integration

TOKEN = "limits-token-0123456789-abcdefghijklmnop"
HEADERS = {"X-Internal-Token": TOKEN, "Content-Type": "application/json"}
EVENT = {"source": "dream_ui", "type": "thumbs", "payload": {"direction": "up"}}
PROXY = "127.0.0.2"  # a loopback address of its own: requests sent from it come from the "proxy"


def _start(settings: Settings, tmp_path: Path, **env: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = _free_port()
    log_path = tmp_path / f"gateway-{port}.log"
    full_env = {**os.environ, **settings.to_env(), **env}
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}", log_path


@pytest.fixture
def served(isolated: Settings, tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    settings = isolated.model_copy(update={"internal_tokens": TOKEN, "rate_limit_per_minute": 1e6})
    ensure_topics(settings)
    proc, base, log_path = _start(settings, tmp_path, FEEDBACK_TRUSTED_PROXIES=PROXY)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield base, settings
    finally:
        proc.terminate()
        proc.wait(30)


def _raw(settings: Settings) -> list[tuple[bytes | None, dict[str, object]]]:
    serde = AvroSerde()
    out = []
    for key, value in read_topic(settings, Topics(settings.topic_prefix).raw):
        assert value is not None
        for item in unpack(value) if is_envelope(value) else [value]:
            out.append((key, serde.decode(item)))
    return out


def test_an_oversized_field_is_refused_and_a_slow_batch_does_not_stall_healthz(served: tuple[str, Settings]) -> None:
    base, settings = served
    hostile = "a." * 60_000 + "@"  # 120 KB, the quadratic input
    # Under the size limits but slow to redact: 300 events of 30 KB of adversarial text (seconds of work).
    units = ["a.", "1 ", "a dot a at "]
    heavy = [
        {**EVENT, "user_id": f"h-{i}", "payload": {"comment": (units[i % 3] * 15_000)[:30_000] + "@"}}
        for i in range(300)
    ]

    async def run() -> tuple[httpx.Response, float, httpx.Response, list[float], float]:
        async with httpx.AsyncClient(base_url=base, headers=HEADERS, timeout=120) as http:
            start = time.monotonic()
            batch = asyncio.create_task(http.post("/internal/feedback/batch", content=orjson.dumps(heavy)))
            await asyncio.sleep(0.3)  # the batch is in and being redacted
            sent = time.monotonic()
            refused = await http.post("/internal/feedback", content=orjson.dumps(
                {**EVENT, "user_id": "x", "payload": {"comment": hostile}}))  # fmt: skip
            refused_s = time.monotonic() - sent
            waits: list[float] = []
            for _ in range(100):  # bounded: at most 100 probes
                probe = time.monotonic()
                assert (await http.get("/healthz")).status_code == 200
                waits.append(time.monotonic() - probe)
                if batch.done():
                    break
                await asyncio.sleep(0.05)
            answer = await batch
            return refused, refused_s, answer, waits, time.monotonic() - start

    refused, refused_s, batch, waits, batch_s = asyncio.run(run())
    assert refused.status_code == 422
    assert refused.json()["problems"] == [{"field": "payload.comment", "rule": "longer than 32768 characters"}]
    assert batch.status_code == 207 and [r["status"] for r in batch.json()["results"]] == [202] * 300
    # Not vacuous: the batch took long, and /healthz and the refusal were answered meanwhile.
    assert batch_s > 1.5, batch_s
    # Redacted on the event loop, the first probe waited for the whole batch (4 s here); in a
    # thread, probes take ~50 ms, and a rare one up to ~1 s while the machine is busy.
    assert len(waits) > 3 and max(waits) < min(3.0, batch_s / 2), (waits, batch_s)
    assert refused_s < min(3.0, batch_s / 2), (refused_s, batch_s)
    landed = [record for _, record in _raw(settings)]
    assert len(landed) == 300 and all(r["user_id"] != "x" for r in landed)  # the refused event never reached Kafka


def test_client_ip_in_the_body_counts_only_from_a_trusted_proxy(served: tuple[str, Settings]) -> None:
    base, settings = served
    spoof = {**EVENT, "user_id": None, "client_ip": "203.0.113.77"}
    direct = httpx.post(f"{base}/internal/feedback", content=orjson.dumps(spoof), headers=HEADERS, timeout=30)
    assert direct.status_code == 202
    transport = httpx.HTTPTransport(local_address=PROXY)
    with httpx.Client(transport=transport, timeout=30) as via_proxy:
        proxied = via_proxy.post(f"{base}/internal/feedback", content=orjson.dumps(spoof), headers=HEADERS)
        assert proxied.status_code == 202
        bare = via_proxy.post(f"{base}/internal/feedback", content=orjson.dumps({**EVENT}), headers=HEADERS)
        assert bare.status_code == 202
    by_id = {record["event_id"]: (key, record["client_ip"]) for key, record in _raw(settings)}
    assert by_id[direct.json()["event_id"]] == (b"127.0.0.1", "127.0.0.1")  # the peer, not the body
    assert by_id[proxied.json()["event_id"]] == (b"203.0.113.77", "203.0.113.77")  # the proxy's word
    assert by_id[bare.json()["event_id"]] == (PROXY.encode(), PROXY)  # a proxy naming nobody: its own address


def test_a_short_token_refuses_to_start(isolated: Settings, tmp_path: Path) -> None:
    settings = isolated.model_copy(update={"internal_tokens": f"{TOKEN},short-token-0123456789"})
    proc, _, log_path = _start(settings, tmp_path)
    try:
        assert proc.wait(60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = log_path.read_text()
    assert "FEEDBACK_INTERNAL_TOKENS" in log and "at least 32 characters" in log and "token 2 of 2" in log
    assert "short-token-0123456789" not in log  # the error never shows a token

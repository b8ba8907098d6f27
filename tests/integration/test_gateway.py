"""The HTTP gateway against the real broker: every status code, redaction before Kafka, batches."""

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
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigError
from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings
from producers.gateway import MAX_DEPTH, _Redactor, _too_deep, create_gateway
from producers.producer import AsyncProducer, partition_for
from schemas.envelope import is_envelope, unpack
from schemas.serde import AvroSerde
from schemas.topics import Topics
from stream_processors.redact import redact_payload
from tests.conftest import _free_port
from tests.integration.kafka_read import read_partitions, read_topic

pytestmark = pytest.mark.integration

TOKENS = "old-token-0123456789-abcdefghijklmnop,new-token-9876543210-zyxwvutsrqponm"
AUTH = {"X-Internal-Token": "new-token-9876543210-zyxwvutsrqponm", "Content-Type": "application/json"}
EVENT = {"source": "dream_ui", "type": "thumbs", "user_id": "u-1", "payload": {"direction": "up"}}


@pytest.fixture
def gateway(isolated: Settings) -> Iterator[tuple[TestClient, Settings]]:
    settings = isolated.model_copy(update={"internal_tokens": TOKENS, "rate_limit_per_minute": 5.0})
    ensure_topics(settings)
    with TestClient(create_gateway(settings)) as client:
        yield client, settings


def _values(value: bytes | None) -> list[bytes]:
    """The event values of one raw message: an envelope's (batches), or the message's own."""
    assert value is not None
    return unpack(value) if is_envelope(value) else [value]


def _raw(settings: Settings) -> list[dict[str, object]]:
    serde = AvroSerde()
    return [serde.decode(e) for _, v in read_topic(settings, Topics(settings.topic_prefix).raw) for e in _values(v)]


@pytest.fixture
def warm_gateway(isolated: Settings) -> Iterator[tuple[TestClient, Settings]]:
    """A gateway whose publisher already knows the raw topic's partition count (so its very
    first batch goes in envelopes; a fresh one sends single-event messages until it knows)."""
    settings = isolated.model_copy(update={"internal_tokens": TOKENS, "rate_limit_per_minute": 1e6})
    ensure_topics(settings)
    publisher = AsyncProducer(settings, settings.gateway_publish_timeout_s, "feedback-gateway")
    try:
        deadline = time.monotonic() + 20
        while publisher._partitions.get() is None:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the publisher never learnt the partition count"
            time.sleep(0.05)
        with TestClient(create_gateway(settings, publisher=publisher)) as client:
            yield client, settings
    finally:
        publisher.close()


def test_accepts_after_kafka_acknowledges_and_redacts_first(gateway: tuple[TestClient, Settings]) -> None:
    client, settings = gateway
    body = {
        **EVENT,
        "payload": {"direction": "down", "comment": "mail me at jane@example.com", "ref": "+1 415 555 0100"},
    }
    resp = client.post("/internal/feedback", content=orjson.dumps(body), headers=AUTH)
    assert resp.status_code == 202, resp.text
    answer = resp.json()
    (record,) = _raw(settings)
    assert record["event_id"] == answer["event_id"] and record["hash"] == answer["hash"]
    assert record["payload"]["comment"] == "mail me at [EMAIL]" and record["payload"]["extra"]["ref"] == "[PHONE]"
    assert record["client_ip"] == "testclient"
    old = {**AUTH, "X-Internal-Token": "old-token-0123456789-abcdefghijklmnop"}  # both tokens work during rotation
    assert (
        client.post("/internal/feedback", content=orjson.dumps({**EVENT, "user_id": "u-2"}), headers=old).status_code
        == 202
    )


@pytest.mark.parametrize("headers", [{}, {"X-Internal-Token": "wrong"}, {"X-Internal-Token": ""}])
def test_missing_or_wrong_token_is_401_revealing_nothing(
    gateway: tuple[TestClient, Settings], headers: dict[str, str]
) -> None:
    client, _ = gateway
    resp = client.post(
        "/internal/feedback", content=orjson.dumps(EVENT), headers={"Content-Type": "application/json", **headers}
    )
    assert resp.status_code == 401 and resp.json() == {"error": "unauthorized"}


def test_content_type_size_and_validation(gateway: tuple[TestClient, Settings]) -> None:
    client, settings = gateway
    assert (
        client.post(
            "/internal/feedback", content=b"source=x", headers={**AUTH, "Content-Type": "text/plain"}
        ).status_code
        == 415
    )
    huge = orjson.dumps({**EVENT, "payload": {"comment": "x" * (settings.gateway_max_body_bytes + 10)}})
    assert client.post("/internal/feedback", content=huge, headers=AUTH).status_code == 413
    bad = {**EVENT, "severity": "apocalyptic", "type": 7, "payload": {"stars": "many"}}
    resp = client.post("/internal/feedback", content=orjson.dumps(bad), headers=AUTH)
    assert resp.status_code == 422
    fields = {p["field"] for p in resp.json()["problems"]}
    assert {"severity", "type"} <= fields and "apocalyptic" not in resp.text  # named, not echoed
    for nasty in (b"{", b'{"source": NaN}', b"\xff\xfe{}", b"[]", b"null", b'"x"', b"[" * 100 + b"]" * 100,
                  orjson.dumps({**EVENT, "payload": {"a": {"b": {"c": 1}}}})):  # fmt: skip
        resp = client.post("/internal/feedback", content=nasty, headers=AUTH)
        assert resp.status_code == 422, (nasty[:20], resp.status_code)
    assert _raw(settings) == []  # nothing invalid was published


def test_rate_limit_is_429_with_retry_after(gateway: tuple[TestClient, Settings]) -> None:
    client, _ = gateway
    codes = [client.post("/internal/feedback", content=orjson.dumps(EVENT), headers=AUTH) for _ in range(7)]
    assert [r.status_code for r in codes] == [202] * 5 + [429] * 2
    assert int(codes[-1].headers["Retry-After"]) >= 1
    metrics = client.get("/metrics").text
    assert "feedback_rate_limited_total 2.0" in metrics


def test_batch_is_207_with_a_status_per_item(gateway: tuple[TestClient, Settings]) -> None:
    client, settings = gateway
    items = [{**EVENT, "user_id": f"b-{i}"} for i in range(3)] + [{"source": "x"}, "not an object"]
    resp = client.post("/internal/feedback/batch", content=orjson.dumps({"events": items}), headers=AUTH)
    assert resp.status_code == 207
    results = resp.json()["results"]
    assert [r["status"] for r in results] == [202, 202, 202, 422, 422]
    assert results[3]["problems"][0]["field"] == "events.3.type"
    assert {r["event_id"] for r in _raw(settings)} == {r["event_id"] for r in results[:3]}
    too_many = orjson.dumps([EVENT] * (settings.gateway_max_batch + 1))
    assert client.post("/internal/feedback/batch", content=too_many, headers=AUTH).status_code == 413


def test_health_readiness_docs(gateway: tuple[TestClient, Settings]) -> None:
    client, _ = gateway
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert "/internal/feedback" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_kafka_unavailable_is_503_with_retry_after(isolated: Settings) -> None:
    broken = isolated.model_copy(
        update={"internal_tokens": TOKENS, "bootstrap_servers": "127.0.0.1:1", "gateway_publish_timeout_s": 1.5}
    )
    with TestClient(create_gateway(broken)) as client:
        resp = client.post("/internal/feedback", content=orjson.dumps(EVENT), headers=AUTH)
        assert resp.status_code == 503 and int(resp.headers["Retry-After"]) >= 1
        assert client.get("/readyz").status_code == 503


def test_no_token_configured_refuses_to_start(isolated: Settings) -> None:
    with pytest.raises(ConfigError, match="FEEDBACK_INTERNAL_TOKENS"):
        create_gateway(isolated)


def test_batch_when_kafka_is_unavailable_is_207_with_503_items(isolated: Settings) -> None:
    broken = isolated.model_copy(
        update={"internal_tokens": TOKENS, "bootstrap_servers": "127.0.0.1:1", "gateway_publish_timeout_s": 1.5}
    )
    items = [{**EVENT, "user_id": f"d-{i}"} for i in range(3)] + [{"source": "x"}]
    with TestClient(create_gateway(broken)) as client:
        resp = client.post("/internal/feedback/batch", content=orjson.dumps({"events": items}), headers=AUTH)
    assert resp.status_code == 207
    assert [r["status"] for r in resp.json()["results"]] == [503, 503, 503, 422]
    assert all(r["retry_after"] >= 1 for r in resp.json()["results"][:3])


def test_a_large_batch_lands_whole_and_redacted(gateway: tuple[TestClient, Settings]) -> None:
    client, settings = gateway
    phone = "call +41 44 668 18 {}"
    items = [{**EVENT, "user_id": f"l-{i}", "payload": {"direction": "up", "comment": phone.format(i % 90 + 10)}}
             for i in range(1000)]  # fmt: skip
    resp = client.post("/internal/feedback/batch", content=orjson.dumps({"events": items}), headers=AUTH)
    results = resp.json()["results"]
    assert resp.status_code == 207 and [r["status"] for r in results] == [202] * 1000
    records = _raw(settings)
    assert sorted(r["event_id"] for r in records) == sorted(r["event_id"] for r in results)
    assert {r["payload"]["comment"] for r in records} == {"call [PHONE]"}


def test_a_batch_goes_in_envelopes_answered_per_item_in_order(warm_gateway: tuple[TestClient, Settings]) -> None:
    client, settings = warm_gateway
    items = [{**EVENT, "user_id": f"e-{i % 60}", "payload": {"direction": "up", "n": i}} for i in range(1000)]
    items[500] = {"source": "x"}  # refused, in the middle
    resp = client.post("/internal/feedback/batch", content=orjson.dumps({"events": items}), headers=AUTH)
    results = resp.json()["results"]
    assert resp.status_code == 207 and [r["index"] for r in results] == list(range(1000))
    assert [r["status"] for r in results] == [202] * 500 + [422] + [202] * 499
    serde = AvroSerde()
    messages = read_partitions(settings, Topics(settings.topic_prefix).raw)
    assert 1 < len(messages) <= 3 and all(is_envelope(v) for _, _, v in messages)
    landed = {}
    for partition, _, value in messages:
        for record in map(serde.decode, _values(value)):
            assert partition_for(str(record["user_id"]).encode(), 3) == partition
            landed[record["event_id"]] = record["payload"]["extra"]["n"]
    # Each answer names the event that was sent for that item.
    assert {r["event_id"]: r["index"] for r in results if r["status"] == 202} == landed


_text = st.sampled_from(["up", "fine", "jane@example.com", "+41 44 668 18 00", "10.0.0.1", "v1.2.3", ""]) | st.text(
    max_size=80
)


@settings(max_examples=200, deadline=None)
@given(
    payload=st.fixed_dictionaries(
        {"extra": st.dictionaries(st.text(max_size=8), st.none() | st.integers() | _text, max_size=4)},
        optional={"text": st.none() | _text, "comment": st.none() | _text, "corrected_response": _text},
    )
)
def test_remembered_redaction_equals_the_streams(payload: dict) -> None:
    redactor = _Redactor(max_entries=8)
    for _ in range(2):  # the second time from what it remembered
        assert redactor.payload(payload) == redact_payload(payload)


_json = st.recursive(
    st.none() | st.integers() | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=2), inner, max_size=2),
    max_leaves=60,
)


def _too_deep_recursive(value: object, depth: int = 0) -> bool:
    if depth > MAX_DEPTH:
        return True
    if isinstance(value, dict):
        return any(_too_deep_recursive(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return any(_too_deep_recursive(v, depth + 1) for v in value)
    return False


@settings(max_examples=300, deadline=None)
@given(value=_json, wrap=st.integers(0, MAX_DEPTH + 3))
def test_depth_check_equals_the_recursive_definition(value: object, wrap: int) -> None:
    for i in range(wrap):
        value = [value] if i % 2 else {"k": value}
    assert _too_deep(value) == _too_deep_recursive(value)


def test_serve_with_workers_answers_concurrent_posts_after_the_ack(isolated: Settings, tmp_path: Path) -> None:
    ensure_topics(isolated)
    port = _free_port()
    token = "workers-token-0123456789-abcdefghijk"
    env = {**os.environ, **isolated.model_copy(update={"internal_tokens": token}).to_env()}
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--port", str(port), "--workers", "2"]
    with open(tmp_path / "gateway.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()
            time.sleep(0.2)
        headers = {"X-Internal-Token": token, "Content-Type": "application/json"}

        async def post_all() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=32)
            async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30) as http:
                singles = [http.post("/internal/feedback", content=orjson.dumps({**EVENT, "user_id": f"w-{i}"}))
                           for i in range(200)]  # fmt: skip
                batch = http.post("/internal/feedback/batch", content=orjson.dumps([EVENT] * 50))
                return await asyncio.gather(*singles, batch)

        *singles, batch = asyncio.run(post_all())
        assert [r.status_code for r in singles] == [202] * 200
        assert batch.status_code == 207 and [r["status"] for r in batch.json()["results"]] == [202] * 50
        answered = {r.json()["event_id"] for r in singles} | {r["event_id"] for r in batch.json()["results"]}
        landed = [r["event_id"] for r in _raw(isolated)]
        assert len(landed) == 250 and set(landed) == answered  # each acknowledged event once
    finally:
        proc.terminate()
        proc.wait(30)

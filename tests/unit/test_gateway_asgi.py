"""The gateway's ASGI fast path for the two POST routes, without Kafka (a fake publisher).

The fast path reads headers and body straight from ASGI; these tests drive it with raw
ASGI messages (bodies in pieces, without Content-Length, a client that goes away) and
check it answers exactly as the FastAPI routes it stands in for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.settings import Settings
from producers.gateway import create_gateway, oversize
from schemas.serde import AvroSerde

TOKEN = "unit-token-0123456789-abcdefghijklmnop"
OTHER = "rotated-token-9876543210-zyxwvutsrqponm"
EVENT = {"source": "dream_ui", "type": "thumbs", "user_id": "u-1", "payload": {"direction": "up", "comment": "ok"}}
JSON = [(b"x-internal-token", TOKEN.encode()), (b"content-type", b"application/json")]


class FakePublisher:
    """Stands in for AsyncProducer: records what would go to Kafka, or refuses it."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[tuple[bytes, bytes]] = []

    async def publish(self, key: bytes, value: bytes) -> None:
        if self.fail:
            raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT))
        self.sent.append((key, value))

    async def publish_many(self, messages: list[tuple[bytes, bytes]]) -> list[KafkaError | None]:
        if self.fail:
            return [KafkaError(KafkaError._MSG_TIMED_OUT)] * len(messages)
        self.sent += messages
        return [None] * len(messages)


def _gateway(publisher: FakePublisher, **update: Any) -> FastAPI:
    settings = Settings(**{"internal_tokens": f"{TOKEN},{OTHER}", "rate_limit_per_minute": 1e6, **update})
    return create_gateway(settings, publisher=publisher)  # type: ignore[arg-type]


@pytest.fixture
def sent() -> FakePublisher:
    return FakePublisher()


@pytest.fixture
def app(sent: FakePublisher) -> FastAPI:
    return _gateway(sent)


class Answer:
    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes, reads: int) -> None:
        self.status, self.headers, self.body, self.reads = status, headers, body, reads

    def json(self) -> Any:
        return orjson.loads(self.body)


def call(
    app: Any,
    path: str,
    headers: list[tuple[bytes, bytes]],
    chunks: list[bytes],
    *,
    disconnect: bool = False,
    via_fastapi: bool = False,
) -> Answer | None:
    """One POST through the ASGI app, the body sent as ``chunks`` (more_body on all but the
    last). ``via_fastapi`` skips the fast path and goes through FastAPI's own routing."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": headers, "client": ("10.1.2.3", 5555), "server": ("127.0.0.1", 8080)}  # fmt: skip
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    if disconnect:
        messages = [{"type": "http.disconnect"}]
    reads = 0
    out: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        if reads > len(messages):
            await asyncio.sleep(3600)  # as a server does: nothing more until the client sends
        return messages[reads - 1]

    async def send(message: dict[str, Any]) -> None:
        out.append(message)

    handler = FastAPI.__call__ if via_fastapi else type(app).__call__
    asyncio.run(asyncio.wait_for(handler(app, scope, receive, send), 10))
    if not out:
        return None
    start, body = out[0], b"".join(m.get("body", b"") for m in out[1:])
    assert start["type"] == "http.response.start"
    hdrs = dict(start["headers"])
    assert int(hdrs[b"content-length"]) == len(body)
    return Answer(start["status"], hdrs, body, reads)


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def test_accepts_and_publishes_the_redacted_event(app: FastAPI, sent: FakePublisher) -> None:
    body = orjson.dumps({**EVENT, "payload": {"direction": "down", "comment": "write jane@example.com"}})
    answer = call(app, "/internal/feedback", JSON, [body])
    assert answer is not None and answer.status == 202, answer and answer.body
    assert answer.headers[b"content-type"] == b"application/json"
    ((key, value),), reply = sent.sent, answer.json()
    record = AvroSerde().decode(value)
    assert key == b"u-1" and record["event_id"] == reply["event_id"] and record["hash"] == reply["hash"]
    assert record["payload"]["comment"] == "write [EMAIL]" and record["client_ip"] == "10.1.2.3"
    assert app.middleware_stack is None  # answered by the fast path: FastAPI's stack was never even built


def test_a_body_in_pieces_without_content_length_is_read_whole(app: FastAPI, sent: FakePublisher) -> None:
    answer = call(app, "/internal/feedback", JSON, _pieces(orjson.dumps(EVENT), 7))
    assert answer is not None and answer.status == 202 and len(sent.sent) == 1


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-type", b"application/json")],
        [(b"x-internal-token", b"wrong"), (b"content-type", b"application/json")],
        [(b"x-internal-token", b""), (b"content-type", b"text/plain")],
        [(b"x-internal-token", TOKEN.encode() + b"x"), (b"content-length", b"999999999")],
    ],
)
def test_401_comes_first_and_reads_no_body(app: FastAPI, sent: FakePublisher, headers: list) -> None:
    answer = call(app, "/internal/feedback", headers, _pieces(b"x" * 300_000, 1000))
    assert answer is not None and (answer.status, answer.json()) == (401, {"error": "unauthorized"})
    assert answer.reads == 0 and sent.sent == []


def test_every_configured_token_is_accepted(app: FastAPI, sent: FakePublisher) -> None:
    for token in (TOKEN, OTHER):
        headers = [(b"x-internal-token", token.encode()), (b"content-type", b"application/json")]
        answer = call(app, "/internal/feedback", headers, [orjson.dumps(EVENT)])
        assert answer is not None and answer.status == 202
    assert len(sent.sent) == 2


@pytest.mark.parametrize(
    ("ctype", "status"),
    [
        (None, 415),
        (b"text/plain", 415),
        (b"application/jsonx", 415),
        (b"application/json; charset=utf-8", 202),
        (b" Application/JSON ", 202),
    ],
)
def test_content_type(app: FastAPI, ctype: bytes | None, status: int) -> None:
    headers = [(b"x-internal-token", TOKEN.encode())] + ([(b"content-type", ctype)] if ctype is not None else [])
    answer = call(app, "/internal/feedback", headers, [orjson.dumps(EVENT)])
    assert answer is not None and answer.status == status


def test_413_on_a_streamed_body_without_content_length_stops_reading() -> None:
    publisher = FakePublisher()
    app = _gateway(publisher, gateway_max_body_bytes=4096)
    pieces = _pieces(b"x" * 100_000, 1000)
    answer = call(app, "/internal/feedback", JSON, pieces)
    assert answer is not None and answer.status == 413 and answer.json() == {"error": "body over 4096 bytes"}
    assert answer.reads == 5 < len(pieces) and publisher.sent == []  # stopped at the first piece over the limit
    one_big = call(app, "/internal/feedback", JSON, [b"x" * 4097])
    assert one_big is not None and one_big.status == 413
    exactly = call(app, "/internal/feedback", JSON, [orjson.dumps({**EVENT, "payload": {"comment": "y" * 3900}})])
    assert exactly is not None and exactly.status == 202


def test_413_on_a_declared_length_reads_nothing() -> None:
    app = _gateway(FakePublisher(), gateway_max_body_bytes=4096)
    answer = call(app, "/internal/feedback", [*JSON, (b"content-length", b"4097")], [b"{}"])
    assert answer is not None and answer.status == 413 and answer.reads == 0


def test_batch_limits_apply_to_streamed_bodies() -> None:
    publisher = FakePublisher()
    app = _gateway(publisher, gateway_max_batch_bytes=2048, gateway_max_batch=2)
    over = call(app, "/internal/feedback/batch", JSON, _pieces(orjson.dumps({"events": [EVENT] * 40}), 500))
    assert over is not None and over.status == 413 and publisher.sent == []
    many = call(app, "/internal/feedback/batch", JSON, [orjson.dumps([EVENT] * 3)])
    assert many is not None and many.status == 413 and many.json() == {"error": "more than 2 events"}
    ok = call(app, "/internal/feedback/batch", JSON, _pieces(orjson.dumps({"events": [EVENT, {"x": 1}]}), 30))
    assert ok is not None and ok.status == 207
    assert [r["status"] for r in ok.json()["results"]] == [202, 422] and len(publisher.sent) == 1


def test_422_names_each_field_and_echoes_nothing(app: FastAPI, sent: FakePublisher) -> None:
    bad = {**EVENT, "severity": "apocalyptic", "type": 7}
    answer = call(app, "/internal/feedback", JSON, [orjson.dumps(bad)])
    assert answer is not None and answer.status == 422
    assert {"severity", "type"} <= {p["field"] for p in answer.json()["problems"]}
    assert b"apocalyptic" not in answer.body
    for nasty in (b"", b"{", b'{"a": NaN}', b"\xff{}", b"[]", b"[" * 40 + b"]" * 40):
        answer = call(app, "/internal/feedback", JSON, [nasty])
        assert answer is not None and answer.status == 422, nasty
    assert sent.sent == []


def test_429_and_503_carry_retry_after() -> None:
    limited = _gateway(FakePublisher(), rate_limit_per_minute=1.0, rate_limit_burst=1)
    first, second = (call(limited, "/internal/feedback", JSON, [orjson.dumps(EVENT)]) for _ in range(2))
    assert first is not None and second is not None and (first.status, second.status) == (202, 429)
    assert int(second.headers[b"retry-after"]) >= 1
    down = call(_gateway(FakePublisher(fail=True)), "/internal/feedback", JSON, [orjson.dumps(EVENT)])
    assert down is not None and down.status == 503 and int(down.headers[b"retry-after"]) >= 1


def test_a_client_gone_before_its_body_gets_no_answer(app: FastAPI, sent: FakePublisher) -> None:
    assert call(app, "/internal/feedback", JSON, [], disconnect=True) is None
    assert sent.sent == []


@pytest.mark.parametrize(
    ("headers", "chunks"),
    [
        ([(b"content-type", b"application/json")], [b"{}"]),
        ([(b"x-internal-token", TOKEN.encode())], [b"{}"]),
        (JSON, [b"{", b"}}"]),
        (JSON, [orjson.dumps({**EVENT, "type": 7})]),
        ([*JSON, (b"content-length", b"999999999")], [b"{}"]),
    ],
)
def test_fast_path_answers_as_the_fastapi_route(app: FastAPI, headers: list, chunks: list[bytes]) -> None:
    fast = call(app, "/internal/feedback", headers, chunks)
    slow = call(app, "/internal/feedback", headers, chunks, via_fastapi=True)
    assert fast is not None and slow is not None
    assert (fast.status, fast.body, fast.headers) == (slow.status, slow.body, slow.headers)


def test_other_methods_and_paths_still_go_to_fastapi(app: FastAPI) -> None:
    with TestClient(app) as client:
        assert client.get("/internal/feedback").status_code == 405
        assert client.post("/internal/nothing", headers={"X-Internal-Token": TOKEN}).status_code == 404
        assert client.get("/healthz").json() == {"status": "ok"}


def test_openapi_still_lists_both_posts_with_their_bodies(app: FastAPI) -> None:
    with TestClient(app) as client:
        spec = client.get("/openapi.json").json()
        assert client.get("/docs").status_code == 200
    for path, code in (("/internal/feedback", "202"), ("/internal/feedback/batch", "207")):
        post = spec["paths"][path]["post"]
        assert code in post["responses"] and post["security"] == [{"InternalToken": []}]
        assert "application/json" in post["requestBody"]["content"]
    assert "FeedbackEvent" in spec["components"]["schemas"]


def test_metrics_count_each_endpoint_and_status(app: FastAPI) -> None:
    for _ in range(3):
        call(app, "/internal/feedback", [(b"x-internal-token", b"no")], [b"{}"])
    call(app, "/internal/feedback", JSON, [orjson.dumps(EVENT)])
    with TestClient(app) as client:
        text = client.get("/metrics").text
    assert 'feedback_gateway_requests_total{endpoint="single",status="401"} 3.0' in text
    assert 'feedback_gateway_requests_total{endpoint="single",status="202"} 1.0' in text
    assert "feedback_gateway_accepted_total 1.0" in text


def test_a_chunked_post_through_the_test_client(app: FastAPI, sent: FakePublisher) -> None:
    def body() -> Iterator[bytes]:
        yield from _pieces(orjson.dumps(EVENT), 5)

    with TestClient(app) as client:
        resp = client.post(
            "/internal/feedback",
            content=body(),
            headers={"X-Internal-Token": TOKEN, "Content-Type": "application/json"},
        )
    assert resp.status_code == 202 and "content-length" not in resp.request.headers
    assert len(sent.sent) == 1


def test_a_batch_judges_each_item_as_a_single_post_would() -> None:
    ts = "2026-11-20T10:00:00.000Z"
    items: list[Any] = [
        {
            **EVENT,
            "ts": ts,
            "payload": {"direction": "up", "comment": "mail jane@example.com", "ref": "+1 415 555 0100"},
        },
        {**EVENT, "ts": ts, "user_id": None, "client_ip": ""},  # keyed by the request's address
        {**EVENT, "ts": ts, "severity": "apocalyptic", "type": 7},
        {**EVENT, "ts": ts, "payload": {"nested": {"a": 1}}},
        {"source": "x"},
        "not an object",
        {**EVENT, "ts": ts, "client_ip": "192.0.2.7", "user_id": None, "tags": ["a"]},
    ]
    one_by_one, together = FakePublisher(), FakePublisher()
    singles = [call(_gateway(one_by_one), "/internal/feedback", JSON, [orjson.dumps(item)]) for item in items]
    batch = call(_gateway(together), "/internal/feedback/batch", JSON, [orjson.dumps({"events": items})])
    assert batch is not None and batch.status == 207
    results = batch.json()["results"]
    assert [r["status"] for r in results] == [202, 202, 422, 422, 422, 422, 202]
    for i, (single, result) in enumerate(zip(singles, results, strict=True)):
        assert single is not None and result["index"] == i
        if single.status == 202:
            assert result["hash"] == single.json()["hash"]  # same content, same hash
        else:
            prefix = f"events.{i}."
            fields = [p["field"].removeprefix(prefix) for p in result["problems"]]
            expected = [p["field"] for p in single.json()["problems"]]
            assert fields == (expected if expected != ["body"] else [f"events.{i}"]), i
    assert b"apocalyptic" not in batch.body

    def records(publisher: FakePublisher) -> list[tuple[bytes, dict[str, Any]]]:
        serde = AvroSerde()
        return [(key, {k: v for k, v in serde.decode(value).items() if k != "event_id"})
                for key, value in publisher.sent]  # fmt: skip

    assert records(together) == records(one_by_one) and len(together.sent) == 3
    first, second, _ = records(together)
    assert first[1]["payload"]["comment"] == "mail [EMAIL]" and first[1]["payload"]["extra"]["ref"] == "[PHONE]"
    assert second[0] == b"10.1.2.3" and second[1]["client_ip"] == "10.1.2.3"
    assert [r["event_id"] for r in results if r["status"] == 202] == [
        AvroSerde().decode(value)["event_id"] for _, value in together.sent
    ]


# --- limits before redaction, trusted proxies, token length --------------------------------


def test_a_field_over_the_gates_limit_is_refused_before_redaction(monkeypatch: Any) -> None:
    import producers.gateway as gateway_module

    def no_redaction(_text: str) -> str:
        raise AssertionError("redacted an oversized field")

    sent = FakePublisher()
    app = _gateway(sent, max_text_chars=1000, max_payload_bytes=4000)
    monkeypatch.setattr(gateway_module, "redact_text", no_redaction)
    long_text = {**EVENT, "payload": {"comment": "a." * 600 + "@"}}
    answer = call(app, "/internal/feedback", JSON, [orjson.dumps(long_text)])
    assert answer is not None and answer.status == 422
    assert answer.json()["problems"] == [{"field": "payload.comment", "rule": "longer than 1000 characters"}]
    big = {**EVENT, "payload": {f"k{i}": "x" * 900 for i in range(5)}}
    answer = call(app, "/internal/feedback", JSON, [orjson.dumps(big)])
    assert answer is not None and answer.status == 422
    [problem] = answer.json()["problems"]
    assert problem["field"] == "payload" and problem["rule"].endswith("is over the 4000-byte limit")
    monkeypatch.undo()
    batch = call(app, "/internal/feedback/batch", JSON, [orjson.dumps([EVENT, long_text, EVENT])])
    assert batch is not None and [r["status"] for r in batch.json()["results"]] == [202, 422, 202]
    assert batch.json()["results"][1]["problems"] == [
        {"field": "events.1.payload.comment", "rule": "longer than 1000 characters"}
    ]
    assert len(sent.sent) == 2 and b"a.a." not in b"".join(v for _, v in sent.sent)


@pytest.mark.parametrize(
    ("proxies", "subject"), [("", b"10.1.2.3"), ("10.0.0.0/8", b"192.0.2.7"), ("10.1.2.4", b"10.1.2.3")]
)
def test_client_ip_in_the_body_counts_only_from_a_trusted_proxy(proxies: str, subject: bytes) -> None:
    sent = FakePublisher()
    body = {**EVENT, "user_id": None, "client_ip": "192.0.2.7"}
    answer = call(_gateway(sent, trusted_proxies=proxies), "/internal/feedback", JSON, [orjson.dumps(body)])
    assert answer is not None and answer.status == 202
    ((key, value),) = sent.sent
    assert key == subject and AvroSerde().decode(value)["client_ip"] == subject.decode()


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    from pydantic import ValidationError

    assert Settings(trusted_proxies="10.0.0.5, 10.0.0.0/8,::1").trusted_proxies
    with pytest.raises(ValidationError, match=r"'proxy\.local' is not an IP address or network"):
        Settings(trusted_proxies="10.0.0.5,proxy.local")


def test_tokens_shorter_than_32_characters_refuse_to_start() -> None:
    from pipeline.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"FEEDBACK_INTERNAL_TOKENS: .*at least 32 characters; token 2 of 2"
    ) as caught:
        create_gateway(Settings(internal_tokens=f"{TOKEN},short-0123456789"), publisher=FakePublisher())  # type: ignore[arg-type]
    assert "short-0123456789" not in str(caught.value)
    create_gateway(Settings(internal_tokens="x" * 32), publisher=FakePublisher())  # type: ignore[arg-type]


_strings = st.text(alphabet=st.sampled_from('ab\x00\u00e9\u65e5"\\\n'), max_size=700)


@settings(max_examples=300, deadline=None)
@given(
    flat=st.dictionaries(
        st.sampled_from(["text", "comment", "corrected_response", "note", "k", "rating"]),
        st.none() | st.integers(-(2**63), 2**63 - 1) | _strings,
        max_size=6,
    )
)
def test_oversize_agrees_with_the_gates_size_rules(flat: dict[str, Any]) -> None:
    """What the gateway refuses before redaction is exactly what the gate would refuse for size."""
    from schemas.models import Payload
    from stream_processors.validate import Limits

    limits = Limits(max_payload_bytes=1500, max_text_chars=400)
    texts = {"text", "comment", "corrected_response"}
    if any(k in texts and v is not None and not isinstance(v, str) for k, v in flat.items()):
        return  # the schema refuses it anyway
    avro = Payload.model_validate(flat).to_avro()
    too_long = any(isinstance(avro[name], str) and len(avro[name]) > 400 for name in texts)
    too_big = len(orjson.dumps(avro)) > 1500
    problem = oversize({"payload": flat}, limits)
    assert (problem is not None) == (too_long or too_big)
    assert oversize({"payload": avro}, limits) == problem


def test_a_large_body_is_redacted_in_a_thread_the_same_way(monkeypatch: Any) -> None:
    import producers.gateway as gateway_module

    threads: list[str] = []
    real = gateway_module.redact_text

    def recording(text: str) -> str:
        import threading

        threads.append(threading.current_thread().name)
        return real(text)

    monkeypatch.setattr(gateway_module, "redact_text", recording)
    sent = FakePublisher()
    app = _gateway(sent)
    items = [{**EVENT, "user_id": f"u{i}", "payload": {"comment": f"mail a{i}@b.io " + "x" * 500}} for i in range(20)]
    for _ in range(2):  # a fresh event loop each time: the thread limiter serves both
        answer = call(app, "/internal/feedback/batch", JSON, [orjson.dumps(items)])
        assert answer is not None and [r["status"] for r in answer.json()["results"]] == [202] * 20
    small = call(app, "/internal/feedback", JSON, [orjson.dumps({**EVENT, "payload": {"comment": "c a@b.io"}})])
    assert small is not None and small.status == 202
    comments = [AvroSerde().decode(value)["payload"]["comment"] for _, value in sent.sent]
    assert comments == ["mail [EMAIL] " + "x" * 500] * 40 + ["c [EMAIL]"]
    assert threads[-1] == "MainThread" and "MainThread" not in threads[:-1]  # only the small body on the loop

"""The HTTP gateway: ``POST /internal/feedback`` (and ``/batch``) → ``feedback.raw.v1``.

Every request is checked in this order: token (401, constant-time, several tokens
for rotation), content type (415), size (413), JSON and schema (422, naming each
field), the gate's field size limits (422, naming the field and the limit, checked
before any redaction), the subject's token bucket (429 with Retry-After). An
accepted event has its PII redacted with the stream's own code (off the event loop
for large bodies, so one request cannot hold up /healthz or the others), and the
gateway answers 202 only once Kafka has acknowledged it; when Kafka does not, 503
with Retry-After, and the client keeps the event. Bad input never produces a 5xx.

The rate-limit subject is the user id, else the peer's address: a ``client_ip`` in the
body counts only when the peer is one of ``FEEDBACK_TRUSTED_PROXIES``. Tokens shorter
than :data:`MIN_TOKEN_CHARS` are refused at start.

Delayed feedback over HTTP: ``POST /internal/interactions`` tracks an interaction exactly as
the Python client's ``track()`` does (:func:`~schemas.interaction.tracked_interaction`, to
``feedback.interactions.v1`` with Kafka's Java partitioner), through the same token, content
type, size, JSON and rate-limit checks (an interaction has no user: its subject is the peer's
address). ``GET /internal/interactions/{id}`` answers from ClickHouse, which ``feedback sink``
fills: the context (snapshots only while text is allowed) and the feedback stats.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import orjson
from confluent_kafka import KafkaError, KafkaException
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import SecretStr, ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from pipeline.errors import ConfigError, StackError, TransientError, field_rules
from pipeline.settings import Settings
from producers.producer import JAVA_PARTITIONER, AsyncProducer
from schemas.bulk import Accepted, BulkEncoder, Refused
from schemas.interaction import MAX_ID_CHARS, Interaction, tracked_interaction
from schemas.models import FREE_TEXT_FIELDS, FeedbackEvent
from schemas.serde import AvroSerde
from schemas.topics import Topics
from sinks.interaction_lookup import InteractionLookup, interaction_answer
from stream_processors.ratelimit import BucketState, RateLimit, take_token
from stream_processors.redact import redact_extra, redact_text
from stream_processors.validate import Limits

__all__ = ["MIN_TOKEN_CHARS", "create_gateway", "gateway_from_env", "oversize", "problems"]

log = logging.getLogger(__name__)

MAX_DEPTH = 32
#: The shortest internal token the gateway starts with.
MIN_TOKEN_CHARS = 32
#: Bodies up to this size are redacted on the event loop (a few ms at worst, rules being
#: linear); larger ones in a worker thread, at most :data:`REDACT_THREADS` at a time.
INLINE_REDACT_BYTES = 4096
REDACT_THREADS = 2
#: ClickHouse lookups (GET /internal/interactions/{id}) in flight at once, each in a worker thread.
LOOKUP_THREADS = 4
_TEXT_NAMES = ("text", "comment", "corrected_response")


def oversize(item: Any, limits: Limits) -> dict[str, str] | None:
    """The gate's size rule ``item`` breaks, as ``{"field", "rule"}``, or None: each free-text
    field at most ``limits.max_text_chars`` characters, the payload at most
    ``limits.max_payload_bytes`` bytes of JSON. Cheap, so it runs before any redaction."""
    payload = item.get("payload") if isinstance(item, dict) else None
    if not isinstance(payload, dict):
        return None  # the schema check names what is wrong
    # JSON takes at most 6 bytes a character (\u escapes), ~32 a number or separator.
    chars = 32 * len(payload)
    for name, value in payload.items():
        if isinstance(value, str):
            if len(value) > limits.max_text_chars and name in _TEXT_NAMES:
                return {"field": f"payload.{name}", "rule": f"longer than {limits.max_text_chars} characters"}
            chars += len(value) + len(name)
        elif isinstance(value, dict):  # the Avro form's map
            chars += sum(len(k) + (len(v) if isinstance(v, str) else 0) + 32 for k, v in value.items())
    if chars * 6 > limits.max_payload_bytes:  # only then can the JSON be over the limit: measure it
        fields = payload.get("extra") if set(payload) <= {*_TEXT_NAMES, "extra"} else payload
        if not isinstance(fields, dict):
            return None
        avro_form = {name: payload.get(name) for name in _TEXT_NAMES}
        avro_form["extra"] = {k: v for k, v in fields.items() if k not in _TEXT_NAMES}
        try:
            size = len(orjson.dumps(avro_form))  # as the gate measures it (stream_processors.validate)
        except (orjson.JSONEncodeError, TypeError):
            return None  # (a lone surrogate): the schema check decides
        if size > limits.max_payload_bytes:
            return {"field": "payload", "rule": f"{size} bytes is over the {limits.max_payload_bytes}-byte limit"}
    return None


def problems(exc: ValidationError, prefix: str = "") -> list[dict[str, str]]:
    """Pydantic errors as ``{"field", "rule"}`` pairs (never the submitted values)."""
    return [{"field": field, "rule": rule} for field, rule in field_rules(exc, prefix, default="body")]


def _too_deep(value: Any) -> bool:
    """Whether anything sits deeper than ``MAX_DEPTH`` levels of objects and lists."""
    # Iterative, and visiting containers only: a 1,000-event batch is mostly scalars.
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if not children:
            continue
        if depth + 1 > MAX_DEPTH:
            return True
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


class _Redactor:
    """``redact_payload`` (the stream's code) with one shortcut: short strings in which
    ``redact_text`` found nothing are remembered, and skip the ~15 regular expressions next
    time. ``redact_text`` is a pure function, so the result is the same; categorical values
    ("up", "copy", reason codes) repeat from event to event. Only strings without PII are
    kept, at most ``max_entries`` of up to ``max_length`` characters."""

    def __init__(self, max_entries: int = 16_384, max_length: int = 64) -> None:
        self.max_entries = max_entries
        self.max_length = max_length
        self._clean: set[str] = set()

    def text(self, text: str) -> str:
        if text in self._clean:
            return text
        out = redact_text(text)
        if out == text and len(text) <= self.max_length:
            if len(self._clean) >= self.max_entries:
                self._clean.clear()
            self._clean.add(text)
        return out

    def payload(self, payload: dict[str, Any]) -> dict[str, Any]:
        """What ``redact_payload(payload)`` returns (tests/integration/test_gateway.py compares them)."""
        out = dict(payload)
        for key in FREE_TEXT_FIELDS:
            if isinstance(out.get(key), str):
                out[key] = self.text(out[key])
        out["extra"] = redact_extra(payload["extra"], text=self.text)
        return out


class _Buckets:
    """Token buckets per subject, in this process (the stream applies the shared limit again)."""

    def __init__(self, limit: RateLimit, max_subjects: int = 100_000) -> None:
        self.limit = limit
        self.max_subjects = max_subjects
        self._state: dict[str, BucketState] = {}

    def take(self, subject: str, now_s: float) -> float:
        """0 when allowed, else the seconds until a token is back."""
        state, allowed = take_token(self._state.get(subject), now_s, self.limit)
        if len(self._state) >= self.max_subjects and subject not in self._state:
            self._state.clear()  # bounded memory; a reset only ever lets more through
        self._state[subject] = state
        return 0.0 if allowed else (1.0 - state.tokens) / self.limit.rate_per_s


_JSON = (b"content-type", b"application/json")
_T = TypeVar("_T")


class _Reply:
    """A JSON answer: status, encoded body, extra headers."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers

    async def send(self, send: Send) -> None:
        raw = [_JSON, (b"content-length", str(len(self.body)).encode())]
        if self.headers:
            raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": raw})
        await send({"type": "http.response.body", "body": self.body})

    def response(self) -> Response:
        return Response(self.body, status_code=self.status, headers=self.headers, media_type="application/json")


class _Gateway(FastAPI):
    """FastAPI, except that ``POST`` to the paths in ``fast_routes`` goes straight to their
    handler: no middleware stack, routing, dependency solving or Request object. That was
    about half of a single POST's CPU in a worker; the routes are still declared to FastAPI
    (for /openapi.json, /docs, and any request the fast path does not take)."""

    fast_routes: dict[str, Callable[[Scope, Receive], Awaitable[_Reply]]]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not (self.root_path or scope.get("root_path")):
            handler = self.fast_routes.get(scope["path"])
            if handler is not None:
                try:
                    answer = await handler(scope, receive)
                except ClientDisconnect:
                    return  # nobody to answer
                await answer.send(send)
                return
        await super().__call__(scope, receive, send)


def create_gateway(
    settings: Settings,
    publisher: AsyncProducer | None = None,
    tracker: AsyncProducer | None = None,
    lookup: InteractionLookup | None = None,
) -> FastAPI:
    """The gateway app. ``publisher`` (feedback.raw.v1), ``tracker`` (feedback.interactions.v1) and
    ``lookup`` (ClickHouse) are made from ``settings`` on first use unless given.
    Raises :class:`ConfigError` when no internal token is configured."""
    secret = settings.internal_tokens
    raw = secret.get_secret_value() if isinstance(secret, SecretStr) else str(secret or "")
    tokens = [t.strip().encode() for t in raw.split(",") if t.strip()]
    if not tokens:
        raise ConfigError("FEEDBACK_INTERNAL_TOKENS: set at least one token (comma-separated) for the gateway")
    short = [i for i, t in enumerate(tokens, start=1) if len(t) < MIN_TOKEN_CHARS]
    if short:
        raise ConfigError(
            f"FEEDBACK_INTERNAL_TOKENS: every token must be at least {MIN_TOKEN_CHARS} characters; "
            f"token {', '.join(map(str, short))} of {len(tokens)} is shorter (e.g. python -c "
            "'import secrets; print(secrets.token_urlsafe(32))')"
        )
    proxies = [ipaddress.ip_network(e.strip(), strict=False) for e in settings.trusted_proxies.split(",") if e.strip()]
    limits = Limits(max_payload_bytes=settings.max_payload_bytes, max_text_chars=settings.max_text_chars)
    redact_threads = anyio.CapacityLimiter(REDACT_THREADS)
    lookup_threads = anyio.CapacityLimiter(LOOKUP_THREADS)
    registry = CollectorRegistry()
    requests_total = Counter("feedback_gateway_requests", "Requests by endpoint and status.", ["endpoint", "status"],
                             registry=registry)  # fmt: skip
    accepted = Counter("feedback_gateway_accepted", "Events acknowledged by Kafka.", registry=registry)
    rate_limited = Counter("feedback_rate_limited", "Events refused by the gateway's rate limit.", registry=registry)
    tracked = Counter("feedback_gateway_interactions", "Interactions acknowledged by Kafka.", registry=registry)
    serde = AvroSerde.from_url(settings.schema_registry_url)
    interaction_serde = AvroSerde("interaction_v1")  # as track() encodes them
    redactor = _Redactor()
    bulk = BulkEncoder(serde, redact=redactor.payload)
    buckets = _Buckets(RateLimit.per_minute(settings.rate_limit_per_minute, settings.rate_limit_burst))
    state: dict[str, AsyncProducer] = {}
    reader = lookup or InteractionLookup(settings)

    def get_publisher() -> AsyncProducer:
        if "p" not in state:
            state["p"] = publisher or AsyncProducer(settings, settings.gateway_publish_timeout_s, "feedback-gateway")
        return state["p"]

    def get_tracker() -> AsyncProducer:
        if "t" not in state:
            state["t"] = tracker or AsyncProducer(
                settings, settings.gateway_publish_timeout_s, "feedback-gateway-tracker",
                topic=Topics(settings.topic_prefix).interactions, config=JAVA_PARTITIONER,
            )  # fmt: skip
        return state["t"]

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        # Flush what is in flight before exiting; what was handed in belongs to the caller.
        for name, given in (("p", publisher), ("t", tracker)):
            if name in state and given is None:
                await asyncio.to_thread(state[name].close)
        if lookup is None:
            await asyncio.to_thread(reader.close)

    app = _Gateway(
        title="feedback gateway",
        version="1",
        description="Publish feedback events to the pipeline. Every call needs an `X-Internal-Token` header.",
        lifespan=lifespan,
    )

    # One Prometheus child per (endpoint, status), resolved on first use: ``labels()`` builds
    # a tuple and takes a lock on every call, this is a dict lookup.
    counted: dict[tuple[str, int], Any] = {}

    def reply(endpoint: str, status: int, body: Any, headers: Mapping[str, str] | None = None) -> _Reply:
        child = counted.get((endpoint, status))
        if child is None:
            child = counted[(endpoint, status)] = requests_total.labels(endpoint, str(status))
        child.inc()
        # orjson writes the same compact UTF-8 JSON as JSONResponse, several times faster (207 bodies are large).
        return _Reply(status, orjson.dumps(body), headers)

    def authorized(given: bytes) -> bool:
        # Compare against every token, always: the time taken says nothing about which matched.
        matched = False
        for token in tokens:
            matched |= hmac.compare_digest(given, token)
        return matched

    async def read_json(scope: Scope, receive: Receive, endpoint: str, limit: int) -> tuple[Any, int]:
        """The request's JSON document and its size in bytes, or the :class:`_Reply` refusing it.
        Reads the ASGI messages itself: the same checks as through Starlette's Request,
        without building one."""
        token = ctype = declared = None
        for name, value in scope["headers"]:  # ASGI header names are lower case; the first one counts
            if name == b"x-internal-token":
                token = value if token is None else token
            elif name == b"content-type":
                ctype = value if ctype is None else ctype
            elif name == b"content-length":
                declared = value if declared is None else declared
        if not authorized(token or b""):
            return reply(endpoint, 401, {"error": "unauthorized"}), 0
        if ctype != b"application/json" and (
            ctype is None or ctype.decode("latin-1").split(";")[0].strip().lower() != "application/json"
        ):
            return reply(endpoint, 415, {"error": "content type must be application/json"}), 0
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return reply(endpoint, 413, {"error": f"body over {limit} bytes"}), 0
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        body = message.get("body", b"")
        if len(body) > limit:
            return reply(endpoint, 413, {"error": f"body over {limit} bytes"}), 0
        if message.get("more_body", False):  # chunked, or sent in pieces: gather, counting as it comes
            buffer = bytearray(body)
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    raise ClientDisconnect()
                buffer += message.get("body", b"")
                if len(buffer) > limit:
                    return reply(endpoint, 413, {"error": f"body over {limit} bytes"}), 0
                if not message.get("more_body", False):
                    break
            body = buffer
        try:
            data = orjson.loads(body)  # rejects NaN, invalid UTF-8 and trailing garbage
        except orjson.JSONDecodeError:
            return reply(
                endpoint, 422, {"error": "invalid", "problems": [{"field": "body", "rule": "not valid JSON"}]}
            ), 0
        if _too_deep(data):
            return reply(endpoint, 422, {"error": "invalid", "problems": [
                {"field": "body", "rule": f"nested deeper than {MAX_DEPTH} levels"}]}), 0  # fmt: skip
        return data, len(body)

    def trusted(peer: str | None) -> bool:
        if not proxies or peer is None:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in proxies)

    def encode(items: list[Any], client_ip: str | None, from_proxy: bool) -> list[Accepted | Refused]:
        # A client_ip in the body is the subject only from a trusted proxy; else the peer's address.
        return bulk.encode(
            [{**item, "client_ip": (from_proxy and item.get("client_ip")) or client_ip}
             if isinstance(item, dict) else item for item in items]
        )  # fmt: skip

    async def by_size(body_bytes: int, work: Callable[[], _T]) -> _T:
        """``work()`` (redaction) on the event loop for a small body, in a worker thread for a large one."""
        if body_bytes <= INLINE_REDACT_BYTES:
            return work()
        return await anyio.to_thread.run_sync(work, limiter=redact_threads)

    async def judge(items: list[Any], client_ip: str | None, body_bytes: int) -> list[Accepted | Refused]:
        """Validation, hash, redaction (nothing unredacted reaches Kafka) and Avro bytes for
        each item, exactly as the model would (schemas.bulk: a fast check, and FeedbackEvent
        itself for anything it is unsure of). Items over the gate's size limits must be taken
        out before (:func:`oversize`). A large body is redacted in a worker thread."""
        return await by_size(body_bytes, partial(encode, items, client_ip, trusted(client_ip)))

    async def acknowledged(endpoint: str, publishing: Awaitable[None]) -> _Reply | None:
        """None once Kafka has acknowledged; else the 503 answer (the caller keeps the event)."""
        try:
            await publishing
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            log.warning(
                "gateway_publish_failed error=%s", err.name() if isinstance(err, KafkaError) else type(exc).__name__
            )
            return reply(endpoint, 503, {"error": "Kafka unavailable; retry"}, retry_after(5))
        return None

    def refusal(outcome: Refused, where: str) -> list[dict[str, str]]:
        """The problems of a refused item; ``where`` is its place in the body ("" for the body)."""
        if outcome.error is None:
            return [{"field": where or "body", "rule": "must be a JSON object"}]
        return problems(outcome.error, f"{where}." if where else "")

    def retry_after(seconds: float) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(seconds)))}

    def client_host(scope: Scope) -> str | None:
        client = scope.get("client")
        return client[0] if client else None

    async def single(scope: Scope, receive: Receive) -> _Reply:
        data, size = await read_json(scope, receive, "single", settings.gateway_max_body_bytes)
        if isinstance(data, _Reply):
            return data
        too_large = oversize(data, limits)
        if too_large is not None:
            return reply("single", 422, {"error": "invalid", "problems": [too_large]})
        [event] = await judge([data], client_host(scope), size)
        if isinstance(event, Refused):
            return reply("single", 422, {"error": "invalid", "problems": refusal(event, "")})
        wait = buckets.take(event.key.decode(), time.time())  # the key: user_id, else client_ip, else source
        if wait:
            rate_limited.inc()
            return reply("single", 429, {"error": "rate limited"}, retry_after(wait))
        refused = await acknowledged("single", get_publisher().publish(event.key, event.value))
        if refused is not None:
            return refused
        accepted.inc()
        return reply("single", 202, {"event_id": event.event_id, "hash": event.hash})

    async def track(scope: Scope, receive: Receive) -> _Reply:
        """POST /internal/interactions: one interaction, as ``track()`` publishes it."""
        data, size = await read_json(scope, receive, "interactions", settings.gateway_max_body_bytes)
        if isinstance(data, _Reply):
            return data
        if not isinstance(data, dict):
            return reply("interactions", 422, {"error": "invalid", "problems": [
                {"field": "body", "rule": "must be a JSON object"}]})  # fmt: skip
        build = partial(tracked_interaction, data, allow_text=settings.allow_text, redact=redactor.text)
        try:
            interaction: Interaction = await by_size(size, build)
        except ValidationError as exc:
            return reply("interactions", 422, {"error": "invalid", "problems": problems(exc)})
        # No user to count against: the peer's address, as for feedback without a user_id.
        wait = buckets.take(client_host(scope) or interaction.source, time.time())
        if wait:
            rate_limited.inc()
            return reply("interactions", 429, {"error": "rate limited"}, retry_after(wait))
        key = interaction.interaction_id.encode()
        refused = await acknowledged(
            "interactions", get_tracker().publish(key, interaction_serde.encode(interaction.to_avro()))
        )
        if refused is not None:
            return refused
        tracked.inc()
        return reply(
            "interactions", 202, {"interaction_id": interaction.interaction_id, "ts": interaction.ts.isoformat()}
        )

    async def batch(scope: Scope, receive: Receive) -> _Reply:
        data, size = await read_json(scope, receive, "batch", settings.gateway_max_batch_bytes)
        if isinstance(data, _Reply):
            return data
        items = data.get("events") if isinstance(data, dict) else data
        if not isinstance(items, list):
            return reply("batch", 422, {"error": "invalid", "problems": [
                {"field": "events", "rule": "must be a list of events"}]})  # fmt: skip
        if len(items) > settings.gateway_max_batch:
            return reply("batch", 413, {"error": f"more than {settings.gateway_max_batch} events"})
        too_large = [oversize(item, limits) for item in items]
        fit = [item for item, problem in zip(items, too_large, strict=True) if problem is None]
        judged = iter(await judge(fit, client_host(scope), size) if fit else [])
        outcomes = [next(judged) if problem is None else problem for problem in too_large]
        results: list[dict[str, Any]] = []
        to_send: list[tuple[int, tuple[bytes, bytes]]] = []
        now = time.time()
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, dict):  # over a size limit: never redacted nor encoded
                results.append({"index": i, "status": 422, "problems": [
                    {"field": f"events.{i}.{outcome['field']}", "rule": outcome["rule"]}]})  # fmt: skip
                continue
            if isinstance(outcome, Refused):
                results.append({"index": i, "status": 422, "problems": refusal(outcome, f"events.{i}")})
                continue
            wait = buckets.take(outcome.key.decode(), now)
            if wait:
                rate_limited.inc()
                results.append({"index": i, "status": 429, "retry_after": max(1, math.ceil(wait))})
                continue
            results.append({"index": i, "status": 202, "event_id": outcome.event_id, "hash": outcome.hash})
            to_send.append((i, (outcome.key, outcome.value)))
        # Produce every accepted item, then wait once for all of Kafka's answers.
        answers = await get_publisher().publish_many([message for _, message in to_send])
        failed = 0
        for (i, _), answer in zip(to_send, answers, strict=True):
            if answer is not None:
                failed += 1
                results[i] = {"index": i, "status": 503, "retry_after": 5}
        if failed:
            log.warning("gateway_publish_failed count=%d", failed)
        accepted.inc(len(to_send) - failed)
        return reply("batch", 207, {"results": results})

    # The two POST routes are served by ``single``/``batch`` straight from ASGI (see _Gateway);
    # these FastAPI routes describe them in /openapi.json and answer any request the fast path
    # leaves to FastAPI (e.g. under a root_path), with the very same code.
    app.fast_routes = {"/internal/feedback": single, "/internal/feedback/batch": batch, "/internal/interactions": track}

    event_body = {"$ref": "#/components/schemas/FeedbackEvent"}
    batch_body = {"type": "object", "required": ["events"],
                  "properties": {"events": {"type": "array", "items": event_body}}}  # fmt: skip

    def body(schema: dict[str, Any]) -> dict[str, Any]:
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
                "security": [{"InternalToken": []}]}  # fmt: skip

    @app.post(
        "/internal/feedback",
        status_code=202,
        summary="Publish one feedback event",
        openapi_extra=body(event_body),
        responses={code: {"description": text} for code, text in _RESPONSES.items()},
    )
    async def post_feedback(request: Request) -> Response:
        return (await single(request.scope, request.receive)).response()

    @app.post(
        "/internal/feedback/batch",
        status_code=207,
        summary="Publish up to N events, each judged alone",
        openapi_extra=body(batch_body),
        responses={code: {"description": text} for code, text in _RESPONSES.items() if code != 429},
    )
    async def post_batch(request: Request) -> Response:
        return (await batch(request.scope, request.receive)).response()

    @app.post(
        "/internal/interactions",
        status_code=202,
        summary="Track an interaction, for feedback that comes later with its id",
        openapi_extra=body({"$ref": "#/components/schemas/Interaction"}),
        responses={code: {"description": _TRACK_RESPONSES.get(code, text)} for code, text in _RESPONSES.items()},
    )
    async def post_interaction(request: Request) -> Response:
        return (await track(request.scope, request.receive)).response()

    @app.get(
        "/internal/interactions/{interaction_id:path}",
        summary="An interaction's context and its feedback stats (count, mean, last)",
        openapi_extra={"security": [{"InternalToken": []}]},
        responses={code: {"description": text} for code, text in _LOOKUP_RESPONSES.items()},
    )
    async def get_interaction(interaction_id: str, request: Request) -> Response:
        endpoint = "interaction"
        if not authorized(request.headers.get("x-internal-token", "").encode("latin-1")):
            return reply(endpoint, 401, {"error": "unauthorized"}).response()
        if len(interaction_id) > MAX_ID_CHARS:
            return reply(endpoint, 422, {"error": "invalid", "problems": [
                {"field": "interaction_id", "rule": f"at most {MAX_ID_CHARS} characters"}]}).response()  # fmt: skip
        wait = buckets.take(client_host(request.scope) or "", time.time())
        if wait:
            rate_limited.inc()
            return reply(endpoint, 429, {"error": "rate limited"}, retry_after(wait)).response()
        try:
            context, stats = await anyio.to_thread.run_sync(reader.find, interaction_id, limiter=lookup_threads)
        except (TransientError, StackError) as exc:
            log.warning("gateway_lookup_failed error=%s", type(exc).__name__)
            return reply(endpoint, 503, {"error": str(exc)}, retry_after(5)).response()
        answer = interaction_answer(interaction_id, context, stats, allow_text=settings.allow_text)
        if answer is None:
            return reply(endpoint, 404, {"error": "unknown interaction", "interaction_id": interaction_id}).response()
        return reply(endpoint, 200, answer).response()

    @app.get("/healthz", summary="The process is up")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Kafka is reachable")
    async def readyz() -> Response:
        ok = await asyncio.to_thread(get_publisher().ready)
        return JSONResponse({"status": "ready" if ok else "kafka unreachable"}, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema = FeedbackEvent.model_json_schema(ref_template="#/components/schemas/{model}")
            components = spec.setdefault("components", {})
            components.setdefault("schemas", {}).update({**schema.pop("$defs", {}), "FeedbackEvent": schema})
            components["schemas"]["Interaction"] = Interaction.model_json_schema()
            components["securitySchemes"] = {
                "InternalToken": {"type": "apiKey", "in": "header", "name": "X-Internal-Token"}
            }
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def gateway_from_env() -> FastAPI:
    """The gateway configured from the environment (``FEEDBACK_*``): the app factory each
    ``feedback serve --workers N`` process builds for itself."""
    from pipeline.logs import configure_logging
    from pipeline.settings import get_settings

    settings = get_settings()
    configure_logging(settings)
    return create_gateway(settings)


_RESPONSES = {
    202: "Accepted: Kafka acknowledged the event (body: event_id and hash).",
    401: "Missing or wrong X-Internal-Token.",
    413: "Body (or batch) over the size limit.",
    415: "Content type is not application/json.",
    422: "Invalid: each problem names the field and the rule.",
    429: "The subject's rate limit; see Retry-After.",
    503: "Kafka did not acknowledge; retry after Retry-After.",
}
_TRACK_RESPONSES = {
    202: "Accepted: Kafka acknowledged the interaction (body: interaction_id and ts).",
    429: "The peer's rate limit (shared with its feedback); see Retry-After.",
}
_LOOKUP_RESPONSES = {
    200: "The interaction's context and feedback stats.",
    401: "Missing or wrong X-Internal-Token.",
    404: "Unknown: never tracked, erased, or not yet in ClickHouse.",
    422: "The id is over the length limit.",
    429: "The peer's rate limit; see Retry-After.",
    503: "ClickHouse did not answer (or holds no interactions table yet); retry after Retry-After.",
}

"""The Python client: typed helpers for every signal the pipeline normalizes.

::

    from producers.client import FeedbackClient

    with FeedbackClient(source="dream_ui", model_version="m-2026.11") as fb:
        fb.thumbs(up=False, interaction_id="i-9", user_id="u-42", comment="wrong citation")
        fb.rating(4, interaction_id="i-9")
        fb.veto("unsafe_advice", interaction_id="i-10")      # guardian veto
        fb.regret_tap(-0.6, {"turn": 3})                        # only below the threshold

        # Delayed feedback: track the interaction when answering; feedback that comes
        # later with the same interaction_id is joined to this context in the stream.
        fb.track("i-11", latency_ms=840, cost=0.002, response=answer)

        # Many at once (the gateway's JSON form): all validated before any is sent.
        fb.emit_many([{"type": "implicit", "payload": {"signal": "copy"}, "interaction_id": "i-12"}, ...])

Each helper builds and validates a :class:`FeedbackEvent` (a bad argument raises
``ValueError`` naming the field) and queues it; ``flush()`` (and leaving the
``with`` block) waits for Kafka and raises :class:`DeliveryError` for anything not
acknowledged. ``AsyncFeedbackClient`` offers the same helpers as coroutines that
return once Kafka has acknowledged the event.

``track()`` publishes to ``feedback.interactions.v1`` keyed by interaction_id, with
Kafka's Java (murmur2) partitioner so the key lands in the same partition as the
stream's re-keyed feedback. Prompt and response snapshots are redacted before they
leave the process, and not sent at all unless text is allowed (``FEEDBACK_ALLOW_TEXT``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaException
from pydantic import ValidationError

from pipeline.errors import InvalidEvent
from pipeline.settings import Settings, get_settings
from producers.producer import JAVA_PARTITIONER, AsyncProducer, DeliveryError, FeedbackProducer, subject_key
from schemas.bulk import Accepted, BulkEncoder, Refused
from schemas.interaction import Interaction, tracked_interaction
from schemas.models import FeedbackEvent
from schemas.serde import AvroSerde
from schemas.topics import Topics
from stream_processors.redact import redact_text

__all__ = ["REGRET_THRESHOLD", "Accepted", "AsyncFeedbackClient", "FeedbackClient"]

REGRET_THRESHOLD = -0.3
MAX_TRACKS_IN_FLIGHT = 10_000  # interactions remembered between tracker flushes (then it is flushed)

Scalar = str | int | float | bool | None


class _Signals:
    """The typed helpers; subclasses decide what sending means."""

    def __init__(self, source: str, *, model_version: str | None = None, prompt_version: str | None = None,
                 regret_threshold: float = REGRET_THRESHOLD) -> None:  # fmt: skip
        self.source = source
        self.defaults = {"model_version": model_version, "prompt_version": prompt_version}
        self.regret_threshold = regret_threshold
        self._bulk: BulkEncoder | None = None

    def _event(self, type_: str, payload: Mapping[str, Any], **fields: Any) -> FeedbackEvent:
        data = {"source": self.source, "type": type_, "payload": dict(payload)}
        data.update({k: v for k, v in self.defaults.items() if v is not None})
        data.update({k: v for k, v in fields.items() if v is not None})
        try:
            return FeedbackEvent.model_validate(data)
        except ValidationError as exc:
            raise InvalidEvent.first(exc) from None  # a ValueError: "field: rule"

    def _submit(self, event: FeedbackEvent) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _submit_many(self, accepted: list[Accepted]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _serde(self) -> AvroSerde:  # pragma: no cover - abstract
        raise NotImplementedError

    def emit_many(self, events: Iterable[Mapping[str, Any]]) -> Any:
        """Many events at once, each in the gateway's JSON form (``type``, a flat ``payload``,
        ``user_id``, ``interaction_id``, ...); the client's source and versions fill what an
        event leaves out. Every event is validated first: an invalid one raises ``ValueError``
        naming its index and field (``events.3.payload.rating: ...``) and nothing is sent.
        Returns one :class:`~schemas.bulk.Accepted` (``event_id``, ``hash``) per event.

        The same rules, hash and bytes as the helpers, at about half their cost per event:
        no model object is built (``schemas.bulk``)."""
        if self._bulk is None:
            self._bulk = BulkEncoder(self._serde())
        items = [e if type(e) is dict else dict(e) if isinstance(e, Mapping) else e for e in events]
        defaults = {"source": self.source, **{k: v for k, v in self.defaults.items() if v is not None}}
        results = self._bulk.encode(items, defaults=defaults)
        for i, result in enumerate(results):
            if isinstance(result, Refused):
                if result.error is None:
                    raise ValueError(f"events.{i}: must be a mapping of fields")
                raise InvalidEvent.first(result.error, prefix=f"events.{i}.")
        self._after_tracks(item.get("interaction_id") for item in items if isinstance(item, dict))
        return self._submit_many(results)  # type: ignore[arg-type]  # every result is Accepted here

    def _track(self, interaction: Interaction) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _after_tracks(self, interaction_ids: Iterable[Any]) -> None:
        """Before events naming these interactions are sent: wait for their ``track()`` if it is
        still in flight, so Kafka has the interaction before the feedback (the worker joins an
        interaction to the feedback sent after it was tracked). Nothing to do by default."""

    # --- delayed feedback ----------------------------------------------------
    def track(
        self,
        interaction_id: str,
        *,
        prompt: str | None = None,
        response: str | None = None,
        latency_ms: float | None = None,
        cost: float | None = None,
        **fields: Any,
    ) -> Any:
        """Publish an interaction's context (model_version, prompt_version, snapshots, latency,
        cost; ``ts`` defaults to now) for feedback that arrives later with the same id."""
        data: dict[str, Any] = {"interaction_id": interaction_id, "source": self.source, **self.defaults}
        data.update(prompt=prompt, response=response, latency_ms=latency_ms, cost=cost, **fields)
        try:
            interaction = tracked_interaction(data, allow_text=self._allow_text(), redact=redact_text)
        except ValidationError as exc:
            raise InvalidEvent.first(exc, default="interaction") from None
        return self._track(interaction)

    def _allow_text(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _nothing(self) -> Any:
        return None

    # --- explicit signals --------------------------------------------------
    def thumbs(self, up: bool, *, comment: str | None = None, **fields: Any) -> Any:
        """Thumbs up (+1) or down (-1) on an interaction."""
        return self._submit(self._event("thumbs", {"direction": "up" if up else "down", "comment": comment}, **fields))

    def rating(self, stars: int, *, comment: str | None = None, **fields: Any) -> Any:
        """A 1-5 star rating: value (stars - 3) / 2."""
        if isinstance(stars, bool) or not isinstance(stars, int) or not 1 <= stars <= 5:
            raise ValueError("payload.stars: must be an integer from 1 to 5")
        return self._submit(self._event("rating", {"stars": stars, "comment": comment}, **fields))

    def correction(self, corrected_response: str, *, comment: str | None = None, **fields: Any) -> Any:
        """The user corrected the answer (negative; the corrected response is kept)."""
        payload = {"corrected_response": corrected_response, "comment": comment}
        return self._submit(self._event("correction", payload, **fields))

    def task_success(self, success: bool, **fields: Any) -> Any:
        return self._submit(self._event("task_success", {"success": bool(success)}, **fields))

    def regeneration(self, **fields: Any) -> Any:
        """The user asked for another answer (negative, confidence 0.8)."""
        return self._submit(self._event("regeneration", {"regenerated": True}, **fields))

    def quality_score(self, score: float, **fields: Any) -> Any:
        """A score in [0, 1] from a grader: value 2q - 1."""
        if not 0.0 <= float(score) <= 1.0:
            raise ValueError("payload.score: must be in [0, 1]")
        return self._submit(self._event("quality_score", {"score": float(score)}, **fields))

    def implicit(self, signal: str, *, read_time_ms: int | None = None, **fields: Any) -> Any:
        """copy, citation_click, read_time (with read_time_ms) or follow_up."""
        if signal not in ("copy", "citation_click", "read_time", "follow_up"):
            raise ValueError("payload.signal: must be copy, citation_click, read_time or follow_up")
        return self._submit(self._event("implicit", {"signal": signal, "read_time_ms": read_time_ms}, **fields))

    # --- complaints that feed directive bias -----------------------------------------
    def bad_output(self, *, severity: str = "warn", detail: str | None = None, **fields: Any) -> Any:
        return self._submit(self._event("bad_output", {"detail": detail}, severity=severity, **fields))

    def latency(self, latency_ms: int, *, severity: str = "warn", **fields: Any) -> Any:
        return self._submit(self._event("latency", {"latency_ms": int(latency_ms)}, severity=severity, **fields))

    def safety(self, *, severity: str = "critical", detail: str | None = None, **fields: Any) -> Any:
        return self._submit(self._event("safety", {"detail": detail}, severity=severity, **fields))

    def veto(self, reason_code: str, *, severity: str = "critical", **fields: Any) -> Any:
        """A guardian veto: ``type="veto"`` with ``payload.reason_code``; never sampled away."""
        if not reason_code:
            raise ValueError("payload.reason_code: required")
        return self._submit(self._event("veto", {"reason_code": reason_code}, severity=severity, **fields))

    def regret_tap(self, valence: float, context: Mapping[str, Scalar] | None = None, **fields: Any) -> Any:
        """Emit ``source="oneiric", type="regret_signal"`` only when ``valence`` is below the
        threshold (default -0.3); returns None and sends nothing otherwise."""
        if not -1.0 <= float(valence) <= 1.0:
            raise ValueError("payload.valence: must be in [-1, 1]")
        if valence >= self.regret_threshold:
            return self._nothing()
        payload = {**dict(context or {}), "valence": float(valence)}
        event = self._event("regret_signal", payload, **{"source": "oneiric", **fields})
        return self._submit(event)

    def emit(self, type_: str, payload: Mapping[str, Scalar] | None = None, **fields: Any) -> Any:
        """Any other signal type (the stream normalizes it if an adapter is registered)."""
        return self._submit(self._event(type_, payload or {}, **fields))


class FeedbackClient(_Signals):
    """Synchronous client: helpers queue events and return them; :meth:`flush` waits for Kafka."""

    def __init__(self, source: str, settings: Settings | None = None, **kwargs: Any) -> None:
        super().__init__(source, **kwargs)
        self.producer = FeedbackProducer(settings)
        self._tracker: FeedbackProducer | None = None
        self._tracks_in_flight: set[str] = set()  # interactions tracked since the tracker's last flush

    def _submit(self, event: FeedbackEvent) -> FeedbackEvent:
        if self._tracks_in_flight and event.interaction_id is not None:
            self._after_tracks((event.interaction_id,))
        self.producer.send(event)
        return event

    def _after_tracks(self, interaction_ids: Iterable[Any]) -> None:
        pending = self._tracks_in_flight
        if pending and any(i in pending for i in interaction_ids):
            self._settle_tracks()

    def _settle_tracks(self) -> None:
        if self._tracker is not None:
            self._tracker.flush(120.0)
        self._tracks_in_flight.clear()

    def _serde(self) -> AvroSerde:
        return self.producer.serde

    def _submit_many(self, accepted: list[Accepted]) -> list[Accepted]:
        self.producer.send_encoded_many(accepted)
        return accepted

    def _allow_text(self) -> bool:
        return self.producer.settings.allow_text

    def _track(self, interaction: Interaction) -> Interaction:
        if self._tracker is None:
            self._tracker = _tracker(self.producer.settings)
        value = self._tracker.serde.encode(interaction.to_avro())
        self._tracker.send_raw(value, key=interaction.interaction_id.encode(), label=interaction.interaction_id)
        self._tracks_in_flight.add(interaction.interaction_id)
        if len(self._tracks_in_flight) > MAX_TRACKS_IN_FLIGHT:
            self._settle_tracks()
        return interaction

    def flush(self, timeout: float = 60.0) -> None:
        self.producer.flush(timeout)
        if self._tracker is not None:
            self._tracker.flush(timeout)
            self._tracks_in_flight.clear()

    def close(self) -> None:
        try:
            self.producer.close()
        finally:
            if self._tracker is not None:
                self._tracker.close()

    def __enter__(self) -> FeedbackClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncFeedbackClient(_Signals):
    """asyncio client: each helper is awaited until Kafka has acknowledged the event
    (raises :class:`DeliveryError` when it does not)."""

    def __init__(self, source: str, settings: Settings | None = None, **kwargs: Any) -> None:
        super().__init__(source, **kwargs)
        self.settings = settings or get_settings()
        self.serde = AvroSerde.from_url(self.settings.schema_registry_url)
        self._producer: AsyncProducer | None = None
        self._tracker: FeedbackProducer | None = None

    async def _send(self, event: FeedbackEvent) -> FeedbackEvent:
        try:
            await self._publisher().publish(subject_key(event), self.serde.encode(event.to_avro()))
        except KafkaException as exc:
            raise DeliveryError([(event.event_id, exc.args[0].str())]) from None
        return event

    def _publisher(self) -> AsyncProducer:
        if self._producer is None:
            self._producer = AsyncProducer(self.settings, timeout_s=120.0, client_id="feedback-client")
        return self._producer

    def _submit(self, event: FeedbackEvent) -> Awaitable[FeedbackEvent]:
        return self._send(event)

    def _serde(self) -> AvroSerde:
        return self.serde

    async def _submit_many(self, accepted: list[Accepted]) -> list[Accepted]:
        outcomes = await self._publisher().publish_many([(event.key, event.value) for event in accepted])
        failures = [(event.event_id, err.str()) for event, err in zip(accepted, outcomes, strict=True) if err]
        if failures:
            raise DeliveryError(failures)
        return accepted

    def _nothing(self) -> Awaitable[None]:
        return asyncio.sleep(0)

    def _allow_text(self) -> bool:
        return self.settings.allow_text

    def _track(self, interaction: Interaction) -> Awaitable[Interaction]:
        return asyncio.to_thread(self._track_sync, interaction)

    def _track_sync(self, interaction: Interaction) -> Interaction:
        # Interactions are one per answer, not a hot path: the sync producer, flushed per call,
        # so the coroutine returns once Kafka has acknowledged it (or raises DeliveryError).
        if self._tracker is None:
            self._tracker = _tracker(self.settings)
        value = self._tracker.serde.encode(interaction.to_avro())
        self._tracker.send_raw(value, key=interaction.interaction_id.encode(), label=interaction.interaction_id)
        self._tracker.flush(120.0)
        return interaction

    async def aclose(self) -> None:
        if self._producer is not None:
            await asyncio.to_thread(self._producer.close)
        if self._tracker is not None:
            await asyncio.to_thread(self._tracker.close)

    async def __aenter__(self) -> AsyncFeedbackClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _tracker(settings: Settings) -> FeedbackProducer:
    """The producer for ``feedback.interactions.v1``: Java-compatible partitioning (murmur2), as
    the stream's Kafka client uses for the feedback it re-keys by interaction_id."""
    return FeedbackProducer(
        settings,
        topic=Topics(settings.topic_prefix).interactions,
        serde=AvroSerde("interaction_v1"),
        config={**JAVA_PARTITIONER, "client.id": "feedback-tracker"},
    )

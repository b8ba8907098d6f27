"""Which feedback can skip the enrich hop: an index of the interactions tracked so far.

An event naming an ``interaction_id`` goes through ``feedback.enrich.v1`` so the agent that
owns the interaction's partition can join its context. Most such events name interactions
nobody tracked (the client only calls ``track()`` when it wants delayed feedback joined), and
for those the hop only adds a produce, a flush and a second agent's batch before the event
reaches ``feedback.clean.v1``. The gate sends an event straight to the clean topic, marked
``interaction_status = unknown`` exactly as the join would mark it, only when the index can
show that its interaction was never tracked:

* **membership**: the interaction id is not in a Bloom filter of every id seen on
  ``feedback.interactions.v1`` (two generations, each longer than the interactions table keeps
  an interaction, so the filter forgets an id only after the table has). A false positive only
  sends an event through the hop, as before.
* **coverage**: the index has read the interactions topic past the moment the event was
  created. Every few milliseconds it asks the broker for each partition's high watermark
  (``list_offsets``, answered after the time the question was asked) and, once it has consumed
  up to all of them, knows every interaction appended before that time. An event created
  before it (its Kafka timestamp, plus ``clock_skew_s`` for producers on other hosts) whose id
  is not in the filter names an interaction that had not been tracked when it was sent.

Until the index has caught up with the topic (at start, or if it falls behind), every event
with an ``interaction_id`` takes the hop. The rule the join follows is therefore the one it
followed before, with one precise statement: an interaction joins the feedback sent after its
``track()`` was acknowledged by Kafka. The Python client keeps that order for its own calls
(an event naming an interaction whose ``track()`` is still in flight waits for it), and the
gateway answers ``POST /internal/interactions`` only once Kafka has the interaction.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

__all__ = ["Bloom", "Coverage", "InteractionIndex", "TrackedIds", "bloom_size"]

log = logging.getLogger(__name__)


def bloom_size(capacity: int, error_rate: float) -> tuple[int, int]:
    """Bits and hash functions for ``capacity`` ids at a false-positive rate of ``error_rate``."""
    bits = max(64, math.ceil(-capacity * math.log(error_rate) / math.log(2) ** 2))
    return bits, max(1, round(bits / capacity * math.log(2)))


class Bloom:
    """A Bloom filter over bytes: ``k`` bit positions from one BLAKE2b digest (double hashing)."""

    def __init__(self, capacity: int, error_rate: float = 0.01) -> None:
        self.bits, self.k = bloom_size(capacity, error_rate)
        self._array = bytearray((self.bits + 7) // 8)
        self.count = 0

    def _positions(self, key: bytes) -> list[int]:
        digest = hashlib.blake2b(key, digest_size=16).digest()
        h1, h2 = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little") | 1
        return [(h1 + i * h2) % self.bits for i in range(self.k)]

    def add(self, key: bytes) -> None:
        array = self._array
        for p in self._positions(key):
            array[p >> 3] |= 1 << (p & 7)
        self.count += 1

    def __contains__(self, key: bytes) -> bool:
        array = self._array
        return all(array[p >> 3] & (1 << (p & 7)) for p in self._positions(key))


class TrackedIds:
    """Interaction ids seen in the last ``keep_s`` seconds at least (and at most twice that).

    Two Bloom generations: ids go into the current one; when it is ``keep_s`` old it becomes
    the previous one and the previous one is dropped. A lookup checks both, so an id stays
    for at least ``keep_s`` after it was added. A generation filled past its capacity keeps
    working with a higher false-positive rate (more events take the hop, as they would without
    the index).
    """

    def __init__(self, keep_s: float, capacity: int, error_rate: float = 0.01, *, now: float) -> None:
        self.keep_s, self.capacity, self.error_rate = keep_s, capacity, error_rate
        self._current, self._previous = Bloom(capacity, error_rate), Bloom(capacity, error_rate)
        self._started = now

    def _rotate(self, now: float) -> None:
        if now - self._started >= self.keep_s:
            self._previous, self._current = self._current, Bloom(self.capacity, self.error_rate)
            self._started = now

    def add(self, key: bytes, now: float) -> None:
        self._rotate(now)
        self._current.add(key)

    def may_contain(self, key: bytes) -> bool:
        return key in self._current or key in self._previous


@dataclass
class Coverage:
    """Up to when the index has read every partition of the topic.

    :meth:`asked` records a watermark check: the time the question was asked and the high
    watermark the broker answered per partition. :meth:`consumed` records how far the index
    has read. ``until`` is the time of the latest check whose watermarks have all been read:
    every message appended before it has been seen.
    """

    until: float = -math.inf
    _next: dict[int, int] = field(default_factory=dict)  # partition → next offset to read
    _checks: deque[tuple[float, dict[int, int]]] = field(default_factory=deque)

    def start(self, low: Mapping[int, int]) -> None:
        """The partitions' low watermarks when reading starts (earlier offsets no longer exist)."""
        for p, offset in low.items():
            self._next[p] = max(self._next.get(p, 0), offset)

    def consumed(self, partition: int, next_offset: int) -> None:
        """Read up to ``next_offset`` (a message's offset + 1, or the end-of-partition offset)."""
        if next_offset > self._next.get(partition, 0):
            self._next[partition] = next_offset
        self._settle()

    def asked(self, at: float, high: Mapping[int, int]) -> None:
        self._checks.append((at, dict(high)))
        while len(self._checks) > 64:  # far behind: keep the newest questions
            self._checks.popleft()
        self._settle()

    def _settle(self) -> None:
        nxt = self._next
        while self._checks and all(nxt.get(p, 0) >= h for p, h in self._checks[0][1].items()):
            at, _ = self._checks.popleft()
            self.until = max(self.until, at)


class InteractionIndex:
    """The tracked interaction ids and the coverage of the interactions topic, kept by a thread.

    ``consumer_factory`` and ``admin_factory`` build confluent-kafka clients (a Consumer with
    no group commits, assigned every partition from the beginning, and an AdminClient for the
    watermarks); the thread owns both. :meth:`may_have_context` is what the gate asks.
    """

    def __init__(
        self,
        topic: str,
        consumer_factory: Callable[[], object],
        admin_factory: Callable[[], object],
        *,
        keep_s: float,
        capacity: int = 1_000_000,
        clock_skew_s: float = 0.05,
        check_s: float = 0.02,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.topic = topic
        self._consumer_factory, self._admin_factory = consumer_factory, admin_factory
        self.clock = clock
        self.ids = TrackedIds(keep_s, capacity, now=clock())
        self.coverage = Coverage()
        self.clock_skew_s = clock_skew_s
        self.check_s = check_s
        self._lock = threading.Lock()
        self._advanced = threading.Condition(self._lock)  # notified when the coverage moves
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str = ""  # the last failure, for the logs and metrics (never a payload)

    def may_have_context(self, interaction_id: bytes, created_s: float) -> bool:
        """False only when ``interaction_id`` cannot have been tracked before ``created_s``."""
        with self._lock:
            if self.coverage.until < created_s + self.clock_skew_s:
                return True  # not read that far yet: the join decides
            return self.ids.may_contain(interaction_id)

    def decided(self, created_s: float) -> bool:
        """Whether :meth:`may_have_context` can already answer for feedback created at ``created_s``
        with anything but "maybe" (the index has read that far)."""
        return self.coverage.until >= created_s + self.clock_skew_s

    def wait_until_decided(self, created_s: float, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until the index has read far enough to decide feedback
        created at ``created_s``; False if it has not by then."""
        deadline = time.monotonic() + timeout_s
        with self._advanced:
            while self.coverage.until < created_s + self.clock_skew_s:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._advanced.wait(left)
            return True

    @property
    def covered_until(self) -> float:
        return self.coverage.until

    # --- the thread -------------------------------------------------------------------
    def start(self) -> InteractionIndex:
        self._thread = threading.Thread(target=self._run, name="interaction-index", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
            except Exception as exc:  # the broker went away, a rebalance of the topic: start over
                self.error = type(exc).__name__
                log.warning("interaction_index_restart error=%s", self.error)
                with self._lock:
                    self.coverage = Coverage()  # until it has caught up again, every event takes the hop
                self._stop.wait(1.0)

    def _follow(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition
        from confluent_kafka.admin import OffsetSpec

        consumer, admin = self._consumer_factory(), self._admin_factory()
        try:
            meta = consumer.list_topics(self.topic, timeout=30.0).topics[self.topic]  # type: ignore[attr-defined]
            if meta.error is not None or not meta.partitions:
                raise RuntimeError(f"topic {self.topic}: no partitions")
            parts = sorted(meta.partitions)
            low = {}
            for p in parts:
                lo, _hi = consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=30.0)  # type: ignore[attr-defined]
                low[p] = lo
            with self._lock:
                self.coverage.start(low)
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])  # type: ignore[attr-defined]
            latest = {TopicPartition(self.topic, p): OffsetSpec.latest() for p in parts}
            pending = None  # the watermark question in flight: (asked at, futures)
            while not self._stop.is_set():
                if pending is None:
                    pending = (self.clock(), admin.list_offsets(latest, request_timeout=10.0))  # type: ignore[attr-defined]
                messages = consumer.consume(5000, timeout=self.check_s)  # type: ignore[attr-defined]
                now = self.clock()
                with self._lock:
                    for msg in messages:
                        err = msg.error()
                        if err is not None:
                            # The end of a partition, reported with the offset the fetcher reached
                            # (past any offsets compaction removed at the end of the log).
                            if err.code() == KafkaError._PARTITION_EOF:
                                self.coverage.consumed(msg.partition(), msg.offset())
                            continue
                        key = msg.key()
                        if key is not None and msg.value() is not None:  # a tombstone adds nothing
                            self.ids.add(key, now)
                        self.coverage.consumed(msg.partition(), msg.offset() + 1)
                    if messages:
                        self._advanced.notify_all()
                if pending is not None and all(f.done() for f in pending[1].values()):
                    at, futures = pending
                    pending = None
                    high = {tp.partition: f.result().offset for tp, f in futures.items()}
                    with self._advanced:
                        self.coverage.asked(at, high)
                        self._advanced.notify_all()
        finally:
            consumer.close()  # type: ignore[attr-defined]

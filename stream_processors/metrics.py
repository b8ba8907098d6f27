"""The worker's Prometheus metrics (text endpoint on 127.0.0.1:``worker_metrics_port``).

Label values that come from events (source, type) are capped: after
:data:`MAX_LABEL_VALUES` distinct values, the rest are counted as ``other`` so a
misbehaving producer cannot blow up the metric cardinality.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

__all__ = ["MAX_LABEL_VALUES", "GateMetrics", "LabelCap", "Tally"]

log = logging.getLogger(__name__)

MAX_LABEL_VALUES = 100


class LabelCap:
    """Pass through the first ``limit`` distinct values, then ``other``."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return "other"


class GateMetrics:
    """Counters for every gate decision, the state agents' updates, and consumer lag."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.cap_source = LabelCap()
        self.cap_type = LabelCap()
        self.feedback = Counter("feedback", "Events accepted onto feedback.clean.v1.", ["source", "type"], registry=r)
        self.veto = Counter("feedback_veto", "Guardian vetoes accepted.", registry=r)
        self.regret = Counter("feedback_regret", "Regret signals accepted.", registry=r)
        self.rate_limited = Counter("feedback_rate_limited", "Events over their subject's rate limit.", registry=r)
        self.rejected = Counter("feedback_rejected", "Events sent to feedback.rejected.v1.", ["reason"], registry=r)
        self.duplicates = Counter("feedback_duplicates", "Duplicates dropped inside the dedup window.", registry=r)
        self.redactions = Counter("feedback_redactions", "PII spans replaced, by kind.", ["kind"], registry=r)
        self.text_dropped = Counter("feedback_text_dropped", "Events whose payload.text was removed.", registry=r)
        self.sampled_out = Counter("feedback_sampled_out", "Events dropped by sampling.", ["type"], registry=r)
        self.dlq = Counter("feedback_dlq", "Messages sent to feedback.dlq.v1.", ["stage"], registry=r)
        self.triage = Counter("feedback_triage", "Triage queue changes applied, by op.", ["op"], registry=r)
        self.interactions = Counter("feedback_interactions", "Interaction contexts stored (track()).", registry=r)
        self.erased = Counter(
            "feedback_erased", "Table entries erased for `feedback forget`, by table.", ["table"], registry=r
        )
        self.enriched = Counter(
            "feedback_enriched", "Feedback joined to its interaction, by status: joined/expired/unknown.",
            ["status"], registry=r,
        )  # fmt: skip
        self.enrich_skipped = Counter(
            "feedback_enrich_skipped",
            "Feedback naming an interaction never tracked, sent straight to the clean topic (status unknown).",
            registry=r,
        )
        self.index_behind = Gauge(
            "feedback_interaction_index_behind_seconds",
            "How far behind now the interaction index has read every interaction (inf until it has caught up).",
            registry=r,
        )
        self.state_updates = Counter(
            "feedback_state_updates", "State table updates applied (replays excluded).", ["table"], registry=r
        )
        self.state_replays = Counter(
            "feedback_state_replays", "Messages skipped as already applied (after a restart).", ["table"], registry=r
        )
        self.published = Counter(
            "feedback_state_published", "Updates published to state topics.", ["topic"], registry=r
        )
        self.lag = Gauge(
            "feedback_consumer_lag", "Messages behind the high watermark.", ["topic", "partition"], registry=r
        )
        self.table_keys = Gauge(
            "feedback_table_keys",
            "Keys of a swept state table (gate-seen: dedup keys and opinions; gate-subjects: rate-limit buckets; "
            "interactions) that the expiry sweep's last full pass left: at the end of the pass the table held at "
            "least that many, and at most that many plus the keys written during the pass.",
            ["table"], registry=r,
        )  # fmt: skip
        self.sweep_pass = Gauge(
            "feedback_table_sweep_pass_seconds",
            "How long the expiry sweep's last full pass of a table took (an expired key stays up to about that long).",
            ["table"], registry=r,
        )  # fmt: skip

    def serve(self, port: int) -> bool:
        """Start the HTTP endpoint on 127.0.0.1 (a daemon thread). A taken port disables
        the endpoint with a warning instead of stopping the worker."""
        if not port:
            return False
        try:
            start_http_server(port, addr="127.0.0.1", registry=self.registry)
        except OSError as exc:
            log.warning("metrics_disabled port=%d error=%s (set FEEDBACK_WORKER_METRICS_PORT)", port, exc.strerror)
            return False
        log.info("metrics_serving port=%d", port)
        return True


class Tally:
    """Counter increments gathered over a batch and applied once per label set: a labelled
    ``inc()`` costs about a microsecond, too much to pay several times per event."""

    def __init__(self) -> None:
        self._counts: dict[tuple[Counter, tuple[str, ...]], float] = {}

    def add(self, counter: Counter, *labels: str, n: float = 1) -> None:
        key = (counter, labels)
        self._counts[key] = self._counts.get(key, 0) + n

    def apply(self) -> None:
        counts, self._counts = self._counts, {}
        for (counter, labels), n in counts.items():
            if n:
                (counter.labels(*labels) if labels else counter).inc(n)

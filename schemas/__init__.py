"""The event contract: Avro schemas, the pydantic models mirroring them, hashing, serde, topics."""

from schemas.hashing import canonical_json, compute_hash
from schemas.models import FREE_TEXT_FIELDS, FeedbackEvent, Payload, Severity, format_ts, new_event_id
from schemas.serde import AvroSerde, SchemaCatalog, load_schema
from schemas.topics import TOPICS, Topics, TopicSpec

__all__ = [
    "FREE_TEXT_FIELDS",
    "TOPICS",
    "AvroSerde",
    "FeedbackEvent",
    "Payload",
    "SchemaCatalog",
    "Severity",
    "TopicSpec",
    "Topics",
    "canonical_json",
    "compute_hash",
    "format_ts",
    "load_schema",
    "new_event_id",
]

"""Grouping bulk events into envelopes by partition: pure, no broker.

The integration tests (tests/integration/test_client.py, test_gateway.py) check the same
partitions against the real broker's partitioner.
"""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.settings import Settings
from producers.producer import FeedbackProducer, _event_ids, envelopes_by_partition, partition_for
from schemas import AvroSerde
from schemas.bulk import BulkEncoder
from schemas.envelope import MAX_BYTES, MAX_EVENTS, is_envelope, pack, unpack

SERDE = AvroSerde()
keys = st.binary(min_size=1, max_size=12)
items = st.lists(st.tuples(keys, st.binary(max_size=200)), max_size=300)


@given(keys, st.integers(1, 1024))
def test_the_partition_is_crc32_of_the_key_modulo_the_count(key: bytes, partitions: int) -> None:
    assert partition_for(key, partitions) == zlib.crc32(key) % partitions
    assert 0 <= partition_for(key, partitions) < partitions


def test_the_crc_is_the_standard_crc32() -> None:
    # librdkafka's consistent_random is rd_crc32(key) % partition_cnt, with the reflected IEEE
    # CRC-32 (check value 0xCBF43926 for "123456789"), unsigned: no masking of the top bit.
    assert zlib.crc32(b"123456789") == 0xCBF43926
    assert [partition_for(b"123456789", n) for n in (1, 3, 6, 7)] == [0, 0xCBF43926 % 3, 0xCBF43926 % 6, 0xCBF43926 % 7]
    assert partition_for(b"u-42", 6) == 0x3ECDF876 % 6


def _events(message_value: bytes) -> list[bytes]:
    return unpack(message_value) if is_envelope(message_value) else [message_value]


@given(items, st.integers(1, 8))
def test_every_event_once_in_its_keys_partition_in_input_order(
    pairs: list[tuple[bytes, bytes]], partitions: int
) -> None:
    messages = envelopes_by_partition(pairs, partitions)
    seen = sorted(i for m in messages for i in m.indexes)
    assert seen == list(range(len(pairs)))  # every event exactly once
    for m in messages:
        assert all(partition_for(pairs[i][0], partitions) == m.partition for i in m.indexes)
        assert m.key == pairs[m.indexes[0]][0]  # the first event's key
        assert _events(m.value) == [pairs[i][1] for i in m.indexes]  # the events, in this order
        assert is_envelope(m.value) == (len(m.indexes) > 1)  # a lone event travels as itself
    for p in range(partitions):  # within a partition, the input order
        order = [i for m in messages if m.partition == p for i in m.indexes]
        assert order == sorted(order)
        assert order == [i for i, (k, _) in enumerate(pairs) if partition_for(k, partitions) == p]


def test_envelopes_stay_within_the_limits() -> None:
    # One key (one partition): 2,500 small events need three envelopes by count ...
    small = [(b"u-1", b"x" * 40)] * 2500
    messages = envelopes_by_partition(small, 6)
    assert [len(m.indexes) for m in messages] == [MAX_EVENTS, MAX_EVENTS, 500]
    # ... and large ones are cut by size, each envelope at most MAX_BYTES plus one event.
    large = [(f"u-{i % 5}".encode(), bytes([i % 251]) * 3000) for i in range(2000)]
    messages = envelopes_by_partition(large, 3)
    assert all(len(m.value) <= MAX_BYTES + 3000 + 32 for m in messages)
    assert all(len(m.indexes) <= MAX_EVENTS for m in messages)
    assert sum(len(_events(m.value)) for m in messages) == 2000
    assert len(messages) < 2000 // 50  # envelopes of many, not one message per event


def test_an_empty_batch_is_no_message() -> None:
    assert envelopes_by_partition([], 3) == []


def test_a_failure_names_every_event_of_an_envelope() -> None:
    accepted = BulkEncoder(SERDE).encode([{"source": "s", "type": "thumbs", "user_id": f"u-{i}"} for i in range(4)])
    values = [a.value for a in accepted]  # type: ignore[union-attr]
    ids = [a.event_id for a in accepted]  # type: ignore[union-attr]
    assert _event_ids(pack(values), SERDE) == ids
    assert _event_ids(values[2], SERDE) == [ids[2]]
    assert _event_ids(pack([values[0], b"\x00garbage"]), SERDE) == [ids[0], "unknown"]
    assert _event_ids(b"\x00garbage", SERDE) == ["unknown"]
    assert _event_ids(None, SERDE) == ["unknown"]


def test_accepted_events_group_like_their_key_value_pairs() -> None:
    accepted = BulkEncoder(SERDE).encode([{"source": "s", "type": "t", "user_id": f"u-{i % 9}"} for i in range(60)])
    pairs = [(a.key, a.value) for a in accepted]  # type: ignore[union-attr]
    assert envelopes_by_partition(accepted, 4) == envelopes_by_partition(pairs, 4)  # type: ignore[arg-type]


def test_envelopes_follow_the_setting_and_the_partitioner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEEDBACK_ENVELOPES", "false")
    assert Settings().envelopes is False
    monkeypatch.delenv("FEEDBACK_ENVELOPES")
    assert Settings().envelopes is True
    nowhere = Settings(bootstrap_servers="127.0.0.1:1")
    assert FeedbackProducer(nowhere)._partitions is not None
    assert FeedbackProducer(nowhere.model_copy(update={"envelopes": False}))._partitions is None
    # Another partitioner places keys elsewhere than CRC-32: the producer sends single-event messages.
    assert FeedbackProducer(nowhere, config={"partitioner": "murmur2_random"})._partitions is None
    assert FeedbackProducer(nowhere, config={"partitioner": "consistent"})._partitions is not None

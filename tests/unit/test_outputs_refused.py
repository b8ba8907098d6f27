"""A message Kafka refuses for good fails the flush (the batch is never acknowledged); no waiting forever."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from confluent_kafka import KafkaError

from stream_processors.outputs import REFUSED_FOR_GOOD, KafkaOutputs, OutputRefused


def _message(topic: str) -> SimpleNamespace:
    return SimpleNamespace(
        topic=lambda: topic, partition=lambda: 0, key=lambda: b"k", value=lambda: b"secret payload", offset=lambda: -1
    )


def test_a_message_refused_for_good_fails_the_flush_naming_topic_and_error() -> None:
    outputs = KafkaOutputs("127.0.0.1:1")  # never reached: nothing is queued
    outputs._report(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), _message("feedback.dlq.v1"))
    with pytest.raises(
        OutputRefused, match=r"1 message\(s\) for good, first for feedback\.dlq\.v1: MSG_SIZE_TOO_LARGE"
    ) as exc:
        outputs.flush()
    assert "secret payload" not in str(exc.value)
    outputs.flush()  # reported once: the next batch's flush starts clean


def test_only_errors_that_repeat_on_every_send_are_refused_for_good() -> None:
    assert KafkaError.MSG_SIZE_TOO_LARGE in REFUSED_FOR_GOOD
    # A broker away for a while, or a leader moving: queued again, the flush waits for Kafka.
    for passing in (KafkaError._MSG_TIMED_OUT, KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError._TRANSPORT):
        assert passing not in REFUSED_FOR_GOOD

"""The pure parts of ``feedback dlq``: selecting, ordering and planning letters, their cells and
JSON (never a key or payload), and bad arguments exiting 2 before any connection."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.dlq import Letter, letter_from_record, newest_first, plan_replay, select_letters
from pipeline.ops_cli import letter_cells
from schemas.dead_letter import dead_letter
from schemas.serde import AvroSerde

RAW = "p.feedback.raw.v1"
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _letter(n: int, *, minutes: int = 0, stage: str = "decode", topic: str = RAW, raw: bytes = b"\xc3\x01abc",
            key: bytes | None = b"u-1", partition: int = 0, dlq_partition: int = 0) -> Letter:  # fmt: skip
    return Letter(
        dlq_partition=dlq_partition, dlq_offset=n, ts=T0 + timedelta(minutes=minutes), stage=stage,
        error="unknown framing (first byte 0x6e)", topic=topic, partition=partition, offset=100 + n, key=key, raw=raw,
    )  # fmt: skip


def test_a_letter_round_trips_through_its_avro_record() -> None:
    serde = AvroSerde("dead_letter_v1")
    record = dead_letter(stage="decode", error="empty message value", topic=RAW, partition=2, offset=41,
                         key=b"u-9", raw=b"\x00\x01", now=T0)  # fmt: skip
    letter = letter_from_record(serde.decode(serde.encode(record)), 1, 7)
    assert (letter.dlq_partition, letter.dlq_offset, letter.ts, letter.stage) == (1, 7, T0, "decode")
    assert (letter.topic, letter.partition, letter.offset, letter.key, letter.raw) == (RAW, 2, 41, b"u-9", b"\x00\x01")
    assert letter.size == 2


def test_select_by_time_window_and_stage() -> None:
    letters = [_letter(0, minutes=-90), _letter(1, minutes=-30, stage="gate"), _letter(2, minutes=0),
               _letter(3, minutes=5)]  # fmt: skip
    since, before = T0 - timedelta(hours=1), T0 + timedelta(minutes=1)
    assert [lt.dlq_offset for lt in select_letters(letters, since=since)] == [1, 2, 3]
    # `before` excludes letters written at or after the replay started: no loop.
    assert [lt.dlq_offset for lt in select_letters(letters, since=since, before=T0)] == [1]
    assert [lt.dlq_offset for lt in select_letters(letters, since=since, before=before, stages=["decode"])] == [2]
    assert select_letters(letters, stages=["sink"]) == []


def test_newest_first_with_a_limit_and_stable_ties() -> None:
    letters = [_letter(0, minutes=1), _letter(1, minutes=3), _letter(2, minutes=3, dlq_partition=1), _letter(3)]
    ordered = newest_first(letters)
    assert [(lt.dlq_partition, lt.dlq_offset) for lt in ordered] == [(1, 2), (0, 1), (0, 0), (0, 3)]
    assert newest_first(letters, 2) == ordered[:2]


def test_plan_sends_raw_letters_once_oldest_first_and_says_what_it_skips() -> None:
    letters = [
        _letter(0, minutes=5),
        _letter(1, minutes=1, raw=b"other", key=b"u-2"),
        _letter(2, minutes=9),  # the same message dead-lettered again: sent once
        _letter(3, stage="interactions", topic="p.feedback.interactions.v1"),
        _letter(4, stage="sink", topic="p.feedback.clean.v1"),
        _letter(5, raw=b""),
        _letter(6, minutes=2, partition=1),  # same bytes and key, another origin partition: another message
    ]
    plan = plan_replay(letters, RAW)
    assert [lt.dlq_offset for lt in plan.send] == [1, 6, 0]
    assert plan.duplicates == 1
    assert plan.skipped == {
        f"from p.feedback.interactions.v1 (stage interactions): only letters from {RAW} go through the gate": 1,
        f"from p.feedback.clean.v1 (stage sink): only letters from {RAW} go through the gate": 1,
        "an empty message: no bytes to replay": 1,
    }
    assert plan.busiest_key_count() == 2
    assert plan_replay([], RAW).busiest_key_count() == 0


def test_cells_and_json_never_carry_the_key_or_the_payload() -> None:
    letter = Letter(
        dlq_partition=0, dlq_offset=3, ts=T0, stage="gate", error="ValueError for jane@example.com\nin gate",
        topic=RAW, partition=1, offset=9, key=b"u-secret-42", raw=b"payload: call +1 415 555 0100" * 60,
    )  # fmt: skip
    cells = letter_cells(letter, RAW)
    assert cells == ["2026-11-23 12:00:00", "gate", "ValueError for [EMAIL] in gate", RAW, "1", "9", "1.7 KiB", "yes"]
    data = letter.to_json()
    assert set(data) == {"ts", "stage", "error", "topic", "partition", "offset", "size", "dlq_partition", "dlq_offset"}
    assert data["size"] == len(letter.raw) and data["ts"] == "2026-11-23T12:00:00+00:00"
    text = repr(letter) + str(cells) + str(data)
    assert "u-secret-42" not in text and "415 555" not in text and "jane@" not in text
    assert letter_cells(_letter(0, topic="p.feedback.clean.v1"), RAW)[-1] == "no"
    assert letter_cells(_letter(0, raw=b""), RAW)[-2:] == ["0 B", "no"]


@pytest.mark.parametrize(
    "args",
    [
        ["dlq", "list", "--since", "3x"],
        ["dlq", "list", "--limit", "0"],
        ["dlq", "list", "--stage", "Not A Stage"],
        ["dlq", "replay", "--since", "yesterday"],
        ["dlq", "replay", "--stage", ""],
        ["dlq", "replay", "--bogus"],
    ],
)
def test_bad_arguments_exit_2_before_any_connection(args: list[str]) -> None:
    # Nothing listens on port 1: reaching Kafka would exit 1, not 2.
    result = CliRunner().invoke(app, args, env={"FEEDBACK_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert result.exit_code == 2, result.output
    assert "cannot reach Kafka" not in result.output


@pytest.mark.parametrize("command", ["list", "replay"])
def test_help_has_an_example(command: str) -> None:
    result = CliRunner().invoke(app, ["dlq", command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert f"feedback dlq {command}" in result.output and "Example" in result.output


def test_replay_skips_letters_of_erased_users_by_key_or_by_content() -> None:
    from datetime import UTC, datetime

    from pipeline.dlq import ERASED, Letter, erased_filter, plan_replay
    from schemas.envelope import pack_many
    from schemas.models import FeedbackEvent
    from schemas.serde import AvroSerde
    from stream_processors.redact import pseudonymize

    serde, key = AvroSerde(), b"h" * 32

    def body(user: str) -> bytes:
        event = FeedbackEvent.model_validate({"source": "s", "type": "thumbs", "user_id": user,
                                              "payload": {"direction": "up"}})  # fmt: skip
        return serde.encode(event.to_avro())

    def letter(n: int, raw: bytes, msg_key: bytes | None) -> Letter:
        return Letter(dlq_partition=0, dlq_offset=n, ts=datetime(2026, 1, 1, tzinfo=UTC), stage="gate",
                      error="x", topic="raw", partition=0, offset=n, key=msg_key, raw=raw)  # fmt: skip

    letters = [
        letter(0, body("u-erased"), b"u-erased"),  # by key and content
        letter(1, body("u-erased"), b"10.0.0.1"),  # by content only (keyed by another subject)
        letter(2, b"\x00poison", b"u-erased"),  # undecodable: by key only
        letter(3, next(pack_many([body("u-kept"), body("u-erased")]))[0], b"u-kept"),  # an envelope with one of theirs
        letter(4, body("u-kept"), b"u-kept"),
        letter(5, b"\x00poison", b"u-kept"),
    ]
    erased = {pseudonymize("u-erased", key)}  # what feedback.erasures.v1 holds: never the id
    plan = plan_replay(letters, "raw", erased_filter(erased, key))
    assert [lt.dlq_offset for lt in plan.send] == [4, 5] and plan.skipped[ERASED] == 4
    # Without erasures every letter goes.
    assert len(plan_replay(letters, "raw", erased_filter(set(), key)).send) == 6

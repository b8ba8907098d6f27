"""`feedback forget`'s arguments and failures, without a stack: exit 2 with the reason for a
bad argument, one error line (no traceback) when Kafka is unreachable."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.forget import ForgetReport, user_ids
from pipeline.settings import Settings, get_settings
from stream_processors.redact import pseudonymize


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ((), "exactly one of --user-id and --pseudonym"),
        (("--user-id", "a", "--pseudonym", "b"), "exactly one of --user-id and --pseudonym"),
        (("--user-id", "a"), "confirm with --yes"),  # not a terminal: no prompt, and no silent erasure
        (("--user-id", " ", "--yes"), "1-256 characters"),
        (("--user-id", "a", "--yes", "--wait", "-1"), "--wait"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(args: tuple[str, ...], reason: str) -> None:
    result = CliRunner().invoke(app, ["forget", *args])
    assert result.exit_code == 2, result.output
    assert reason in " ".join(result.stderr.split())


def test_unreachable_kafka_is_one_error_line(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("FEEDBACK_KAFKA_PORT", "1")  # nothing listens there
    monkeypatch.setenv("FEEDBACK_STATE_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["forget", "--user-id", "u-1", "--yes", "--wait", "1"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1
    assert "error" in result.stderr and "run it again" in result.stderr
    assert "Traceback" not in result.stderr and "u-1" not in result.stderr


def test_the_user_is_found_as_sent_and_as_pseudonym(tmp_path: object) -> None:
    key = "forget-test-key-0123456789"
    settings = Settings(pseudonym_key=key, state_dir=tmp_path)
    assert user_ids(settings, "alice", None) == {"alice", pseudonymize("alice", key.encode())}
    assert user_ids(settings, None, "u_abc") == {"u_abc"}
    assert user_ids(settings.model_copy(update={"pseudonymize_user_id": False}), "alice", None) == {"alice"}
    assert ForgetReport().complete
    assert not ForgetReport(pending=["the worker is behind"]).complete
    assert not ForgetReport(remaining={"JSONL lines": 1}).complete


class _Recorder:
    """Records the statements sent; answers every count with 3."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, object]]] = []

    def command(self, sql: str, parameters: dict[str, object], settings: dict[str, object] | None = None) -> int:
        self.sent.append((sql, settings or {}))
        return 3


@pytest.mark.parametrize("cluster", ["", " ON CLUSTER `c1`"])
def test_deletes_are_synchronous_and_reach_every_shard_on_a_cluster(cluster: str) -> None:
    from pipeline.forget import _delete

    client = _Recorder()
    assert _delete(client, "`db`", "feedback_events", "user_id", ["u_1"], cluster) == 3
    (count, _), (alter, settings) = client.sent
    assert count.startswith("SELECT count() FROM `db`.feedback_events" + ("_all" if cluster else " "))
    assert alter.startswith(f"ALTER TABLE `db`.feedback_events{cluster} DELETE WHERE user_id IN")
    assert settings == {"mutations_sync": 2}
    assert _delete(client, "`db`", "triage", "triage_id", [], cluster) == 0 and len(client.sent) == 2

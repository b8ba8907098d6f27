"""The state agents' pure steps: offsets per origin, forwarding, throttled publishing; config and metrics helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigError
from pipeline.settings import Settings
from schemas.state_records import BiasRecord, bias_key, decode_bias, decode_reputation, encode_record, split_bias_key
from stream_processors.config import gate_config, pseudonym_key
from stream_processors.metrics import LabelCap
from stream_processors.reputation import ReputationPolicy
from stream_processors.state_steps import (
    BiasConfig,
    BiasIncrement,
    Outcome,
    Throttle,
    bias_apply,
    bias_record,
    reputation_apply,
    reputation_record,
)

POLICY = ReputationPolicy(alpha=0.5, threshold=0.5, min_observations=2)
BIAS = BiasConfig(step=0.1, half_life_s=100.0)


def _outcome(offset: int, outcome: str = "accepted", *, type_: str = "bad_output", partition: int = 0) -> Outcome:
    return Outcome("oracle", type_, "error", outcome, kept=outcome == "accepted", ts_s=1000.0 + offset,
                   model_version="m-1", partition=partition, offset=offset)  # fmt: skip


def test_reputation_applies_each_origin_offset_once_and_always_forwards() -> None:
    value, inc = reputation_apply(None, _outcome(5), POLICY, BIAS)
    assert value == {"score": 1.0, "observations": 1, "applied": {"0": 5}}
    assert inc is not None and inc.key == "increase_grounding" and inc.weight == 1.0 and inc.offset == 5
    # The same offset again (a replay): no change, but the increment is forwarded again for the bias step to judge.
    again, inc_again = reputation_apply(value, _outcome(5), POLICY, BIAS)
    assert again is None and inc_again == inc
    # Another partition is another origin, with its own offsets.
    other, _ = reputation_apply(value, _outcome(3, partition=1), POLICY, BIAS)
    assert other is not None and other["applied"] == {"0": 5, "1": 3} and other["observations"] == 2


def test_noise_downweights_a_source_and_its_bias_increments() -> None:
    policy = ReputationPolicy(alpha=0.3, threshold=0.5, min_observations=2)
    value = None
    for offset in range(4):
        value, _ = reputation_apply(value, _outcome(offset, "invalid"), policy, BIAS)
    value, inc = reputation_apply(value, _outcome(4), policy, BIAS)  # 0.7 x 0.7**4 + 0.3 = 0.468
    assert value is not None and inc is not None
    record = reputation_record("oracle", value, policy)
    assert record.downweighted and record.weight == pytest.approx(record.score) and record.score < 0.5
    assert inc.weight == pytest.approx(record.score)


def test_rejected_or_sampled_out_or_undirected_events_forward_nothing() -> None:
    assert reputation_apply(None, _outcome(1, "rate_limited"), POLICY, BIAS)[1] is None
    sampled = Outcome("o", "bad_output", "info", "accepted", kept=False, ts_s=1.0, model_version=None,
                      partition=0, offset=1)  # fmt: skip
    assert reputation_apply(None, sampled, POLICY, BIAS)[1] is None
    assert reputation_apply(None, _outcome(1, type_="thumbs"), POLICY, BIAS)[1] is None


def test_bias_scoping_by_model_version() -> None:
    scoped = BiasConfig(by_model_version=True)
    _, inc = reputation_apply(None, _outcome(1), POLICY, scoped)
    assert inc is not None and inc.key == "increase_grounding|m-1"
    assert split_bias_key(inc.key) == ("increase_grounding", "m-1") and bias_key("x") == "x"


def _inc(offset: int, *, source: str = "oracle", partition: int = 0, ts: float = 0.0) -> BiasIncrement:
    return BiasIncrement("increase_grounding", source, "error", 1.0, ts, partition, offset)


def test_bias_applies_each_source_partition_offset_once() -> None:
    value = bias_apply(None, _inc(7), BIAS)
    assert value is not None and value["value"] == pytest.approx(0.1) and value["events"] == 1
    assert bias_apply(value, _inc(7), BIAS) is None and bias_apply(value, _inc(6), BIAS) is None
    # Another source on the same raw partition is another origin.
    other = bias_apply(value, _inc(2, source="mesh"), BIAS)
    assert other is not None and other["events"] == 2 and other["applied"] == {"oracle|0": 7, "mesh|0": 2}


@settings(max_examples=50, deadline=None)
@given(st.permutations(list(range(8))), st.lists(st.floats(0, 500), min_size=8, max_size=8))
def test_bias_replaying_any_prefix_changes_nothing(order: list[int], times: list[float]) -> None:
    incs = [_inc(i, source=f"s{order[i] % 3}", ts=times[i]) for i in range(8)]
    value = None
    for inc in incs:
        value = bias_apply(value, inc, BIAS) or value
    replayed = value
    for inc in incs[: order[0]]:
        replayed = bias_apply(replayed, inc, BIAS) or replayed
    assert replayed == value


def test_published_records_round_trip() -> None:
    value = bias_apply(None, _inc(1, ts=50.0), BIAS)
    assert value is not None
    record = bias_record("increase_grounding|m-1", value, BIAS)
    assert decode_bias(encode_record(record)) == record
    assert record.model_version == "m-1" and record.at(150.0) == pytest.approx(record.value / 2)
    rep = reputation_record("oracle", {"score": 0.9, "observations": 3, "applied": {}}, POLICY)
    assert decode_reputation(encode_record(rep)) == rep
    with pytest.raises(ValueError, match="not a directive-bias record"):
        decode_bias(b'{"directive": 1}')
    assert BiasRecord("d", None, 1.0, 0.0, 10.0, 1).to_json()["key"] == "d"


def test_throttle_publishes_each_changed_key_at_most_once_per_interval() -> None:
    t = Throttle(1.0)
    t.mark("a")
    t.mark("b")
    assert t.due(0.0) == ["a", "b"]
    t.mark("a")
    assert t.due(0.5) == []  # changed again, but published 0.5 s ago
    assert t.due(1.0) == ["a"]
    assert t.due(5.0) == []  # unchanged keys are not republished ...
    assert t.due(5.0, force=True, known=["a", "c"]) == ["a", "c"]  # ... unless forced


def test_pseudonym_key_rules(tmp_path: Path) -> None:
    local = Settings(state_dir=tmp_path)
    key = pseudonym_key(local)
    assert key is not None and len(key) == 64 and pseudonym_key(local) == key  # generated once, then reused
    assert (tmp_path / "pseudonym.key").stat().st_mode & 0o077 == 0
    assert pseudonym_key(Settings(state_dir=tmp_path, pseudonym_key="x" * 16)) == b"x" * 16
    assert pseudonym_key(Settings(state_dir=tmp_path, pseudonymize_user_id=False)) is None
    with pytest.raises(ConfigError, match="FEEDBACK_PSEUDONYM_KEY: required"):
        pseudonym_key(Settings(state_dir=tmp_path / "remote", bootstrap_servers="kafka:9092"))
    with pytest.raises(ConfigError, match="at least 16"):
        pseudonym_key(Settings(state_dir=tmp_path, pseudonym_key="short"))


def test_gate_config_from_settings(tmp_path: Path) -> None:
    config = gate_config(
        Settings(state_dir=tmp_path, rate_limit_per_minute=120, rate_limit_burst=10,
                 rate_limit_overrides={"oracle": 600}, sample_rates={"implicit": 0.1}, allow_text=True)
    )  # fmt: skip
    assert config.rate_limit.rate_per_s == 2.0 and config.rate_limit.burst == 10
    assert config.source_limits["oracle"].rate_per_s == 10.0 and config.source_limits["oracle"].burst == 600
    assert config.sample_rates == {"implicit": 0.1} and config.allow_text


def test_label_cap_bounds_cardinality() -> None:
    cap = LabelCap(limit=2)
    assert [cap(v) for v in ("a", "b", "c", "a", "d")] == ["a", "b", "other", "a", "other"]


def test_metrics_endpoint_serves_and_a_taken_port_only_disables_it() -> None:
    import socket
    import urllib.request

    from stream_processors.metrics import GateMetrics

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics = GateMetrics()
    metrics.rate_limited.inc(3)
    assert metrics.serve(port)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "feedback_rate_limited_total 3.0" in body
    assert not GateMetrics().serve(port)  # taken: warn, keep running
    assert not GateMetrics().serve(0)

"""Rewards for routers on the real stack: feedback through the worker to feedback.rewards.v1,
the ``feedback rewards`` command, examples/router.py following an arm that gets better, then
worse, and a worker killed mid-stream that still counts every reward once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline.kafka_admin import ensure_topics
from pipeline.settings import PROJECT_ROOT, Settings
from producers.client import FeedbackClient
from producers.producer import FeedbackProducer
from producers.subscriber import RewardSubscriber
from producers.synthetic import generate_events
from schemas.models import FeedbackEvent
from schemas.reward_records import RewardRecord
from tests.integration.pipeline_procs import pipeline_process, run_cli_ok, wait_for

pytestmark = pytest.mark.integration

ROUTER = PROJECT_ROOT / "examples" / "router.py"
PROMPT = "p-1"


def _route(settings: Settings, strategy: str, requests: int, seed: int = 0) -> list[str]:
    """The models examples/router.py chooses for ``requests`` requests."""
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(PROJECT_ROOT)}
    out = subprocess.run(
        [sys.executable, str(ROUTER), "--models", "m-a,m-b", "--prompt", PROMPT, "--strategy", strategy,
         "--requests", str(requests), "--seed", str(seed)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == requests and all(line.startswith("request=") for line in lines)
    return [line.split()[1].removeprefix("model=") for line in lines]


def test_the_router_follows_an_arm_that_gets_better_then_worse(isolated: Settings, tmp_path: Path) -> None:
    # A half-life of ~30 years: over the test's seconds the decay is below 1e-7 and the means are
    # the plain Beta(1 + ups, 1 + downs) posteriors, so the switch point is known in advance.
    settings = isolated.model_copy(update={"rewards_half_life_s": 1e9, "bias_publish_interval_s": 0.1})
    ensure_topics(settings)
    counter = iter(range(10_000))

    def plant(client: FeedbackClient, model: str, ups: int, downs: int) -> None:
        for i in range(ups + downs):
            client.thumbs(up=i < ups, model_version=model, user_id=f"u-{next(counter)}")  # one subject each
        client.flush()

    with (
        pipeline_process(settings, "worker", tmp_path / "worker.log") as worker,
        FeedbackClient("router-test", settings, prompt_version=PROMPT) as client,
        RewardSubscriber(settings) as rewards,
    ):

        def events_seen(model: str) -> int:
            rewards.poll(0.2)
            return rewards.record((model, PROMPT)).events

        def wait_events(a: int, b: int) -> None:
            wait_for(lambda: (events_seen("m-a"), events_seen("m-b")) == (a, b), 240, f"rewards for {a}+{b} events",
                     [worker])  # fmt: skip

        # m-a better: Beta(11, 1) (mean 0.92) against m-b's Beta(7, 5) (0.58).
        plant(client, "m-a", ups=10, downs=0)
        plant(client, "m-b", ups=6, downs=4)
        wait_events(10, 10)
        assert _route(settings, "best", 5) == ["m-a"] * 5
        assert Counter(_route(settings, "thompson", 100, seed=3))["m-a"] > 80

        # m-a worse, one event at a time: 11/(12 + k) drops under 7/12 at the 7th thumbs-down.
        plant(client, "m-a", ups=0, downs=6)
        wait_events(16, 10)
        assert rewards.mean(("m-a", PROMPT)) == pytest.approx(11 / 18, abs=1e-6)
        assert _route(settings, "best", 5) == ["m-a"] * 5  # 0.611 > 0.583: not yet
        plant(client, "m-a", ups=0, downs=1)
        wait_events(17, 10)
        assert _route(settings, "best", 5) == ["m-b"] * 5  # 0.579 < 0.583: the 7th event switched it

        # Much worse: Beta(11, 21) (0.34); Thompson sends nearly everything to m-b.
        plant(client, "m-a", ups=0, downs=13)
        wait_events(30, 10)
        assert Counter(_route(settings, "thompson", 200, seed=3))["m-b"] > 150

        # feedback rewards: one record per arm, as published.
        rows = {r["model_version"]: r for r in json.loads(run_cli_ok(settings, "rewards", "--json").stdout)}
        assert set(rows) == {"m-a", "m-b"}
        a = rows["m-a"]
        assert set(a) == {"model_version", "prompt_version", "tag", "mean", "ci_low", "ci_high", "weight", "events",
                          "updated_at"}  # fmt: skip
        assert (a["prompt_version"], a["tag"], a["events"]) == (PROMPT, None, 30)
        assert a["mean"] == pytest.approx(11 / 32, abs=1e-5) and a["weight"] == pytest.approx(30, abs=1e-4)
        assert a["ci_low"] < a["mean"] < a["ci_high"] < rows["m-b"]["mean"] + 0.3
        watched = run_cli_ok(settings, "rewards", "watch", "--json", "--max-seconds", "1").stdout.splitlines()
        assert sorted(json.loads(line)["model_version"] for line in watched) == ["m-a", "m-b"]


N_KILL = 30_000


def _rewards_after(settings: Settings, tmp: Path, events: list[FeedbackEvent], kill: bool) -> dict[str, RewardRecord]:
    """Publish ``events``, run the worker to the end (SIGKILLed once mid-stream with ``kill``),
    and return every arm's final record."""
    tmp.mkdir(parents=True, exist_ok=True)
    ensure_topics(settings)
    with FeedbackProducer(settings) as producer:
        producer.send_many(events)
    with RewardSubscriber(settings) as rewards:

        def applied() -> int:
            rewards.poll(0.2)
            return sum(r.events for r in rewards.records.values() if r.tag is None)

        if kill:
            with pipeline_process(settings, "worker", tmp / "worker-killed.log") as worker:
                wait_for(lambda: applied() >= N_KILL // 4, 240, "a quarter of the rewards", [worker])
                worker.kill()  # SIGKILL: no commit, no flush
                worker.wait(10)
            assert applied() < N_KILL, "the kill came after the stream was done: the test proves nothing"
        with pipeline_process(settings, "worker", tmp / "worker.log") as worker:
            wait_for(lambda: applied() >= N_KILL, 240, "every reward", [worker])
            time.sleep(1.0)  # anything counted twice would show by now
            assert applied() == N_KILL
            return dict(rewards.records)


def test_a_worker_killed_mid_stream_counts_every_reward_once(isolated: Settings, tmp_path: Path) -> None:
    # Distinct users (no rate limit), every source trusted (weights 1): the final posterior of
    # each arm is fixed by the events alone, decayed over their hour with a 10-minute half-life.
    events = [e.model_copy(update={"user_id": f"u-{i}"}) for i, e in enumerate(generate_events(N_KILL, seed=9))]
    common = {"kafka_session_timeout_s": 6.0, "bias_publish_interval_s": 0.2, "rewards_half_life_s": 600.0}
    calm = _rewards_after(
        isolated.model_copy(update={**common, "topic_prefix": isolated.topic_prefix + "calm."}), tmp_path / "calm",
        events, kill=False,
    )  # fmt: skip
    crashed = _rewards_after(
        isolated.model_copy(update={**common, "topic_prefix": isolated.topic_prefix + "kill."}), tmp_path / "kill",
        events, kill=True,
    )  # fmt: skip
    assert set(crashed) == set(calm) and len(calm) == 4  # two models x two prompts
    for key, record in calm.items():
        other = crashed[key]
        assert other.events == record.events and other.updated_s == record.updated_s, key
        assert (other.alpha, other.beta) == (
            pytest.approx(record.alpha, rel=1e-9),
            pytest.approx(record.beta, rel=1e-9),
        )

"""A model router that picks a model per request from the live reward stream.

It follows ``feedback.rewards.v1`` with :class:`~producers.subscriber.RewardSubscriber`
and, for every request, chooses one of the candidate models for a prompt version (and,
optionally, a context tag, when the worker keeps context arms: FEEDBACK_REWARDS_CONTEXT_TAGS):

* ``--strategy thompson`` (default): Thompson sampling, one draw from each model's reward
  posterior, the highest wins. Unsure arms still get tried; a seed makes the choices
  reproducible.
* ``--strategy best``: the highest posterior mean (ties: more evidence, then the smaller
  arm key).

Each request prints one line: ``request=<n> model=<chosen>`` and every candidate's mean
reward and event count as the router saw them::

    .venv/bin/python examples/router.py --models m-a,m-b --prompt p-1 --requests 20

A real router would call the chosen model here, and later send the user's feedback with
the same ``model_version`` and ``prompt_version``: that feedback becomes the next rewards.
"""

from __future__ import annotations

import argparse
import time

from producers.subscriber import RewardSubscriber
from schemas.reward_records import Arm


def main() -> None:
    parser = argparse.ArgumentParser(description="Route requests between models by their live rewards.")
    parser.add_argument("--models", required=True, help="Candidate model versions, comma-separated.")
    parser.add_argument("--prompt", default=None, help="The prompt version the requests use.")
    parser.add_argument("--tag", default=None, help="The requests' context tag (a context arm).")
    parser.add_argument("--requests", type=int, default=10, help="How many requests to route.")
    parser.add_argument("--strategy", choices=("thompson", "best"), default="thompson")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the Thompson draws.")
    parser.add_argument("--interval-s", type=float, default=0.0, help="Wait for updates this long between requests.")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="Stop after this long in any case.")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or args.requests < 1:
        parser.error("--models needs at least one model and --requests at least 1")
    arms = [Arm(model, args.prompt, args.tag) for model in models]
    deadline = time.monotonic() + args.max_seconds
    with RewardSubscriber(seed=args.seed) as rewards:
        rewards.snapshot()
        for n in range(1, args.requests + 1):
            if n > 1:
                rewards.poll(args.interval_s)  # take the updates published meanwhile
            chosen = rewards.sample(arms) if args.strategy == "thompson" else rewards.best(arms)
            seen = " ".join(f"{a.model_version}={rewards.mean(a):.4f}/{rewards.record(a).events}" for a in arms)
            print(f"request={n} model={chosen.model_version} {seen}", flush=True)
            if time.monotonic() >= deadline:
                break


if __name__ == "__main__":
    main()

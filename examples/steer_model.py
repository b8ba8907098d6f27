"""A stream consumer steering a toy model with directive bias.

The toy model has a temperature and a grounding switch. It follows
``feedback.directive-bias.v1``: more ``reduce_novelty`` lowers the temperature,
``increase_grounding`` above 0.3 turns retrieval grounding on, ``boost_safety``
above 0.3 turns on the strict safety filter.

    .venv/bin/python examples/steer_model.py --max-seconds 30
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from producers.subscriber import BiasSubscriber


@dataclass
class ToyModel:
    base_temperature: float = 0.9
    temperature: float = 0.9
    grounding: bool = False
    strict_safety: bool = False

    def steer(self, bias: BiasSubscriber) -> None:
        self.temperature = round(self.base_temperature * (1 - 0.6 * bias.current("reduce_novelty")), 3)
        self.grounding = bias.current("increase_grounding") > 0.3
        self.strict_safety = bias.current("boost_safety") > 0.3


def main() -> None:
    parser = argparse.ArgumentParser(description="Steer a toy model from directive bias.")
    parser.add_argument("--max-seconds", type=float, default=30.0)
    args = parser.parse_args()
    model = ToyModel()
    with BiasSubscriber() as bias:
        bias.snapshot()
        deadline = time.monotonic() + args.max_seconds
        while True:
            model.steer(bias)
            print(f"temperature={model.temperature} grounding={model.grounding} strict_safety={model.strict_safety}",
                  flush=True)  # fmt: skip
            if time.monotonic() >= deadline:
                break
            bias.poll(1.0)


if __name__ == "__main__":
    main()

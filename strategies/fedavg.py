"""FedAvg over LoRA (FedIT): weighted mean of A and of B separately.

Not exact: mean(B) @ mean(A) differs from mean(B @ A); the difference is reported.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlora.strategies.base import (
    Aggregate,
    AdapterStrategy,
    ClientUpdate,
    State,
    lora_deltas,
    mean_of_deltas,
    relative_error,
    weighted_mean,
    weights,
)


class FedAvg(AdapterStrategy):
    name = "fedavg"

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> Aggregate:
        ws = weights(updates)
        new_state = dict(global_state)
        for name in updates[0].state:
            new_state[name] = weighted_mean([u.state[name] for u in updates], ws)
        s = self.spec.scaling
        target = mean_of_deltas([lora_deltas({**global_state, **u.state}, s) for u in updates], ws)
        return Aggregate(new_state, relative_error(lora_deltas(new_state, s), target))

"""FLoRA: stacking. Each round every sampled client trains fresh A_k, B_k of its own rank r_k.

The server stacks A = [p_1 s_1 A_1; ...; p_K s_K A_K] and B = [B_1 ... B_K], so that
B @ A = Σ p_k s_k B_k A_k exactly, whatever the ranks. That product is merged into the
base weights: the global state keeps each round's stacked pair as
``merged.<round>.<module>.lora_A/B.weight`` (scaling folded into A), and a client
receives the pairs of every round it has not seen yet, so one that missed rounds
still rebuilds the right base weights. The head is averaged as in FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedlora.adapters import ROLE_A, ROLE_B, ROLE_HEAD, LoRASpec, module_of, reset_adapters, role_of
from fedlora.strategies.base import (
    MERGED,
    Aggregate,
    AdapterStrategy,
    ClientUpdate,
    Shape,
    State,
    UpdateRejected,
    lora_deltas,
    mean_of_deltas,
    relative_error,
    weighted_mean,
    weights,
    with_rank,
)

MAX_RANK = 1024


class FLoRA(AdapterStrategy):
    name = "flora"
    trained_roles = (ROLE_A, ROLE_B, ROLE_HEAD)

    def client_spec(self, rank: int | None = None) -> LoRASpec:
        return with_rank(self.spec, rank or self.spec.rank)

    def setup(self, initial_state: State) -> State:
        super().setup(initial_state)
        return {n: t for n, t in initial_state.items() if role_of(n) == ROLE_HEAD}

    def catch_up(self, global_state: State, last_seen: int | None) -> State:
        since = -1 if last_seen is None else last_seen
        return {n: t for n, t in global_state.items() if (m := MERGED.match(n)) and int(m.group(1)) > since}

    def expected_update_shapes(self, global_state: State) -> dict[str, Shape]:
        shapes: dict[str, Shape] = {n: tuple(t.shape) for n, t in global_state.items() if role_of(n) == ROLE_HEAD}
        for m, (d_out, d_in) in self.module_shapes.items():
            shapes[f"{m}.{ROLE_A}.weight"] = (None, d_in)
            shapes[f"{m}.{ROLE_B}.weight"] = (d_out, None)
        return shapes

    def check_update(self, tensors: State) -> None:
        ranks = set()
        for name, a in tensors.items():
            if role_of(name) != ROLE_A:
                continue
            b = tensors[f"{module_of(name)}.{ROLE_B}.weight"]
            if a.shape[0] != b.shape[1]:
                raise UpdateRejected(f"{module_of(name)}: A has rank {a.shape[0]} but B has rank {b.shape[1]}")
            ranks.add(a.shape[0])
        if len(ranks) > 1:
            raise UpdateRejected(f"one client must use one rank, got {sorted(ranks)}")
        if ranks and not 1 <= ranks.pop() <= MAX_RANK:
            raise UpdateRejected(f"rank outside 1..{MAX_RANK}")

    def materialize(self, model: nn.Module, state: State) -> None:
        super().materialize(model, state)
        reset_adapters(model)  # B = 0: everything learnt lives in the merged base weights

    def prepare_client_model(self, model: nn.Module, state: State, seed: int) -> None:
        self.materialize(model, state)
        reset_adapters(model, torch.Generator().manual_seed(seed))  # fresh A_k (seeded), B_k = 0

    def export_adapter(self, global_state: State) -> tuple[State, float]:
        return self.stacked_adapter(global_state), 1.0

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate], round_num: int = 1) -> Aggregate:
        ws = weights(updates)
        new_state = dict(global_state)
        heads = [n for n in updates[0].state if role_of(n) == ROLE_HEAD]
        for name in heads:
            new_state[name] = weighted_mean([u.state[name] for u in updates], ws)
        actual = {}
        for m in self.module_shapes:
            a_parts, b_parts = [], []
            for u, w in zip(updates, ws):
                a = u.state[f"{m}.{ROLE_A}.weight"].to(torch.float64)
                scaling = self.spec.alpha / a.shape[0]
                a_parts.append(w * scaling * a)
                b_parts.append(u.state[f"{m}.{ROLE_B}.weight"].to(torch.float64))
            a_stack, b_stack = torch.cat(a_parts, 0), torch.cat(b_parts, 1)
            new_state[f"merged.{round_num}.{m}.{ROLE_A}.weight"] = a_stack.to(torch.float32)
            new_state[f"merged.{round_num}.{m}.{ROLE_B}.weight"] = b_stack.to(torch.float32)
            actual[m] = b_stack.to(torch.float32).to(torch.float64) @ a_stack.to(torch.float32).to(torch.float64)
        target = mean_of_deltas([lora_deltas(u.state, self.spec.alpha) for u in updates], ws)
        return Aggregate(new_state, relative_error(actual, target))

    def stacked_adapter(self, global_state: State) -> State:
        """All merged rounds as one standard LoRA pair per module (scaling 1), plus the head."""
        out = {n: t for n, t in global_state.items() if role_of(n) == ROLE_HEAD}
        for m in self.module_shapes:
            rounds = sorted(int(MERGED.match(n).group(1)) for n in global_state if n.startswith("merged.") and n.endswith(f".{m}.{ROLE_A}.weight"))
            if rounds:
                out[f"{m}.{ROLE_A}.weight"] = torch.cat([global_state[f"merged.{t}.{m}.{ROLE_A}.weight"] for t in rounds], 0)
                out[f"{m}.{ROLE_B}.weight"] = torch.cat([global_state[f"merged.{t}.{m}.{ROLE_B}.weight"] for t in rounds], 1)
        return out

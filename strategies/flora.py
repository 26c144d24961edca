"""FLoRA: stacking. Each round every sampled client trains fresh A_k, B_k of its own rank r_k.

The server stacks A = [p_1 s_1 A_1; ...; p_K s_K A_K] and B = [B_1 ... B_K], so that
B @ A = Σ p_k s_k B_k A_k exactly, whatever the ranks. That product is merged into the
base weights: the global state keeps each round's stacked pair as
``merged.<round>.<module>.lora_A/B.weight`` (scaling folded into A), and a client
receives the pairs of every round it has not seen yet, so one that missed rounds
still rebuilds the right base weights. The head is averaged as in FedAvg.

The history is bounded: once a module's stacked rank passes ``history_rank``, every round
before the latest is folded into one base pair ``merged.0.<module>...`` by an SVD of their
summed product. A module whose smaller side is at most ``history_rank`` keeps every
direction, so the fold is exact; a larger one keeps the top ``history_rank // 2``. A client
that receives a base drops the history it holds; catch-up never exceeds the base plus one
round's stack. What a truncation drops shows in that round's ``aggregation_error``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedlora.ml.adapters import ROLE_A, ROLE_B, ROLE_HEAD, LoRASpec, module_of, reset_adapters, role_of
from fedlora.strategies.base import (
    MERGED,
    AdapterStrategy,
    Aggregate,
    ClientUpdate,
    PerClientRank,
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

MAX_RANK = 64  # a client-chosen rank; more would only help a client outweigh the others
HISTORY_RANK = 512
BASE_ROUND = 0  # merged.0.*: the compressed history of every round before the base's first kept round


def merged_round(name: str) -> int | None:
    match = MERGED.match(name)
    return int(match.group(1)) if match else None


class FLoRA(AdapterStrategy, PerClientRank):
    name = "flora"
    trained_roles = (ROLE_A, ROLE_B, ROLE_HEAD)

    def __init__(self, spec: LoRASpec, max_rank: int = MAX_RANK, history_rank: int = HISTORY_RANK):
        super().__init__(spec)
        self.max_rank = max(max_rank, spec.rank)
        self.history_rank = history_rank

    def client_spec(self, rank: int | None = None) -> LoRASpec:
        return with_rank(self.spec, rank or self.spec.rank)

    def setup(self, initial_state: State) -> State:
        super().setup(initial_state)
        return {n: t for n, t in initial_state.items() if role_of(n) == ROLE_HEAD}

    def catch_up(self, global_state: State, last_seen: int | None) -> State:
        """Every round after ``last_seen``; the whole (compressed) history for a client that
        has not yet received the current base."""
        rounds = {n: r for n in global_state if (r := merged_round(n)) is not None}
        kept_from = (
            min((r for r in rounds.values() if r != BASE_ROUND), default=None)
            if BASE_ROUND in rounds.values()
            else None
        )
        if last_seen is None or (kept_from is not None and last_seen < kept_from):
            since = -1
        else:
            since = last_seen
        return {n: global_state[n] for n, r in rounds.items() if r > since}

    def hold(self, held: State, received: State) -> State:
        """A received base replaces the history a client holds: it already sums it."""
        if any(merged_round(n) == BASE_ROUND for n in received):
            held = {n: t for n, t in held.items() if not n.startswith("merged.")}
        return super().hold(held, received)

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
        if ranks and not 1 <= ranks.pop() <= self.max_rank:
            raise UpdateRejected(f"rank outside 1..{self.max_rank}")

    def shrink(self, global_state: State, tensors: State, factor: float) -> State:
        """Fresh adapters: the dense update is linear in B, so scale B (and the head's change), not A."""
        shrunk = super().shrink(global_state, tensors, factor)
        return {n: t if role_of(n) == ROLE_A else shrunk[n] for n, t in tensors.items()}

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
            a_stack, b_stack = torch.cat(a_parts, 0).to(torch.float32), torch.cat(b_parts, 1).to(torch.float32)
            new_state[f"merged.{round_num}.{m}.{ROLE_A}.weight"] = a_stack
            new_state[f"merged.{round_num}.{m}.{ROLE_B}.weight"] = b_stack
            # the global dense change this round, what a fold of the history drops included
            actual[m] = b_stack.to(torch.float64) @ a_stack.to(torch.float64) + self._bound_history(
                new_state, m, round_num
            )
        target = mean_of_deltas([lora_deltas(u.state, self.spec.alpha) for u in updates], ws)
        return Aggregate(new_state, relative_error(actual, target))

    def _bound_history(self, state: State, module: str, round_num: int) -> torch.Tensor | float:
        """Fold every round before ``round_num`` into the base pair once the stack is too deep;
        returns the change that made to the module's merged update (0 when there was no fold)."""
        suffix = f".{module}.{ROLE_A}.weight"
        rounds = sorted(r for n in state if n.endswith(suffix) and (r := merged_round(n)) is not None)
        if sum(state[f"merged.{r}{suffix}"].shape[0] for r in rounds) <= self.history_rank:
            return 0.0
        folded = [r for r in rounds if r != round_num]
        total = sum(
            state.pop(f"merged.{r}.{module}.{ROLE_B}.weight").to(torch.float64)
            @ state.pop(f"merged.{r}{suffix}").to(torch.float64)
            for r in folded
        )
        u, sing, vh = torch.linalg.svd(total, full_matrices=False)
        numerical_rank = int((sing > sing[0] * 1e-12).sum()) if float(sing[0]) > 0 else 1
        kept = sing.shape[0] if sing.shape[0] <= self.history_rank else self.history_rank // 2  # exact when it fits
        k = max(1, min(kept, numerical_rank))
        base_b, base_a = (
            u[:, :k].contiguous().to(torch.float32),
            (sing[:k, None] * vh[:k]).contiguous().to(torch.float32),
        )
        state[f"merged.{BASE_ROUND}.{module}.{ROLE_B}.weight"], state[f"merged.{BASE_ROUND}{suffix}"] = base_b, base_a
        return base_b.to(torch.float64) @ base_a.to(torch.float64) - total

    def stacked_adapter(self, global_state: State) -> State:
        """All merged rounds as one standard LoRA pair per module (scaling 1), plus the head."""
        out = {n: t for n, t in global_state.items() if role_of(n) == ROLE_HEAD}
        for m in self.module_shapes:
            rounds = sorted(
                r for n in global_state if n.endswith(f".{m}.{ROLE_A}.weight") and (r := merged_round(n)) is not None
            )
            if rounds:
                out[f"{m}.{ROLE_A}.weight"] = torch.cat(
                    [global_state[f"merged.{t}.{m}.{ROLE_A}.weight"] for t in rounds], 0
                )
                out[f"{m}.{ROLE_B}.weight"] = torch.cat(
                    [global_state[f"merged.{t}.{m}.{ROLE_B}.weight"] for t in rounds], 1
                )
        return out

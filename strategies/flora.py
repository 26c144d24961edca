"""FLoRA: stacking. Each round every sampled client trains fresh A_k, B_k of its own rank r_k.

The server stacks A = [p_1 s_1 A_1; ...; p_K s_K A_K] and B = [B_1 ... B_K], so that
B @ A = Σ p_k s_k B_k A_k exactly, whatever the ranks. That product is merged into the
base weights: the global state keeps each round's stacked pair as
``merged.<round>.<module>.lora_A/B.weight`` (scaling folded into A), and a client
receives the pairs of every round it has not seen yet, so one that missed rounds
still rebuilds the right base weights. The head is averaged as in FedAvg.

The history is bounded, so that every download fits the transport: a module's merged
history (every pair the global state keeps for it) never holds more than ``history_bound``
ranks, whatever the number of clients. ``setup`` derives that bound from the module shapes:
the largest rank at which every module's whole history, with the head and the payload's
headers, at the wire dtype, fits in ``download_bytes`` (``--max-update-mb``, at most the
decoder's limit: a download no larger than the largest update a client may send), and
never above ``history_rank``. Any catch-up is a part of that history, so no download passes it.

When a round would take a module past the bound, its whole history, this round included,
is re-factorised by an SVD of its product, taken in the small space (a QR of each stacked
factor, then the SVD of their R x R core, min(d_out, n) x min(d_in, n) for n stacked ranks;
no larger product is formed), into the base pair ``merged.0.<module>`` and, for the fold's
last kept direction, the round's own pair: a client that held the round before sees a
newer round and fetches the base with it. The product has rank at most min(d_out, d_in),
so a module whose smaller side is at most the bound keeps every direction and the fold is
exact, however many ranks the round stacked (65 clients at rank 8 included); a larger one
keeps its top ``history_bound`` directions. ``aggregation_error`` measures what the stored
history really changed (old pairs out, new ones in) against Σ p_k ΔW_k, so what a
truncation drops, and the float32 rounding of a re-factorised history, show in that
round's error. A client that receives a base drops the history it holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedlora.config import RunConfig
from fedlora.config.choices import MAX_PAYLOAD_BYTES, WIRE_DTYPE_BYTES
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
    weighted_mean,
    weights,
    with_rank,
)

MAX_RANK = 64  # a client-chosen rank; more would only help a client outweigh the others
HISTORY_RANK = 512  # the most ranks a module's history keeps, however large a download may be
MIN_HISTORY = 2  # the base and the round's own pair, one direction each
BASE_ROUND = 0  # merged.0.*: the compressed history of every round before the base's first kept round
MIB = 1024 * 1024
PAYLOAD_OVERHEAD = 64 * 1024  # a download's header fields, generously
TENSOR_OVERHEAD = 64  # one tensor's entry besides its name and data (role, shape, dtype, lengths), generously
NUMERICAL_RANK = 1e-12  # singular values below this fraction of the largest are rounding, not directions


def merged_round(name: str) -> int | None:
    match = MERGED.match(name)
    return int(match.group(1)) if match else None


def merged_name(round_num: int, module: str, role: str) -> str:
    return f"merged.{round_num}.{module}.{role}.weight"


def module_history(state: State, module: str) -> list[int]:
    """The rounds whose pairs ``state`` keeps for ``module``, oldest first (the base's 0 first)."""
    name = f"{module}.{ROLE_A}.weight"
    return sorted(int(match.group(1)) for n in state if (match := MERGED.match(n)) and match.group(2) == name)


def full_product(left: torch.Tensor, right: torch.Tensor) -> bool:
    """Whether the small core would be the d_out x d_in product itself (n stacked ranks >= both sides)."""
    return left.shape[1] >= max(left.shape[0], right.shape[1])


def product_svd(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``left @ right = u · diag(s) · vh`` (thin), from QRs of both factors and the SVD of the
    core of their R factors: at most min(d_out, n) x min(d_in, n) for n stacked ranks."""
    if full_product(left, right):
        return torch.linalg.svd(left @ right, full_matrices=False)
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    return q_left @ u, s, vh @ q_right.T


def product_sq_norm(left: torch.Tensor, right: torch.Tensor) -> float:
    """||left @ right||_F², through the same small core."""
    if full_product(left, right):
        return float(torch.sum((left @ right) ** 2))
    return float(torch.sum((torch.linalg.qr(left).R @ torch.linalg.qr(right.T).R.T) ** 2))


class FLoRA(AdapterStrategy, PerClientRank):
    name = "flora"
    trained_roles = (ROLE_A, ROLE_B, ROLE_HEAD)

    def __init__(
        self,
        spec: LoRASpec,
        max_rank: int = MAX_RANK,
        history_rank: int = HISTORY_RANK,
        download_bytes: int | None = None,
        wire_dtype: str = "fp32",
    ):
        super().__init__(spec)
        self.max_rank = max(max_rank, spec.rank)
        self.history_rank = max(MIN_HISTORY, history_rank)
        self.download_bytes = download_bytes  # None: no cap, history_rank alone bounds the history
        self.wire_bytes = WIRE_DTYPE_BYTES[wire_dtype]
        self.history_bound = self.history_rank  # narrowed by setup, once the module shapes are known

    @classmethod
    def from_config(cls, spec: LoRASpec, cfg: RunConfig) -> FLoRA:
        # a download within one update's limit: the SuperLink's cap is twice that, and clients decode at most 256 MiB
        download = min(cfg.max_update_mb * MIB, MAX_PAYLOAD_BYTES)
        return cls(spec, download_bytes=download, wire_dtype=cfg.wire_dtype)

    def client_spec(self, rank: int | None = None) -> LoRASpec:
        return with_rank(self.spec, rank or self.spec.rank)

    def setup(self, initial_state: State) -> State:
        super().setup(initial_state)
        head = {n: t for n, t in initial_state.items() if role_of(n) == ROLE_HEAD}
        self.history_bound = self.fitting_rank(head)
        return head

    def fitting_rank(self, head: State) -> int:
        """The most ranks per module whose whole history, with ``head``, fits one download."""
        if self.download_bytes is None or not self.module_shapes:
            return self.history_rank
        fixed = PAYLOAD_OVERHEAD + sum(t.numel() * self.wire_bytes + len(n) + TENSOR_OVERHEAD for n, t in head.items())
        # per rank: its column of B and row of A, and at worst a pair of its own (a round of rank 1)
        per_rank = sum(
            (d_out + d_in) * self.wire_bytes + 2 * (len(merged_name(10**9, m, ROLE_A)) + TENSOR_OVERHEAD)
            for m, (d_out, d_in) in self.module_shapes.items()
        )
        fits = (self.download_bytes - fixed) // per_rank
        return max(MIN_HISTORY, min(self.history_rank, fits))  # below 2 no client's rank-2 update would fit either

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
        for name in (n for n in updates[0].state if role_of(n) == ROLE_HEAD):
            new_state[name] = weighted_mean([u.state[name] for u in updates], ws)
        num = den = 0.0
        for m in self.module_shapes:
            a_parts, b_parts = [], []
            for u, w in zip(updates, ws):
                a = u.state[f"{m}.{ROLE_A}.weight"].to(torch.float64)
                a_parts.append(w * (self.spec.alpha / a.shape[0]) * a)
                b_parts.append(u.state[f"{m}.{ROLE_B}.weight"].to(torch.float64))
            stack = torch.cat(b_parts, 1), torch.cat(a_parts, 0)  # their product: Σ p_k s_k B_k A_k, the target
            new_state[merged_name(round_num, m, ROLE_B)] = stack[0].to(torch.float32)
            new_state[merged_name(round_num, m, ROLE_A)] = stack[1].to(torch.float32)
            self._bound_history(new_state, m, round_num, stack)
            # what the stored history changed (pairs dropped out, pairs come in) minus the target
            lefts, rights = [-stack[0]], [stack[1]]
            for state, sign in ((new_state, 1.0), (global_state, -1.0)):
                other = global_state if sign > 0 else new_state
                for r in module_history(state, m):
                    b, a = state[merged_name(r, m, ROLE_B)], state[merged_name(r, m, ROLE_A)]
                    if other.get(merged_name(r, m, ROLE_A)) is not a or other.get(merged_name(r, m, ROLE_B)) is not b:
                        lefts.append(sign * b.to(torch.float64))
                        rights.append(a.to(torch.float64))
            num += product_sq_norm(torch.cat(lefts, 1), torch.cat(rights, 0))
            den += product_sq_norm(*stack)
        error = (0.0 if num == 0.0 else float("inf")) if den == 0.0 else (num / den) ** 0.5
        return Aggregate(new_state, error)

    def _bound_history(
        self, state: State, module: str, round_num: int, stack: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        """Refactorise the module's whole history, this round's ``stack`` (float64) included,
        once it holds more than ``history_bound`` ranks: exactly when its product's rank fits,
        otherwise its top ``history_bound`` directions."""
        rounds = module_history(state, module)
        if sum(state[merged_name(r, module, ROLE_A)].shape[0] for r in rounds) <= self.history_bound:
            return
        lefts, rights = [], []
        for r in rounds:
            b, a = state.pop(merged_name(r, module, ROLE_B)), state.pop(merged_name(r, module, ROLE_A))
            b, a = stack if r == round_num else (b.to(torch.float64), a.to(torch.float64))
            lefts.append(b)
            rights.append(a)
        u, sing, vh = product_svd(torch.cat(lefts, 1), torch.cat(rights, 0))
        numerical = int((sing > sing[0] * NUMERICAL_RANK).sum()) if sing.numel() and float(sing[0]) > 0 else 0
        k = max(MIN_HISTORY, min(numerical, self.history_bound))
        b_new, a_new = u[:, :k], sing[:k, None] * vh[:k]
        if b_new.shape[1] < k:  # a module with a side of 1: pad with zero directions
            b_new = torch.cat([b_new, b_new.new_zeros(b_new.shape[0], k - b_new.shape[1])], 1)
            a_new = torch.cat([a_new, a_new.new_zeros(k - a_new.shape[0], a_new.shape[1])], 0)
        b_new, a_new = b_new.to(torch.float32), a_new.to(torch.float32)
        for r, cols in ((BASE_ROUND, slice(0, k - 1)), (round_num, slice(k - 1, k))):
            state[merged_name(r, module, ROLE_B)] = b_new[:, cols].contiguous()
            state[merged_name(r, module, ROLE_A)] = a_new[cols].contiguous()

    def stacked_adapter(self, global_state: State) -> State:
        """All merged rounds as one standard LoRA pair per module (scaling 1), plus the head."""
        out = {n: t for n, t in global_state.items() if role_of(n) == ROLE_HEAD}
        for m in self.module_shapes:
            rounds = module_history(global_state, m)
            if rounds:
                out[f"{m}.{ROLE_A}.weight"] = torch.cat([global_state[merged_name(t, m, ROLE_A)] for t in rounds], 0)
                out[f"{m}.{ROLE_B}.weight"] = torch.cat([global_state[merged_name(t, m, ROLE_B)] for t in rounds], 1)
        return out

"""How far a colluding minority within the bounds steers the aggregate, with small tensors.

    python simulations/direction_benchmark.py [--seeds 5] [--dim 64]

Runs the coordinator's defence pipeline as the bridge does (weight cap, effect-norm screen,
the strategy's aggregate) on synthetic updates, no training. Two measurements:

- **Steering** (FFA-LoRA, rank 4): honest clients send B updates that are either aligned (a
  shared direction plus 20% noise) or noise-dominated (independent directions, as under
  DP-SGD); the attackers all push one fixed direction, orthogonal in expectation, scaled to
  just under the norm bound (0.99 x multiple x the honest median effect) and claiming 10**12
  examples. Printed: the cosine between the aggregate's dense change s·ΔB·A and the
  attackers' direction, mean over seeds (1.0: the attackers own the update).
- **Sketch capture** (Fed-SB's initialisation, rank 8): honest clients sketch a shared
  gradient with a decaying spectrum plus their own noise; one attacker sends a flat-spectrum
  sketch orthogonal to its own honest sketch, at the bound, claiming 10**12. Printed: the
  attacker's share of span(B), ||U_attᵀ B||²_F / r, and for reference the same directions'
  share when that client sends its honest sketch (the chance overlap).

Rows: the previous defaults (norm multiple 3, weight cap 2, mean), the current defaults, and
each robust aggregate. The defaults come from fedlora's settings schema.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlora.config import RunConfig
from fedlora.ml.adapters import LoRASpec
from fedlora.strategies import make_strategy
from fedlora.strategies.base import ClientUpdate, State
from fedlora.strategies.combine import Combine
from fedlora.strategies.fedsb import GRAD_U, GRAD_V
from fedlora.strategies.robust import NormScreen, cap_weights

CLAIM = 10**12
DEFAULTS = RunConfig()
MODULE = "m.q"
A, B = f"{MODULE}.lora_A.weight", f"{MODULE}.lora_B.weight"


@dataclass(frozen=True)
class Defences:
    label: str
    multiple: float
    weight_cap: float
    combine: Combine = Combine()
    guard_init: bool = True  # Fed-SB: spectra capped, outlier sketches left out


def defence_rows() -> list[Defences]:
    now = dict(multiple=DEFAULTS.robust_norm_multiple, weight_cap=DEFAULTS.robust_weight_cap)
    return [
        Defences("before (x3 norm, cap 2, mean)", 3.0, 2.0, guard_init=False),
        Defences("defaults", **now),
        Defences("defaults + trimmed-mean 0.2", **now, combine=Combine("trimmed-mean", 0.2)),
        Defences("defaults + trimmed-mean 0.4", **now, combine=Combine("trimmed-mean", 0.4)),
        Defences("defaults + median", **now, combine=Combine("median")),
        Defences("off", 0.0, 0.0, guard_init=False),
    ]


def screened(strategy, global_state: State, updates: Sequence[ClientUpdate], d: Defences) -> list[ClientUpdate]:
    screen = NormScreen(d.multiple, "clip", DEFAULTS.robust_max_norm)
    return screen.screen(
        cap_weights(updates, d.weight_cap),
        lambda t: strategy.effect_norm(global_state, t),
        lambda t, f: strategy.shrink(global_state, t, f),
    ).kept


def steering_cosine(
    d: Defences, honest: int, attackers: int, aligned: bool, seed: int, dim: int, rank: int = 4
) -> float:
    spec = LoRASpec(rank=rank, alpha=2.0 * rank, target_modules=("q",))
    strategy = make_strategy("ffa", spec)
    strategy.combine = d.combine
    gen = torch.Generator().manual_seed(seed)
    state = strategy.setup({A: torch.randn(rank, dim, generator=gen) / dim**0.5, B: torch.zeros(dim, rank)})
    common = torch.randn(dim, rank, generator=gen)
    updates = []
    for k in range(honest):
        noise = torch.randn(dim, rank, generator=gen)
        delta = common + 0.2 * noise if aligned else noise
        updates.append(ClientUpdate(k, {B: 0.01 * delta}, int(torch.randint(80, 120, (1,), generator=gen))))
    norms = [strategy.effect_norm(state, u.state) for u in updates]
    median = float(torch.tensor(norms).median())
    target = torch.randn(dim, rank, generator=gen)
    scale = 0.99 * (d.multiple if d.multiple > 0 else DEFAULTS.robust_norm_multiple) * median
    attack = target * scale / strategy.effect_norm(state, {B: target})
    updates += [ClientUpdate(honest + j, {B: attack}, CLAIM) for j in range(attackers)]
    kept = screened(strategy, state, updates, d)
    new_b = strategy.aggregate(state, kept).state[B].to(torch.float64)
    a = state[A].to(torch.float64)
    gram = a @ a.T
    change, direction = new_b, target.to(torch.float64)

    def inner(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(torch.sum((x @ gram) * y))

    return inner(change, direction) / (inner(change, change) * inner(direction, direction)) ** 0.5


def capture_share(d: Defences, honest: int, seed: int, dim: int, rank: int = 8, attack: bool = True) -> float:
    spec = LoRASpec(rank=rank, alpha=2.0 * rank, target_modules=("q",))
    strategy = make_strategy("fedsb", spec)
    strategy.combine = d.combine
    gen = torch.Generator().manual_seed(seed)
    state = strategy.setup({A: torch.zeros(rank, dim), B: torch.zeros(dim, rank)})
    u0, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
    v0, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
    spectrum = torch.tensor([0.7**i for i in range(dim)])
    shared = u0 @ torch.diag(spectrum) @ v0.T
    updates = []
    for k in range(honest + 1):
        grad = shared + 0.05 * torch.randn(dim, dim, generator=gen)
        updates.append(ClientUpdate(k, strategy.init_reply({MODULE: grad}), 100))
    mine = updates[-1].state  # the attacker's own honest sketch, which it steers away from
    basis_u, _ = torch.linalg.qr(torch.cat([mine[MODULE + GRAD_U], torch.randn(dim, rank, generator=gen)], 1))
    basis_v, _ = torch.linalg.qr(torch.cat([mine[MODULE + GRAD_V], torch.randn(dim, rank, generator=gen)], 1))
    honest_norms = [strategy.init_effect_norm(u.state) for u in updates[:-1]]
    multiple = d.multiple if d.multiple > 0 else DEFAULTS.robust_norm_multiple
    target = 0.99 * multiple * float(torch.tensor(honest_norms).median()) / strategy.init_step
    u_att = basis_u[:, rank:] * (target / rank**0.5)
    if attack:  # else the honest-only initialisation, for the chance overlap with the same directions
        updates[-1] = ClientUpdate(honest, {MODULE + GRAD_U: u_att, MODULE + GRAD_V: basis_v[:, rank:]}, CLAIM)
    screen = NormScreen(d.multiple, "clip", DEFAULTS.robust_max_norm)
    kept = screen.screen(cap_weights(updates, d.weight_cap), strategy.init_effect_norm, strategy.shrink_init).kept
    if d.guard_init:  # as the bridge with the defences on
        kept, _ = strategy.guard_init(kept)
    b = strategy.initialize(state, kept)[B].to(torch.float64)
    att = basis_u[:, rank:].to(torch.float64)
    return float(torch.sum((att.T @ b) ** 2)) / rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()
    seeds = range(args.seeds)
    cases = [("1 of 4, aligned", 3, 1, True), ("1 of 10, noise", 9, 1, False), ("2 of 5, aligned", 3, 2, True)]
    cases.append(("2 of 5, noise", 3, 2, False))
    header = "| defences | " + " | ".join(c[0] for c in cases) + " | sketch capture, 1 of 5 |"
    print(header)
    print("|" + "---|" * (len(cases) + 2))
    for d in defence_rows():
        cells = []
        for _, honest, attackers, aligned in cases:
            values = [steering_cosine(d, honest, attackers, aligned, s, args.dim) for s in seeds]
            cells.append(f"{sum(values) / len(values):.2f}")
        share = [capture_share(d, 4, s, args.dim) for s in seeds]
        cells.append(f"{sum(share) / len(share):.2f}")
        print(f"| {d.label} | " + " | ".join(cells) + " |", flush=True)
    chance = [capture_share(defence_rows()[1], 4, s, args.dim, attack=False) for s in seeds]
    print(f"\nhonest-only initialisation, the same directions' share of span(B): {sum(chance) / len(chance):.2f}")


if __name__ == "__main__":
    main()

"""Norm-based robust aggregation: updates far larger than the round's median are clipped or rejected.

Pure math over client updates; the bridge calls it before the strategy aggregates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlora.strategies.base import ClientUpdate, State


@dataclass
class Screened:
    kept: list[ClientUpdate]
    rejected: list[tuple[ClientUpdate, str]]
    clipped: int


def update_norm(global_state: State, update: ClientUpdate) -> float:
    """L2 norm of what the client changed, over every tensor it sent (new tensors count whole)."""
    total = 0.0
    for name, t in update.state.items():
        ref = global_state.get(name)
        diff = t if ref is None or ref.shape != t.shape else t - ref
        total += float(torch.sum(diff.to(torch.float64) ** 2))
    return total**0.5


def screen_updates(global_state: State, updates: Sequence[ClientUpdate], multiple: float, mode: str = "clip") -> Screened:
    """Updates whose norm exceeds ``multiple`` x the median norm are clipped to that bound
    (``mode="clip"``: direction kept) or left out (``mode="reject"``)."""
    if multiple <= 0 or len(updates) < 2:
        return Screened(list(updates), [], 0)
    norms = [update_norm(global_state, u) for u in updates]
    median = float(torch.tensor(norms).median())
    bound = multiple * median
    kept, rejected, clipped = [], [], 0
    for u, n in zip(updates, norms):
        if n <= bound or bound == 0.0:
            kept.append(u)
        elif mode == "reject":
            rejected.append((u, f"update norm {n:.3g} exceeds {multiple:g} x the round's median norm {median:.3g}"))
        else:
            factor = bound / n
            state = {}
            for name, t in u.state.items():
                ref = global_state.get(name)
                state[name] = t * factor if ref is None or ref.shape != t.shape else ref + (t - ref) * factor
            kept.append(ClientUpdate(u.client_id, state, u.num_examples))
            clipped += 1
    return Screened(kept, rejected, clipped)

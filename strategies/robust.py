"""Bounding any one client's influence on the global model, before and while the strategy aggregates.

Pure math over client updates; the bridge calls it. Three defences, the first two on by default:

- **Weights.** A client's claimed data size is its aggregation weight; it is capped at
  ``weight_cap`` x the round's median claim, so a client claiming 10**15 examples weighs
  at most as much as ``weight_cap`` typical clients.
- **Norms.** Each update's effect norm (what it does to the model, measured by the
  strategy) is compared with ``multiple`` x a reference: the round's median effect norm,
  else the reference carried from earlier rounds, else the absolute ``max_norm``. The
  screen never fails open (a lone update is bounded too), and a minority cannot drag it
  down: a near-zero median does not count, and the reference falls by at most
  ``REFERENCE_DECAY`` a round (a run's first round has no reference to hold it up). Updates above
  the bound are clipped (direction kept) or rejected. This bounds magnitude.
- **Direction** (``--robust-aggregate``). The weighted mean lets a minority within the
  bounds steer the aggregate towards its own direction; a coordinate-wise median or
  trimmed mean of what clients send bounds each coordinate by honest values, for any
  minority below the statistic's breakdown point (half for the median, the trimmed share
  for the trimmed mean). Only for strategies whose aggregate is linear in what is sent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from fedlora.strategies.base import ClientUpdate, State

NormOf = Callable[[State], float]
Shrink = Callable[[State, float], State]
CLIP_TRIES = 8  # shrinking a product of two trained factors (FedAvg) is not linear: re-measure
# A median below this share of the reference (or, before there is one, of ``max_norm``)
# does not set the scale: half of an even round sending almost nothing cannot shrink the
# bound and so clip every honest update.
TINY_EFFECT = 1e-6
# The reference falls by at most this factor a round: honest updates shrink as training
# settles, but a round in which a minority sends tiny updates cannot pull it down at once.
REFERENCE_DECAY = 0.5


@dataclass
class Screened:
    kept: list[ClientUpdate]
    rejected: list[tuple[ClientUpdate, str]] = field(default_factory=list)
    clipped: int = 0
    bound: float | None = None


def lower_median(values: Sequence[float]) -> float:
    """torch's median: the lower middle value, so that one of two clients cannot raise it."""
    return float(torch.tensor(list(values), dtype=torch.float64).median())


def cap_weights(updates: Sequence[ClientUpdate], cap: float) -> list[ClientUpdate]:
    """Each claimed size capped at ``cap`` x the round's median claim (0: no cap)."""
    if cap <= 0 or not updates:
        return list(updates)
    limit = max(1, int(cap * lower_median([u.num_examples for u in updates])))
    return [u if u.num_examples <= limit else replace(u, num_examples=limit) for u in updates]


class NormScreen:
    """Effect norms against a reference that is carried across rounds."""

    def __init__(
        self, multiple: float, mode: str = "clip", max_norm: float = float("inf"), reference: float | None = None
    ):
        self.multiple = multiple
        self.mode = mode
        self.max_norm = max_norm
        self.reference = reference  # the median effect norm carried from earlier rounds

    def bound_for(self, norms: Sequence[float]) -> float:
        """``multiple`` x the reference: the round's median effect norm, never below
        ``REFERENCE_DECAY`` x the carried reference; a round whose median is missing (a lone
        update) or tiny (a minority of near-zero updates in an even round) keeps the reference."""
        median = lower_median(norms) if len(norms) >= 2 else 0.0
        scale = self.reference if self.reference is not None else self.max_norm
        tiny = TINY_EFFECT * scale if math.isfinite(scale) else 0.0
        if median > tiny:
            floor = REFERENCE_DECAY * self.reference if self.reference is not None else 0.0
            self.reference = max(median, floor)
        if self.reference is not None and self.reference > 0:
            return self.multiple * self.reference
        return self.max_norm

    def screen(self, updates: Sequence[ClientUpdate], norm_of: NormOf, shrink: Shrink) -> Screened:
        if self.multiple <= 0 or not updates:
            return Screened(list(updates))
        out = Screened([])
        measured = []
        for u in updates:
            try:
                norm = norm_of(u.state)
            except Exception as exc:  # noqa: BLE001 - one update the math cannot measure is that update's problem
                out.rejected.append((u, f"its effect norm cannot be measured ({type(exc).__name__})"))
                continue
            if math.isfinite(norm):
                measured.append((u, norm))
            else:
                out.rejected.append((u, "its effect norm is not finite"))
        out.bound = bound = self.bound_for([n for _, n in measured])
        for u, n in measured:
            if n <= bound:
                out.kept.append(u)
                continue
            reason = f"update norm {n:.3g} exceeds the bound {bound:.3g} ({self.multiple:g} x the reference norm)"
            if self.mode == "reject":
                out.rejected.append((u, reason))
                continue
            state = clip(u.state, n, bound, norm_of, shrink)
            if state is None:
                out.rejected.append((u, f"{reason}, and clipping did not bring it within"))
                continue
            out.kept.append(replace(u, state=state))
            out.clipped += 1
        return out


def clip(state: State, norm: float, bound: float, norm_of: NormOf, shrink: Shrink) -> State | None:
    """The update shrunk towards the global state until its effect norm is within the bound;
    None when that fails (it cannot, for an effect linear in what is shrunk)."""
    factor = bound / norm
    try:
        for _ in range(CLIP_TRIES):
            clipped = shrink(state, factor)
            got = norm_of(clipped)
            if got <= bound * (1 + 1e-6):
                return clipped
            factor *= bound / got
    except Exception:  # noqa: BLE001 - an update that cannot be shrunk is rejected instead
        return None
    return None

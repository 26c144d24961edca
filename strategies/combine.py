"""How the kept client updates combine into one tensor per name: the weighted mean, or a
coordinate-wise robust statistic (``--robust-aggregate``). Pure math over tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Combine:
    """How the kept updates combine, tensor by tensor and entry by entry (float64):
    ``mean`` is the weighted mean; ``median`` the weighted lower median of each entry;
    ``trimmed-mean`` drops the ``trim`` share of clients at each end of each entry and takes
    the weighted mean of the rest (at least one client is always kept)."""

    how: str = "mean"
    trim: float = 0.2

    @property
    def is_mean(self) -> bool:
        return self.how == "mean"

    def __call__(self, tensors: Sequence[torch.Tensor], ws: Sequence[float]) -> torch.Tensor:
        shape = tensors[0].shape
        stacked = torch.stack([t.to(torch.float64).reshape(-1) for t in tensors])  # K x N
        w = torch.tensor(list(ws), dtype=torch.float64)
        if self.how == "mean":
            out = (w[:, None] * stacked).sum(0)
        else:
            values, order = stacked.sort(0)
            w_sorted = w[order]
            if self.how == "median":
                cum = w_sorted.cumsum(0)
                first = (cum >= 0.5 * cum[-1:] - 1e-12).to(torch.int8).argmax(0, keepdim=True)
                out = values.gather(0, first)[0]
            elif self.how == "trimmed-mean":
                k = min(math.floor(self.trim * len(tensors)), (len(tensors) - 1) // 2)
                kept, kept_w = values[k : len(tensors) - k], w_sorted[k : len(tensors) - k]
                out = (kept * kept_w).sum(0) / kept_w.sum(0)
            else:
                raise ValueError(f"unknown aggregate {self.how!r}")
        return out.reshape(shape)

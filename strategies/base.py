"""The pure interface every aggregation strategy implements: tensors in, tensors out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedlora.adapters import ROLE_A, ROLE_B, ROLE_HEAD, ROLE_R, LoRASpec, module_of, role_of

State = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """What one client sent back: the tensors of the roles it trained, and its data size."""

    client_id: int
    state: State
    num_examples: int


@dataclass
class Aggregate:
    state: State  # the new global adapter state
    error: float  # relative Frobenius error of the global update vs the exact weighted mean


def weights(updates: Sequence[ClientUpdate]) -> list[float]:
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def weighted_mean(tensors: Sequence[torch.Tensor], ws: Sequence[float]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, w in zip(tensors, ws):
        out += w * t.to(torch.float64)
    return out.to(torch.float32)


def lora_deltas(state: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Per adapted module, the dense update s * B @ (R @) A that the state encodes (float64)."""
    modules = sorted({module_of(n) for n in state if role_of(n) == ROLE_A})
    deltas = {}
    for m in modules:
        a = state[f"{m}.{ROLE_A}.weight"].to(torch.float64)
        b = state[f"{m}.{ROLE_B}.weight"].to(torch.float64)
        r = state.get(f"{m}.{ROLE_R}.weight")
        if r is not None:
            a = r.to(torch.float64) @ a
        deltas[m] = scaling * (b @ a)
    return deltas


def relative_error(actual: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> float:
    """||actual - target||_F / ||target||_F over all modules together (0 when the target is 0)."""
    num = sum(float(torch.sum((actual[k] - target[k]) ** 2)) for k in target)
    den = sum(float(torch.sum(target[k] ** 2)) for k in target)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return (num / den) ** 0.5


def mean_of_deltas(deltas: Sequence[Mapping[str, torch.Tensor]], ws: Sequence[float]) -> dict[str, torch.Tensor]:
    return {k: sum(w * d[k] for d, w in zip(deltas, ws)) for k in deltas[0]}


class AdapterStrategy(ABC):
    """One federated LoRA algorithm, free of Flower: what clients train, send, and how it combines."""

    name: str = ""
    trained_roles: tuple[str, ...] = (ROLE_A, ROLE_B, ROLE_HEAD)

    def __init__(self, spec: LoRASpec):
        self.spec = spec

    @property
    def sent_roles(self) -> tuple[str, ...]:
        return self.trained_roles

    def expected_update_shapes(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        """Names and shapes a valid client update must carry."""
        return {n: tuple(t.shape) for n, t in global_state.items() if role_of(n) in self.sent_roles}

    @abstractmethod
    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> Aggregate:
        """Combine the clients' updates into the next global state."""

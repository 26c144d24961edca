"""Aggregation strategies: pure adapter math, one module each, plus one Flower bridge."""

from __future__ import annotations

from fedlora.adapters import LoRASpec
from fedlora.errors import UserError
from fedlora.strategies.base import AdapterStrategy
from fedlora.strategies.fedavg import FedAvg
from fedlora.strategies.fedsb import FedSB
from fedlora.strategies.ffa import FFALoRA
from fedlora.strategies.flora import FLoRA

REGISTRY: dict[str, type[AdapterStrategy]] = {cls.name: cls for cls in (FedAvg, FFALoRA, FLoRA, FedSB)}


def make_strategy(name: str, spec: LoRASpec, init_step: float = 1e-3) -> AdapterStrategy:
    if name not in REGISTRY:
        raise UserError(f"unknown strategy {name!r}: choose from {', '.join(REGISTRY)}")
    if name == "fedsb":
        return FedSB(spec, init_step=init_step)
    return REGISTRY[name](spec)

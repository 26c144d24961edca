"""Aggregation strategies: pure adapter math, one module each, plus one Flower bridge."""

from __future__ import annotations

from fedlora.adapters import LoRASpec
from fedlora.errors import UserError
from fedlora.strategies.base import AdapterStrategy
from fedlora.strategies.fedavg import FedAvg

REGISTRY: dict[str, type[AdapterStrategy]] = {cls.name: cls for cls in (FedAvg,)}


def make_strategy(name: str, spec: LoRASpec) -> AdapterStrategy:
    try:
        return REGISTRY[name](spec)
    except KeyError:
        raise UserError(f"unknown strategy {name!r}: choose from {', '.join(REGISTRY)}") from None

"""Aggregation strategies: pure adapter math, one module each, and the one registry of their names."""

from __future__ import annotations

from fedlora.config import RunConfig
from fedlora.errors import UserError
from fedlora.ml.adapters import LoRASpec
from fedlora.ml.task import lora_spec
from fedlora.strategies.base import AdapterStrategy, FederatedInit, PerClientRank
from fedlora.strategies.combine import Combine
from fedlora.strategies.fedavg import FedAvg
from fedlora.strategies.fedsb import FedSB
from fedlora.strategies.ffa import FFALoRA
from fedlora.strategies.flora import FLoRA

REGISTRY: dict[str, type[AdapterStrategy]] = {cls.name: cls for cls in (FedAvg, FFALoRA, FLoRA, FedSB)}
STRATEGY_NAMES: tuple[str, ...] = tuple(REGISTRY)


def check_strategy(cfg: RunConfig) -> type[AdapterStrategy]:
    """The class ``cfg.strategy`` names, once the settings it cannot honour are ruled out."""
    cls = REGISTRY.get(cfg.strategy)
    if cls is None:
        raise UserError(f"unknown strategy {cfg.strategy!r}: choose from {', '.join(REGISTRY)}")
    if cfg.ranks and not issubclass(cls, PerClientRank):
        capable = ", ".join(n for n, c in REGISTRY.items() if issubclass(c, PerClientRank))
        raise UserError(f"--ranks (one rank per client) needs --strategy {capable}; use --rank otherwise")
    if cfg.robust_aggregate != "mean" and not cls.linear:
        linear = ", ".join(n for n, c in REGISTRY.items() if c.linear)
        raise UserError(
            f"--robust-aggregate {cfg.robust_aggregate} combines what clients send entry by entry, which is "
            f"not a combination of their updates for --strategy {cfg.strategy}: use it with {linear}, or mean"
        )
    return cls


def build_strategy(cfg: RunConfig) -> AdapterStrategy:
    """The strategy a run's settings describe."""
    strategy = check_strategy(cfg).from_config(lora_spec(cfg), cfg)
    strategy.combine = Combine(cfg.robust_aggregate, cfg.robust_trim)
    return strategy


def make_strategy(name: str, spec: LoRASpec, **options: float) -> AdapterStrategy:
    """A strategy by name with an explicit adapter shape (tests and benchmarks); runs use ``build_strategy``."""
    if name not in REGISTRY:
        raise UserError(f"unknown strategy {name!r}: choose from {', '.join(REGISTRY)}")
    return REGISTRY[name](spec, **options)


def init_batches(strategy: AdapterStrategy, cfg: RunConfig) -> int:
    """Batches a client spends on a federated initialisation (0: the strategy has none)."""
    return cfg.init_batches if isinstance(strategy, FederatedInit) else 0


__all__ = [
    "REGISTRY",
    "STRATEGY_NAMES",
    "AdapterStrategy",
    "FederatedInit",
    "PerClientRank",
    "build_strategy",
    "check_strategy",
    "init_batches",
    "make_strategy",
]

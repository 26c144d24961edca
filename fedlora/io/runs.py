"""A finished or interrupted run folder, loaded back: config, labels, strategy, global state, model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from fedlora.config import RunConfig
from fedlora.errors import UserError
from fedlora.io.checkpoint import load_checkpoint
from fedlora.ml.adapters import inject_lora
from fedlora.ml.models import load_base_model
from fedlora.ml.task import initial_adapter_state
from fedlora.strategies import build_strategy
from fedlora.strategies.base import AdapterStrategy, State


@dataclass
class Run:
    path: Path
    cfg: RunConfig
    labels: list[str]
    round: int
    strategy: AdapterStrategy
    state: State

    def model(self) -> nn.Module:
        """A fresh base model carrying this run's global state (merge history included)."""
        net = load_base_model(self.cfg.model, self.cfg.task, len(self.labels), self.cfg.pooling)
        inject_lora(net, self.strategy.client_spec())
        self.strategy.materialize(net, self.state)
        if self.labels:
            net.config.id2label = dict(enumerate(self.labels))
            net.config.label2id = {name: i for i, name in enumerate(self.labels)}
        return net


def is_run_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "checkpoint.safetensors").is_file()


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"run folder not found: {path}")
    if not is_run_dir(path):
        raise UserError(f"{path} is not a fedlora run folder (needs config.json and checkpoint.safetensors)")
    try:
        cfg = RunConfig.from_dict(json.loads((path / "config.json").read_text()))
    except json.JSONDecodeError as exc:
        raise UserError(f"unreadable {path / 'config.json'}: {exc}") from None
    state, meta = load_checkpoint(path)
    labels = meta.get("labels")
    if labels is None or (not labels and cfg.task == "classify"):
        raise UserError(f"checkpoint in {path} records no labels")
    strategy = build_strategy(cfg)
    strategy.setup(initial_adapter_state(cfg.model, len(labels), strategy.spec, cfg.seed, cfg.task, cfg.pooling))
    return Run(path, cfg, list(labels), int(meta["round"]), strategy, state)

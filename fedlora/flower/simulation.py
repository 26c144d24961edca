"""``fedlora simulate``: the coordinator and N virtual clients on Flower's simulation engine (Ray)."""

from __future__ import annotations

import json
import logging
import os
import warnings
from datetime import datetime
from pathlib import Path

from fedlora.client.app import app as honest_client_app
from fedlora.config import RunConfig
from fedlora.errors import UserError
from fedlora.flower.attacks import attacking_client_app
from fedlora.ml.models import resolve_model_path
from fedlora.ml.task import check_target_modules, load_splits
from fedlora.server.app import make_server_app


def default_out_dir(cfg: RunConfig) -> Path:
    return Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.strategy}"


def check_inputs(cfg: RunConfig) -> None:
    """Fail fast, before any worker starts, on bad config, data or model paths."""
    cfg.validate()
    resolve_model_path(cfg.model, cfg.task)
    splits = load_splits(cfg)
    check_target_modules(cfg, max(len(splits.label_names), 1))


def quiet_flower() -> None:
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resume_config(out: str) -> RunConfig:
    """The configuration a run in ``out`` was started with."""
    path = Path(out) / "config.json"
    if not path.is_file():
        raise UserError(f"nothing to resume in {out}: no config.json")
    try:
        cfg = RunConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise UserError(f"unreadable {path}: {exc}") from None
    return cfg


def simulate(cfg: RunConfig, out_dir: Path | None = None, progress=print, resume: bool = False) -> Path:
    from flwr.simulation import run_simulation  # lazy: Ray starts with the simulation module

    check_inputs(cfg)
    out_dir = out_dir or (Path(cfg.out) if cfg.out else default_out_dir(cfg))
    cpus = os.cpu_count() or 1
    progress(f"fedlora simulate: {cfg.strategy}, {cfg.clients} clients, {cfg.rounds} rounds -> {out_dir}")
    quiet_flower()
    backend_config = {
        # one worker using every core: clients train one after another, each at full speed,
        # and the base model sits in memory once
        "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus,
            "logging_level": logging.ERROR,
            "log_to_driver": False,
            "object_store_memory": 200 * 1024 * 1024,
        },
    }
    if cfg.attack_clients:
        progress(
            f"simulated attack: client(s) {list(cfg.attack_clients)} send {cfg.attack_kind!r} updates (scale {cfg.attack_scale:g})"
        )
        client_app = attacking_client_app()
    else:
        client_app = honest_client_app
    run_simulation(
        server_app=make_server_app(cfg, out_dir, progress, resume),
        client_app=client_app,
        num_supernodes=cfg.clients,
        backend_config=backend_config,
    )
    return out_dir

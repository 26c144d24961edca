"""``fedlora simulate``'s Ray resources: the coordinator and N virtual clients on Flower's
simulation runtime (Ray). ``fedlora.deploy.simulate`` starts the run, ``fedlora.flower.checks``
checks its inputs. Torch loads only where a function asks CUDA: ``fedlora simulate`` starts
Flower's SuperLink before it imports torch and the model code."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from datetime import datetime
from pathlib import Path

from fedlora.config import RunConfig
from fedlora.errors import UserError
from fedlora.quiet import verbose


def default_out_dir(cfg: RunConfig) -> Path:
    return Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.strategy}"


# What one simulated client holds on its GPU, estimated: a CUDA context and allocator slack,
# plus 4 bytes per base parameter for each of the fp32 weights, their bf16 autocast copies
# and the activations, gradients and optimizer state that scale with the model (4 in all)
CLIENT_GPU_OVERHEAD = 1.5 * 2**30
CLIENT_GPU_BYTES_PER_PARAMETER = 16


def gpu_share(requested: float | None, clients: int, gpus: int, gpu_bytes: int, parameters: int) -> float:
    """Ray's ``num_gpus`` for each simulated client: ``requested`` when given; else, with
    GPUs, enough of a share that all clients train at once, as far as memory allows (at
    least one client per GPU); without one 0 (the CPU)."""
    if requested is not None:
        return requested
    if gpus == 0:
        return 0.0
    per_client = CLIENT_GPU_OVERHEAD + CLIENT_GPU_BYTES_PER_PARAMETER * parameters
    fit = max(1, int(0.9 * gpu_bytes // per_client))
    per_gpu = max(1, min(math.ceil(clients / gpus), fit))
    return math.floor(10_000 / per_gpu) / 10_000  # Ray counts shares in units of 1e-4


def gpu_workers(share: float, gpus: int, clients: int, cpus: int) -> int:
    """How many simulated clients train at once on ``gpus`` GPUs at ``share`` each: as many
    as the shares allow, at most one per client and one per core."""
    return max(1, min(clients, cpus, int(gpus / share + 1e-9)))


def client_resources(share: float, cpus: int, gpus: int, clients: int) -> dict[str, float]:
    """Ray's resources per simulated client. On the CPU one worker uses every core and serves
    the clients one after another; with a GPU share ``gpu_workers`` workers run at once,
    splitting the cores."""
    if share == 0:
        return {"num_cpus": cpus, "num_gpus": 0.0}
    return {"num_cpus": max(1, cpus // gpu_workers(share, gpus, clients, cpus)), "num_gpus": share}


def base_parameters(cfg: RunConfig) -> int:
    """The base model's parameter count, read from its skeleton (no weights loaded)."""
    from fedlora.ml.models import model_skeleton  # lazy: transformers, for a GPU share alone

    return sum(p.numel() for p in model_skeleton(cfg.model, cfg.task, 2, cfg.pooling).parameters())


def quiet_flower() -> None:
    """Flower's and Ray's loggers at WARNING and Python warnings off, unless ``--verbose``."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose():
        return
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


def clients_train_on_cpu(cfg: RunConfig) -> bool:
    """Simulated clients train on this machine's CPU: no GPU share asked for, or no CUDA."""
    import torch  # lazy: see the module's docstring

    return cfg.gpus_per_client == 0 or not torch.cuda.is_available()


def simulated_client_resources(cfg: RunConfig, cpus: int, progress=print) -> dict[str, float]:
    """Ray's resources per client for this run on this machine; says how clients share a GPU."""
    import torch  # lazy: see the module's docstring

    gpus = 0 if clients_train_on_cpu(cfg) else torch.cuda.device_count()
    if gpus == 0:
        # one worker using every core: clients train one after another, each at full speed,
        # and the base model sits in memory once
        return client_resources(0.0, cpus, 0, cfg.clients)
    memory = torch.cuda.get_device_properties(0).total_memory
    share = gpu_share(cfg.gpus_per_client, cfg.clients, gpus, memory, base_parameters(cfg))
    workers = gpu_workers(share, gpus, cfg.clients, cpus)
    progress(f"GPU: {gpus} x {memory / 2**30:.0f} GiB, {share:g} of a GPU per client, {workers} client(s) at once")
    return client_resources(share, cpus, gpus, cfg.clients)


def resume_config(out: str) -> RunConfig:
    """The configuration a run in ``out`` was started with."""
    path = Path(out) / "config.json"
    if not path.is_file():
        raise UserError(f"nothing to resume in {out}: no config.json")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"unreadable {path}: {exc}") from None
    if isinstance(values, dict) and "dp_accountant" not in values:
        values["dp_accountant"] = "rdp"  # saved before PRV: it goes on planning and reporting as it began
    return RunConfig.from_dict(values)

"""Fail-fast checks of a run's inputs, before any Flower process would act on them."""

from __future__ import annotations

import torch

from fedlora.config import RunConfig
from fedlora.errors import UserError
from fedlora.io.tracking import check_tracker
from fedlora.ml.models import resolve_model_path
from fedlora.ml.quantize import require_quantization
from fedlora.ml.task import check_target_modules, load_splits
from fedlora.strategies import check_strategy


def check_inputs(cfg: RunConfig) -> None:
    """Fail fast, before any worker starts, on bad config, data or model paths, and on a GPU
    share or a quantization this machine cannot serve."""
    cfg.validate()
    check_strategy(cfg)
    check_tracker(cfg.track, cfg.track_uri)
    check_hardware(cfg.gpus_per_client, cfg.quantize)
    resolve_model_path(cfg.model, cfg.task)
    splits = load_splits(cfg)
    check_target_modules(cfg, max(len(splits.label_names), 1))


def check_hardware(gpus_per_client: float | None, quantize: str) -> None:
    """A GPU share needs CUDA; a quantized base needs a bitsandbytes that trains through it
    on the device the clients use."""
    cuda = torch.cuda.is_available()
    if gpus_per_client and not cuda:
        raise UserError(f"--gpus-per-client {gpus_per_client:g} needs CUDA, which this machine lacks (0: the CPU)")
    require_quantization(quantize, "cuda" if cuda and gpus_per_client != 0 else "cpu")

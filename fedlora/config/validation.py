"""The checks of a run's settings: each setting against its own bounds and choices, then
the few rules that tie two settings together."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fedlora.config.setting import Setting
from fedlora.errors import UserError

if TYPE_CHECKING:  # run_config imports this module
    from fedlora.config.run_config import RunConfig


def check_settings(cfg: RunConfig, schema: Sequence[Setting], command: str | None = None) -> None:
    """Raise UserError for the first setting out of bounds; ``command`` names the flags."""
    for s in schema:
        check_setting(s, getattr(cfg, s.name), command)
    for rule in CROSS_SETTING_RULES:
        rule(cfg)


def check_setting(s: Setting, value: Any, command: str | None = None) -> None:
    label = s.label(command)
    if s.is_tuple:
        _check_items(s, value, label)
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{label} must be a finite number, got {value}")
    if value is None or (value == "" and s.default == ""):
        return  # unset: the run picks (off, the embedded model, the wire dtype, ...)
    if s.choices and value not in s.choices:
        raise UserError(f"unknown {s.name.replace('_', ' ')} {value!r}: choose from {', '.join(s.choices)}")
    if s.range is not None and value not in s.range:
        zero = f" (0: {s.zero})" if s.zero and 0 in s.range else ""
        raise UserError(f"{label} must be {s.range}{zero}, got {value}")


def _check_items(s: Setting, value: tuple, label: str) -> None:
    if s.nonempty and not value:
        raise UserError(f"{label} must name at least one {s.nonempty}")
    if s.range is not None and any(v not in s.range for v in value):
        raise UserError(f"{label} must all be {s.range}, got {list(value)}")


def _pooling_needs_classify(cfg: RunConfig) -> None:
    if cfg.pooling not in ("auto", "pooler") and cfg.task != "classify":
        raise UserError("--pooling applies to --task classify only")


def _attackers_are_clients(cfg: RunConfig) -> None:
    if any(not 0 <= c < cfg.clients for c in cfg.attack_clients):
        raise UserError(f"attack clients must be partition ids in 0..{cfg.clients - 1}, got {list(cfg.attack_clients)}")


def _gpu_share_is_schedulable(cfg: RunConfig) -> None:
    share = cfg.gpus_per_client
    if share is not None and 0 < share < MIN_GPU_SHARE:
        raise UserError(
            f"--gpus-per-client must be 0 or at least {MIN_GPU_SHARE:g} (Ray's smallest share), got {share}"
        )


MIN_GPU_SHARE = 1e-4  # Ray refuses a finer fraction of a resource
CROSS_SETTING_RULES: tuple[Callable[[RunConfig], None], ...] = (
    _pooling_needs_classify,
    _attackers_are_clients,
    _gpu_share_is_schedulable,
)


def check_deployable(cfg: RunConfig, schema: Sequence[Setting]) -> None:
    """Refuse the simulation-only settings ([attack], a simulated client's GPU share or
    quantized base) that differ from their defaults."""
    changed = [s for s in schema if s.simulation_only and getattr(cfg, s.name) != s.default]
    if not changed:
        return
    if changed[0].group.name == "attack":
        raise UserError("[attack] simulates hostile clients in fedlora simulate only; a coordinator has real ones")
    s = changed[0]
    raise UserError(f"{s.label()} applies to fedlora simulate only; in a deployment {s.deployed}")

"""Defaults that follow the run: a setting left unset takes the default of the run's task,
strategy and privacy, in that order of precedence: DP, then causal-lm, then the strategy."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fedlora.config.setting import UNSET, Setting

if TYPE_CHECKING:  # run_config imports this module
    from fedlora.config.run_config import RunConfig

# decided first: the other settings' defaults depend on them
SITUATION = ("task", "strategy", "dp_epsilon")


def situational_default(s: Setting, cfg: RunConfig) -> Any:
    """The default of ``s`` for ``cfg``'s task, strategy and privacy."""
    if cfg.dp_epsilon is not None and s.under_dp is not UNSET:
        return s.under_dp
    if cfg.task == "causal-lm" and s.causal_lm is not UNSET:
        return s.causal_lm
    return dict(s.by_strategy).get(cfg.strategy, s.default)


def candidate_defaults(s: Setting) -> list[Any]:
    """Every value ``s`` takes as a default in some situation."""
    values = [s.default, *dict(s.by_strategy).values()]
    return values + [v for v in (s.causal_lm, s.under_dp) if v is not UNSET]


def follow_situation(cfg: RunConfig, schema: Iterable[Setting], explicit: set[str]) -> None:
    """Give every setting that was not set explicitly, and still holds one of its defaults,
    the default of ``cfg``'s situation (a value assigned in code is kept)."""
    ordered = sorted(schema, key=lambda s: s.name not in SITUATION)
    for s in ordered:
        if s.name in explicit or getattr(cfg, s.name) not in candidate_defaults(s):
            continue
        setattr(cfg, s.name, situational_default(s, cfg))


def adjusted_under_dp(cfg: RunConfig, schema: Iterable[Setting], explicit: set[str]) -> dict[str, Any]:
    """The settings a DP run takes at their DP defaults, which differ from a plain run's."""
    if cfg.dp_epsilon is None:
        return {}
    return {s.name: getattr(cfg, s.name) for s in schema if s.under_dp is not UNSET and s.name not in explicit}
